"""``+in_sweep=True``: a trial of the JD fork's own W&B sweep, started by ``wandb agent``.

The research fork (mattbuot/TinyRecursiveModelsJD, its ``sweep.py``) defines a W&B sweep whose
parameters are its own short names (``data``, ``H_cycles``, ``L_cycles``, ``halt_max_steps``,
``lr``) and whose trials run ``pretrain.py ... +in_sweep=True``; each trial's rank 0 calls
``wandb.init()`` with no project or name, so the agent's environment (``WANDB_SWEEP_ID``,
``WANDB_RUN_ID``) makes it the agent's run, and reads the sampled values from ``wandb.config``.
``join_sweep_run`` does the same, maps the fork's names onto this project's keys
(``data`` → ``data_paths=["data/<data>"]``; ``H_cycles``, ``L_cycles``, ``halt_max_steps`` →
``arch.*``; ``lr`` → ``lr``), also accepts any dotted config key (``arch.hidden_size``,
``lr_warmup_steps``, ...) and validates the merged config again, so a bad sampled value fails
as it would on the command line. The W&B logger then logs into that run
(``utils.logging.build_logger(wandb_run=...)``) rather than starting a second one. Unlike
other runs, a trial's W&B run starts before the data checks: its values say which data to check.

This project's own ``sweep.py`` W&B backend (``sweeps.wandb_backend``) does not need
``in_sweep``: its agents pass the sampled values to ``pretrain.py`` as Hydra overrides, and
``wandb.init`` joins the agent's run through the same environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from training.config import PretrainConfig, validate_pretrain_config
from utils.schema import ConfigError

SWEEP_ID_ENV = "WANDB_SWEEP_ID"
# The JD fork's sweep parameter names and the dotted keys they set here.
FORK_KEYS = {
    "H_cycles": "arch.H_cycles",
    "L_cycles": "arch.L_cycles",
    "halt_max_steps": "arch.halt_max_steps",
    "lr": "lr",
}
FORK_DATA_KEY = "data"  # a folder name under data/: data_paths = ["data/<data>"]
NOT_AN_AGENT = (
    "in_sweep=True: not started by `wandb agent` (no WANDB_SWEEP_ID); launch the trial with "
    "`wandb agent <sweep>` or drop +in_sweep"
)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> bool:
    """Set ``data[a][b]... = value`` for ``dotted = "a.b..."``; False (nothing set) when a part
    of the path is not already a key of ``data``, so that only existing config keys are set."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False
    if last not in node:
        return False
    node[last] = value
    return True


def apply_sweep_values(config: PretrainConfig, values: Mapping[str, Any]) -> PretrainConfig:
    """``config`` with a W&B sweep's sampled ``values`` applied, validated again.

    ``values``: the fork's names (``data``, ``H_cycles``, ``L_cycles``, ``halt_max_steps``,
    ``lr``) or this project's dotted config keys; keys starting with ``_`` (W&B's own) are
    skipped. ``ConfigError`` (one line) names an unknown key, or says which sampled values
    made the config invalid and why.
    """
    data = config.model_dump(mode="json")
    applied: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("_"):
            continue
        if key == FORK_DATA_KEY:
            data["data_paths"] = [f"data/{value}"]
        elif not _set_dotted(data, FORK_KEYS.get(key, key), value):
            raise ConfigError(
                f"in_sweep: W&B sweep parameter {key!r} is neither one of the JD fork's names "
                f"({', '.join([FORK_DATA_KEY, *FORK_KEYS])}) nor a config key (dotted, as "
                f"arch.hidden_size); rename it in the sweep definition"
            )
        applied[key] = value
    try:
        return validate_pretrain_config(data)
    except ConfigError as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in applied.items())
        raise ConfigError(f"in_sweep: the sampled values ({shown}) are refused: {e}") from None


def join_sweep_run(config: PretrainConfig) -> tuple[PretrainConfig, Any]:
    """Rank 0 of a ``wandb agent`` trial: start the agent's W&B run (``wandb.init()``, no
    project or name), apply ``wandb.config``'s sampled values (``apply_sweep_values``) and
    return the merged config with the run, for ``build_logger(wandb_run=...)``. The run's
    project and name become ``project_name``/``run_name`` where the config gives none, so the
    run folder is named as the W&B run. ``ConfigError`` without a ``WANDB_SWEEP_ID`` in the
    environment (nothing started) or for refused values (the run is finished as failed).
    """
    if not os.environ.get(SWEEP_ID_ENV):
        raise ConfigError(NOT_AN_AGENT)
    import wandb

    run = wandb.init(settings=wandb.Settings(x_disable_stats=True))
    try:
        merged = apply_sweep_values(config, dict(wandb.config.items()))
    except ConfigError:
        run.finish(exit_code=2)
        raise
    names: dict[str, str] = {}
    if merged.project_name is None and isinstance(run.project, str) and run.project:
        names["project_name"] = run.project
    if merged.run_name is None and isinstance(run.name, str) and run.name:
        names["run_name"] = run.name
    return merged.model_copy(update=names), run
