"""Evaluate a checkpoint: ours (a ``step_N`` folder) or an original ``step_N`` state-dict file.

    python evaluate.py checkpoint=checkpoints/Arc1-ACT-torch/run/step_1000
    python evaluate.py checkpoint=downloads/step_723914 arch=trm arch.L_cycles=4 \\
        data_paths="[data/arc2concept-aug-1000]" eval_save_outputs="[inputs,preds]"

Prints the metrics (last line: one JSON object) and writes into ``output_dir``:
``evaluation.json`` (the checkpoint, the data, the metrics and the provenance guard's finding),
``submission.json`` for ARC (the tasks evaluated only) and, with ``eval_save_outputs``,
``eval_outputs.pt`` (the requested per-example tensors in test-split order). The loader is the
training run's (``training.data.create_dataloader``), so a model conditioned on demonstrations
gets its few-shot batches; ``max_eval_groups=N`` evaluates the first N task groups.

``trace.enabled=True`` (with the ``trace.*`` keys of ``python -m tracing.trace``) traces every
ACT step of the evaluation instead (``tracing.trace.run_trace``): a trace folder for
``python -m tracing.viewer`` and the per-step table.

Test-time latent search (``training.latent_search``; off by default, ``tto.steps=0``):

    python evaluate.py checkpoint=... tto.steps=20 tto.lr=0.1 tto.optimizer=adam \
        tto.variable=context tto.init=mean tto.loo=True

searches every evaluation row after its plain rollout, so one run gives pass@K without search
(``ARC/pass@K``) and with it (``ARC-tto/pass@K``, ``evaluators.arc_tto``), the search's
metrics (``tto/...``, ``training.evaluation``) and its options under ``tto`` in
``evaluation.json``. With search, ``submission.json`` holds the search's attempts and the plain
ones go to ``submission_no_tto.json``; without it, the files are exactly as before. A TRM
checkpoint on a strict-split build searches a fresh puzzle-embedding row per query on the
task's demos (``training.data.create_dataloader``'s ``with_demos`` gives it the demos it does
not read).

On a strict-split evaluation set, weights trained on the demonstrations of its tasks (a
TRM-split decoder, an upstream file without provenance) are refused unless
``allow_contaminated_decoder=True``, which then flags the metrics and ``evaluation.json``
(``training.pretrained_decoder.check_contamination``).

Works as plain ``python`` or under ``torchrun``. Input problems end with one ``error:`` line
and exit code 2 (configuration errors from rank 0 only); a collective that times out (another
process stuck or gone) with one line and exit code 3.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from evaluators.arc import ARC
from evaluators.arc_tto import NO_SEARCH_SUBMISSION, build_search_evaluators
from evaluators.base import build_evaluators
from tracing.config import TraceConfig
from training.checkpointing import check_evaluation_data, evaluation_weights
from training.config import (
    EvaluateConfig,
    PretrainConfig,
    check_world_size,
    validate_pretrain_config,
)
from training.data import create_dataloader
from training.evaluation import SearchPlan, evaluate
from training.pretrained_decoder import Contamination, check_contamination
from training.state import TrainState, build_model
from utils.atomic import write_text_atomically
from utils.checkpoint import (
    PUZZLE_EMB_KEY,
    load_checkpoint_files,
    load_model_weights,
    read_state_dict,
)
from utils.config import ConfigError, compose, lenient_overrides, validate_model
from utils.distributed import (
    DistInfo,
    cleanup,
    collective_phase,
    init_distributed,
)
from utils.exit_codes import user_errors_exit

SUMMARY_FILE = "evaluation.json"


@dataclass
class Resolved:
    """What an evaluation runs on: the run config, the weights and their provenance record
    (None: an upstream file, or a folder written before checkpoints recorded one)."""

    config: PretrainConfig
    weights: dict[str, torch.Tensor]
    provenance: dict[str, Any] | None


def resolve(ecfg: EvaluateConfig, is_main: bool = True) -> Resolved:
    """The run config to evaluate with and the weights, from the checkpoint and overrides.

    Our folder is verified file by file and its data fingerprint checked against the data
    evaluated on (``training.checkpointing.check_evaluation_data``).
    """
    path = Path(ecfg.checkpoint)
    meta: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    if path.is_dir():
        shared, _ = load_checkpoint_files(path, rank=0)
        meta = shared["meta"]
        base: dict[str, Any] = dict(meta["config"])
        weights = evaluation_weights(shared, use_ema=ecfg.use_ema)
        record = meta.get("provenance")
        provenance = dict(record) if isinstance(record, dict) else None
    elif path.is_file():
        weights = read_state_dict(path)
        saved = path.parent / "all_config.yaml"  # written beside the original checkpoints
        if saved.is_file():
            base = yaml.safe_load(saved.read_text())
        elif ecfg.arch is None or "name" not in ecfg.arch:
            raise ConfigError(
                f"{path}: no all_config.yaml beside it, so give the architecture it was trained "
                "with: arch=<name> and its options (H_cycles, L_cycles, halt_max_steps, "
                "pos_encodings, ... do not show in the weights)"
            )
        else:
            base = OmegaConf.to_container(compose("cfg_pretrain"), resolve=True)  # type: ignore[assignment]
    else:
        raise FileNotFoundError(f"{path}: checkpoint not found (a step_N folder or file)")
    if ecfg.arch is not None:
        # arch=<name> (with its YAML) replaces the architecture; +arch.<key>=... alone adjusts
        # the checkpoint's own.
        base["arch"] = ecfg.arch if "name" in ecfg.arch else {**base["arch"], **ecfg.arch}
    if ecfg.data_paths is not None:
        base["data_paths"], base["data_paths_test"] = ecfg.data_paths, []
    if ecfg.global_batch_size is not None:
        base["global_batch_size"] = ecfg.global_batch_size
    if ecfg.evaluators is not None:
        base["evaluators"] = ecfg.evaluators
    if ecfg.max_eval_groups is not None:
        base["max_eval_groups"] = ecfg.max_eval_groups
    base.update(
        eval_save_outputs=ecfg.eval_save_outputs,
        device=ecfg.device,
        resume=None,
        load_checkpoint=None,
        load_pretrained_decoder=None,  # the checkpoint's weights replace it; its record stays
        allow_contaminated_decoder=ecfg.allow_contaminated_decoder,
    )
    config = validate_pretrain_config(base)
    if meta is not None:
        paths = config.data_paths_test or config.data_paths
        check_evaluation_data(
            meta, paths, path, ecfg.allow_data_mismatch, is_main, PUZZLE_EMB_KEY in weights
        )
    return Resolved(config, weights, provenance)


def guard(ecfg: EvaluateConfig, resolved: Resolved, is_main: bool) -> Contamination | None:
    """The provenance guard on the data evaluated (``check_contamination``); every rank
    decides the same, rank 0 logs."""
    config = resolved.config
    subject = f"checkpoint {ecfg.checkpoint}"
    if resolved.provenance is None and Path(ecfg.checkpoint).is_dir():
        subject += " (written before checkpoints recorded provenance)"
    return check_contamination(
        resolved.provenance,
        config.data_paths_test or config.data_paths,
        allow=ecfg.allow_contaminated_decoder,
        subject=subject,
        log=print if is_main else None,
    )


def load_evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    """Validate ``cfg``; ``checkpoint`` is mandatory (``???`` in the YAML), which is said after
    any misspelt key (so that ``chekpoint=x`` is answered as a typo). The ``trace`` section is
    ``load_configs``'s."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("trace", None)
    missing = OmegaConf.is_missing(cfg, "checkpoint") or not cfg.get("checkpoint")
    if missing:
        data["checkpoint"] = ""
    ecfg = validate_model(EvaluateConfig, data)
    if missing:
        raise ConfigError(
            "checkpoint: required; give checkpoint=PATH (a step_N folder or an upstream "
            "state-dict file)"
        )
    return ecfg


def run(ecfg: EvaluateConfig, dist_info: DistInfo) -> dict[str, float]:
    resolved = resolve(ecfg, dist_info.is_main)
    config = resolved.config
    check_world_size(config, dist_info.world_size)
    contamination = guard(ecfg, resolved, dist_info.is_main)
    loader, data = create_dataloader(
        config, "test", dist_info, test_set_mode=True, with_demos=ecfg.tto.enabled
    )
    head, family = build_model(config, data, dist_info)
    load_model_weights(head, resolved.weights, resize_puzzle_emb=False, source=ecfg.checkpoint)
    state = TrainState(
        head, family, family.capabilities(config.arch, head), contamination=contamination
    )
    evaluators = build_evaluators(
        config.evaluators, data.config.dataset_paths, data.identifier_offsets
    )
    out_dir = Path(ecfg.output_dir or f"{ecfg.checkpoint.rstrip('/')}_eval")
    plan = None
    if ecfg.tto.enabled:
        for ev in evaluators:
            if isinstance(ev, ARC):
                ev.submission_file = NO_SEARCH_SUBMISSION
        search_evaluators = build_search_evaluators(
            config.evaluators, data.config.dataset_paths, data.identifier_offsets
        )
        plan = SearchPlan(ecfg.tto, search_evaluators)
    result = evaluate(config, state, loader, evaluators, dist_info, out_dir, plan)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if result.outputs is not None:
            torch.save(result.outputs, out_dir / "eval_outputs.pt")
        summary = {
            "checkpoint": ecfg.checkpoint,
            "data_paths": config.data_paths_test or config.data_paths,
            "max_eval_groups": config.max_eval_groups,
            "use_ema": ecfg.use_ema,
            "metrics": result.metrics,
            "provenance": contamination.summary() if contamination is not None else None,
        }
        if ecfg.tto.enabled:
            summary["tto"] = ecfg.tto.model_dump()
        write_text_atomically(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return result.metrics


def load_configs(cfg: DictConfig) -> tuple[EvaluateConfig, TraceConfig]:
    """The evaluation's keys and its ``trace`` section (``tracing.config.TraceConfig``)."""
    section = cfg.get("trace")
    data = OmegaConf.to_container(section, resolve=True) if section is not None else {}
    trace = validate_model(TraceConfig, data, prefix="trace")
    return load_evaluate_config(cfg), trace


def run_trace_instead(ecfg: EvaluateConfig, trace: TraceConfig, dist_info: DistInfo) -> None:
    """``trace.enabled=True``: ``python -m tracing.trace``'s work, its table and JSON line."""
    from tracing.per_step import format_table
    from tracing.trace import run_trace  # imports this module: not at the top

    per_step = run_trace(ecfg, trace, dist_info)
    if dist_info.is_main:
        print(format_table(per_step))
        print(f"trace written to {trace.out}")
        print(json.dumps(per_step))


@hydra.main(config_path="config", config_name="cfg_evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        ecfg, trace = load_configs(cfg)
        dist_info = init_distributed(ecfg.device)
        try:
            # Every collective of an evaluation follows work of unequal length (the
            # evaluators' results on rank 0): the slow timeout.
            with collective_phase("trace" if trace.enabled else "evaluation", slow=True):
                if trace.enabled:
                    run_trace_instead(ecfg, trace, dist_info)
                    return
                metrics = run(ecfg, dist_info)
        finally:
            cleanup()
    if dist_info.is_main:
        for key in sorted(metrics):
            print(f"{key}: {metrics[key]:.4f}")
        print(json.dumps(metrics))


if __name__ == "__main__":
    sys.argv[1:] = lenient_overrides(sys.argv[1:])
    main()
