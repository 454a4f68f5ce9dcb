"""Train a recursive reasoning model.

    python pretrain.py +experiment=[arc1,tiny_cpu] data_paths="[data/arc1-quickstart]"
    torchrun --nproc-per-node 4 pretrain.py arch=trm data_paths="[data/arc1concept-aug-1000]" \\
        arch.L_layers=2 arch.H_cycles=3 arch.L_cycles=4 +run_name=x ema=True

Hydra composes ``config/cfg_pretrain.yaml`` (a misspelt key, with or without ``+``, reaches
the validation: ``utils.config.lenient_overrides``); the result is validated
(``training.config``) before any process group, file or folder is created. Rank 0 fills in
the run's names and broadcasts the config, and ``training.loop.run_training`` does the rest.
A ``wandb agent`` trial of the JD fork's W&B sweep (``+in_sweep=True``) first takes its
sampled values from the agent's W&B run on rank 0, and logs into that run
(``sweeps.in_sweep``).
Exit codes: 2 for input problems (``utils.schema.UserError``, missing files), one ``error:``
line (configuration errors from rank 0 only, since every rank finds the same); 3 when a
collective timed out or lost a peer (``utils.distributed.CollectiveError``), one line from
each rank that noticed; 128 + N after signal N (SIGTERM, SIGINT) stopped the run with a
checkpoint (``training.preemption``), one line from rank 0. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from models.registry import MODELS
from sweeps.in_sweep import join_sweep_run
from training.config import PretrainConfig, check_world_size, load_pretrain_config
from training.loop import default_evaluators, run_training
from training.preemption import InterruptedRunError
from utils.config import lenient_overrides
from utils.distributed import (
    DistInfo,
    cleanup,
    collective_phase,
    configure_timeouts,
    decide_on_main,
    env_rank,
    env_world_size,
    init_distributed,
)
from utils.exit_codes import user_errors_exit
from utils.logging import StepProgress, build_logger, default_project_name, default_run_name

# A rank other than 0 that finds a configuration error waits this long before exiting, so
# that torchrun, which stops every process at the first exit, lets rank 0 print the error.
SILENT_RANK_GRACE_S = 10.0


def fill_run_names(config: PretrainConfig) -> PretrainConfig:
    """Upstream's defaults: project from the data folder, run from the model class + a slug."""
    project = config.project_name or default_project_name(config.data_paths)
    run = config.run_name or default_run_name(MODELS.get(config.arch.name).__name__)
    path = config.checkpoint_path or str(Path("checkpoints") / project / run)
    return config.model_copy(
        update={"project_name": project, "run_name": run, "checkpoint_path": path}
    )


def launch(config: PretrainConfig, dist_info: DistInfo) -> None:
    wandb_run: Any = None  # rank 0's W&B run of a sweep trial, which the logger joins

    def resolve() -> PretrainConfig:
        nonlocal wandb_run
        resolved = config
        if config.in_sweep:
            resolved, wandb_run = join_sweep_run(config)
        return fill_run_names(resolved)

    with collective_phase("start-up", slow=True):
        config = decide_on_main(resolve, dist_info.is_main)
    # Writes nothing until the first metrics: a run that fails its data checks leaves no
    # run folder behind.
    logger = build_logger(
        config.logger,
        project=config.project_name,
        run_name=config.run_name,
        config=config.model_dump(mode="json"),
        run_dir=config.checkpoint_path,
        is_main=dist_info.is_main,
        wandb_run=wandb_run,
    )
    try:
        # The set-up's collectives (initial weights, resume) follow rank 0's reads; the loop
        # names its own phases.
        with collective_phase("start-up", slow=True):
            outcome = run_training(
                config,
                dist_info,
                logger=logger,
                progress=StepProgress(dist_info.is_main),
                evaluators_factory=default_evaluators(config),
            )
    finally:
        logger.finish()
    if dist_info.is_main:
        print(f"done: {outcome.steps} steps; checkpoint {outcome.last_checkpoint}; "
              f"metrics {Path(config.checkpoint_path) / 'metrics.jsonl'}")  # fmt: skip
        for key in sorted(outcome.eval_metrics):
            print(f"  {key}: {outcome.eval_metrics[key]:.4f}")


def run_from_hydra(cfg: DictConfig) -> None:
    """The whole command once Hydra has composed ``cfg``: validate, start the processes, train,
    and turn failures into the exit codes above (shared by ``pretrain_encoder.py``)."""
    with user_errors_exit(SILENT_RANK_GRACE_S):
        try:
            config = load_pretrain_config(cfg)
            check_world_size(config, env_world_size())
            dist_info = init_distributed(config.device, timeout_s=config.dist_timeout_slow_s)
            configure_timeouts(config.dist_timeout_s, config.dist_timeout_slow_s)
            try:
                launch(config, dist_info)
            finally:
                cleanup()
        except InterruptedRunError as e:  # a signal: every rank stopped after the same step
            if env_rank() == 0:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)


def start(main: Callable[[], None]) -> None:
    """Run a ``@hydra.main`` function on the command line, a misspelt key answered by the
    validation rather than by Hydra (``utils.config.lenient_overrides``)."""
    sys.argv[1:] = lenient_overrides(sys.argv[1:])
    main()


@hydra.main(config_path="config", config_name="cfg_pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run_from_hydra(cfg)


if __name__ == "__main__":
    start(main)
