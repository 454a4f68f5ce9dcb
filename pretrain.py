"""Train a recursive reasoning model.

    python pretrain.py +experiment=[arc1,tiny_cpu] data_paths="[data/arc1-quickstart]"
    torchrun --nproc-per-node 4 pretrain.py arch=trm data_paths="[data/arc1concept-aug-1000]" \\
        arch.L_layers=2 arch.H_cycles=3 arch.L_cycles=4 +run_name=x ema=True

Hydra composes ``config/cfg_pretrain.yaml``; the result is validated (``training.config``),
rank 0 fills in the run's names and broadcasts the config, and
``training.loop.run_training`` does the rest. Input problems (``utils.schema.UserError``,
missing files) end with one ``error:`` line and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from models.registry import MODELS
from training.config import PretrainConfig, load_pretrain_config
from training.loop import default_evaluators, run_training
from utils.distributed import DistInfo, broadcast_object, cleanup, init_distributed
from utils.logging import StepProgress, build_logger, default_project_name, default_run_name
from utils.schema import UserError


def fill_run_names(config: PretrainConfig) -> PretrainConfig:
    """Upstream's defaults: project from the data folder, run from the model class + a slug."""
    project = config.project_name or default_project_name(config.data_paths)
    run = config.run_name or default_run_name(MODELS.get(config.arch.name).__name__)
    path = config.checkpoint_path or str(Path("checkpoints") / project / run)
    return config.model_copy(
        update={"project_name": project, "run_name": run, "checkpoint_path": path}
    )


def launch(config: PretrainConfig, dist_info: DistInfo) -> None:
    config = broadcast_object(fill_run_names(config) if dist_info.is_main else None)
    logger = build_logger(
        config.logger,
        project=config.project_name,
        run_name=config.run_name,
        config=config.model_dump(mode="json"),
        run_dir=config.checkpoint_path,
        is_main=dist_info.is_main,
    )
    try:
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


@hydra.main(config_path="config", config_name="cfg_pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        config = load_pretrain_config(cfg)
        dist_info = init_distributed(config.device)
        try:
            launch(config, dist_info)
        finally:
            cleanup()
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
