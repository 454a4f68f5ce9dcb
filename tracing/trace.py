"""The trace command: every ACT step of a checkpoint's evaluation, written as a trace folder.

    python -m tracing.trace checkpoint=checkpoints/run/step_1000 trace.groups=32 \\
        trace.aug=identity trace.probe_l_steps=True trace.out=traces/ \\
        trace.perturb="step=5,target=z_L,sigma_rel=0.5,seed=0"

The checkpoint, data and model are resolved as ``evaluate.py`` resolves them (every one of its
keys works here), the provenance guard included. Every traced (task, test input,
augmentation) runs all ``halt_max_steps`` ACT steps; each perturbation adds a variant from the
same carry; ``trace.perturb`` may be a list (a sweep). Writes ``trace.out``/``index.json``,
``per_step.json`` and ``shard_NNNNN.jsonl`` (format ``trm-trace/v1``) and prints the per-step
table; ``run_trace`` is the same for callers (``evaluate.py trace.enabled=True``). Under
``torchrun`` each rank traces its rows and rank 0 writes.

With ``tto.steps=K`` (test-time latent search, ``training.latent_search``) the rows come from
the loader ``evaluate.py`` searches with (``training.data.create_dataloader``'s ``with_demos``:
for TRM, the queries of a strict-split build with their tasks' demos) and the traced rows of
every batch are searched together as evaluate.py searches a batch, after their recorded
rollout; each clean
record gains ``search`` (``tracing.records.search_entry``). Rows not traced are not searched,
so ``trace.aug=identity`` costs one search per test input.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from evaluate import guard, load_configs, resolve, run_trace_instead
from evaluators.arc import ARC, ARCEvaluatorConfig
from tracing.config import TraceConfig
from tracing.per_step import StepVoting, per_step_results
from tracing.record import inner_site, trace_batch
from tracing.records import (
    CLEAN,
    RowKey,
    SearchCapture,
    TaskFrames,
    build_record,
    search_entry,
    search_options,
)
from tracing.writer import order_records, write_trace
from training.config import EvaluateConfig, PretrainConfig, check_world_size
from training.data import create_dataloader, reads_demos
from training.latent_search import search
from training.state import build_model
from utils.checkpoint import load_model_weights
from utils.config import ConfigError, lenient_overrides
from utils.distributed import (
    DistInfo,
    cleanup,
    collective_phase,
    gather_objects,
    init_distributed,
)
from utils.exit_codes import user_errors_exit


def config_hash(config: PretrainConfig) -> str:
    """SHA-256 hex of the resolved run config as JSON with sorted keys."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _conditioner(config: PretrainConfig, head: torch.nn.Module) -> str:
    if reads_demos(config):
        return "encoder"
    return "puzzle_embedding" if hasattr(inner_site(head), "puzzle_emb") else "none"


def _select(
    frames: TaskFrames,
    batch: dict[str, torch.Tensor],
    identity_only: bool,
    seen: set[str],
) -> list[RowKey | None]:
    """Each batch row's record, None for rows not traced (blank, demonstration, augmented
    under ``aug=identity``, or already traced)."""
    ids = batch["puzzle_identifiers"].numpy()
    inputs = batch["inputs"].numpy()
    keys: list[RowKey | None] = []
    for b in range(len(ids)):
        row = frames.row_key(int(ids[b]), inputs[b])
        if row is not None and ((identity_only and row.aug != "identity") or row.key in seen):
            row = None
        if row is not None:
            seen.add(row.key)
        keys.append(row)
    return keys


def run_trace(ecfg: EvaluateConfig, trace: TraceConfig, dist_info: DistInfo) -> dict[str, Any]:
    """Trace the checkpoint of ``ecfg`` as ``trace`` says and write ``trace.out``.

    Returns the per-step results (``per_step.json``'s object) on rank 0, {} on other ranks.
    """
    perturbations = trace.perturbations()
    resolved = resolve(ecfg, dist_info.is_main)
    config = resolved.config
    check_world_size(config, dist_info.world_size)
    contamination = guard(ecfg, resolved, dist_info.is_main)
    if trace.groups is not None:  # every family's test loader keeps the first N groups
        config = config.model_copy(update={"max_eval_groups": trace.groups})
    tto = ecfg.tto
    loader, data = create_dataloader(
        config, "test", dist_info, test_set_mode=True, with_demos=tto.enabled
    )
    head, _ = build_model(config, data, dist_info)
    load_model_weights(head, resolved.weights, resize_puzzle_emb=False, source=ecfg.checkpoint)
    head.eval()
    base = ARC(
        ARCEvaluatorConfig(pass_Ks=[1, 2], aggregated_voting=False),
        data.config.dataset_paths,
        data.identifier_offsets,
    )
    frames = TaskFrames.from_files(base.identifier_names, base.test_puzzles)
    H = config.arch.halt_max_steps
    for p in perturbations:
        if p.step > H:
            raise ConfigError(f"trace.perturb step={p.step}: the model runs {H} ACT steps")
    voting = StepVoting(base, H)
    tto_run = tto.model_copy(update={"count_flops": False})
    options = search_options(tto)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _set_name, batch, _ in loader:
        keys = _select(frames, batch, trace.aug == "identity", seen)
        rows = [b for b, k in enumerate(keys) if k is not None]
        if not rows:
            continue  # no model call: the batches of untraced groups cost nothing
        batch = {k: v.to(dist_info.device) for k, v in batch.items()}
        rows_t = torch.tensor(rows, dtype=torch.long, device=dist_info.device)
        record_keys = [None if k is None else k.key for k in keys]
        traces = trace_batch(
            head, batch, rows_t, record_keys, H, trace.probe_l_steps, perturbations
        )
        voting.update(batch, rows_t, traces[CLEAN])
        found = None
        if tto.enabled:
            # FLOPs are not part of a trace; counting them would only cost extra passes.
            searched = search(head, {k: v[rows_t] for k, v in batch.items()}, tto_run)
            found = SearchCapture.from_output(searched)
        by_tag = {p.tag: p for p in perturbations}
        for r, b in enumerate(rows):
            row = keys[b]
            assert row is not None
            for variant, steps in traces.items():
                record = build_record(frames, row, r, steps, variant, by_tag.get(variant))
                if found is not None:
                    clean = variant == CLEAN
                    record["search"] = search_entry(row, found, r, options) if clean else None
                records.append(record)
    voted = voting.result(group=dist_info.cpu_group)
    gathered = gather_objects(records, group=dist_info.cpu_group)
    if gathered is None or voted is None:
        return {}
    variants = [CLEAN, *(p.tag for p in perturbations)]
    ordered = order_records([r for part in gathered for r in part], frames.order, variants)
    per_step = per_step_results(ordered, H, voted, perturbations)
    arch = config.arch
    run = {
        "checkpoint": ecfg.checkpoint,
        "config_hash": config_hash(config),
        "arch": arch.name,
        "conditioner": _conditioner(config, head),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if contamination is not None:
        run["provenance"] = contamination.summary()
    dims = {"halt_max_steps": H, "H_cycles": arch.H_cycles, "L_cycles": arch.L_cycles}
    write_trace(Path(trace.out), ordered, run, dims, perturbations, per_step, trace.shard_size)
    return per_step


@hydra.main(config_path="../config", config_name="cfg_trace", version_base=None)
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        ecfg, trace = load_configs(cfg)
        dist_info = init_distributed(ecfg.device)
        try:
            with collective_phase("trace", slow=True):
                run_trace_instead(ecfg, trace, dist_info)
        finally:
            cleanup()


if __name__ == "__main__":
    sys.argv[1:] = lenient_overrides(sys.argv[1:])
    main()
