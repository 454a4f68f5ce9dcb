"""The W&B backend: a Bayesian sweep with hyperband early termination, run by ``wandb agent``.

The sweep dict carries the trial's whole command line (``command``): the agent starts
``pretrain.py`` (under torchrun for several processes) with the base overrides and the sampled
values as Hydra overrides (``${args_no_hyphens}``), and the trial's rank 0 joins the agent's run
through the environment the agent sets, so the metric it logs is the one the sweep optimises and
hyperband stops. The sampled values arrive as overrides, so these trials do not need
``+in_sweep`` (``sweeps.in_sweep``, for the fork's sweep files). Needs a W&B account; nothing
here prompts.
"""

from __future__ import annotations

from typing import Any

from sweeps.launcher import PRETRAIN, launch_prefix
from sweeps.space import CategoricalParam, RangeParam, SweepConfig


def wandb_parameter(spec: CategoricalParam | RangeParam) -> dict[str, Any]:
    """One parameter in W&B's sweep syntax (``values``, or a distribution with min/max)."""
    if isinstance(spec, CategoricalParam):
        return {"values": list(spec.values)}
    if spec.type == "int":
        low, high = int(spec.min), int(spec.max)
        if spec.log:
            return {"distribution": "q_log_uniform_values", "min": low, "max": high, "q": 1}
        if spec.step is not None and spec.step != 1:
            return {"distribution": "q_uniform", "min": low, "max": high, "q": int(spec.step)}
        return {"distribution": "int_uniform", "min": low, "max": high}
    if spec.log:
        return {"distribution": "log_uniform_values", "min": spec.min, "max": spec.max}
    if spec.step is not None:
        return {"distribution": "q_uniform", "min": spec.min, "max": spec.max, "q": spec.step}
    return {"distribution": "uniform", "min": spec.min, "max": spec.max}


def wandb_command(config: SweepConfig, extra_overrides: list[str] | None = None) -> list[str]:
    """The agent's command template: W&B fills ``${env}``, ``${interpreter}``, ``${program}``
    and ``${args_no_hyphens}`` (``key=value`` per sampled parameter)."""
    return [
        "${env}",
        *launch_prefix(config.launcher, config.nproc_per_node, "${interpreter}"),
        "${program}",
        *config.base_overrides,
        *(extra_overrides or []),
        "${args_no_hyphens}",
    ]


def wandb_sweep_dict(
    config: SweepConfig, extra_overrides: list[str] | None = None, program: str | None = None
) -> dict[str, Any]:
    """The sweep definition ``wandb.sweep`` takes: Bayesian search over the file's parameters,
    its metric and goal, hyperband early termination if the file has it, and the command.
    Agents run from the repository root, where ``program`` (``pretrain.py``) is."""
    sweep: dict[str, Any] = {
        "name": config.name,
        "method": "bayes",
        "metric": {"name": config.metric.name, "goal": config.metric.goal},
        "parameters": {k: wandb_parameter(spec) for k, spec in config.parameters.items()},
        "program": program or PRETRAIN.name,
        "command": wandb_command(config, extra_overrides),
        "run_cap": config.trials,
    }
    if config.early_terminate is not None:
        sweep["early_terminate"] = config.early_terminate.model_dump(exclude_none=True)
    return sweep


def agent_command(entity: str | None, project: str, sweep_id: str, count: int) -> str:
    """The shell command that runs ``count`` trials of a created sweep on this machine."""
    path = "/".join(p for p in (entity, project, sweep_id) if p)
    return f"wandb agent --count {count} {path}"


def run_wandb_sweep(
    config: SweepConfig,
    *,
    extra_overrides: list[str] | None = None,
    create_only: bool = False,
    echo: Any = print,
) -> str:
    """Create the sweep in ``config.wandb_project`` and, unless ``create_only``, run
    ``config.trials`` trials through ``wandb.agent`` here. Returns the sweep id."""
    import wandb

    sweep_id = wandb.sweep(
        sweep=wandb_sweep_dict(config, extra_overrides), project=config.wandb_project
    )
    entity = wandb.Api().default_entity
    command = agent_command(entity, config.wandb_project, sweep_id, config.trials)
    echo(f"W&B sweep {sweep_id} created in project {config.wandb_project}")
    echo(f"run trials (one agent per machine or GPU set): {command}")
    if not create_only:
        wandb.agent(sweep_id, project=config.wandb_project, entity=entity, count=config.trials)
    return sweep_id
