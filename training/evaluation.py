"""Evaluation: every test batch rolled out to the end of ACT, scored and handed to evaluators.

Upstream ``pretrain.py`` (``evaluate``): metrics summed over the test split per set and
divided by the count of labelled examples, every evaluator fed each batch's predictions. Each
slot is scored at the step where it first halts: with the default (no halting at evaluation)
that is ``halt_max_steps`` for every slot, exactly upstream's final-step metrics; with
``halt_at_eval`` it is the slot's own halting step.

On a strict-split evaluation set the result also carries the provenance guard's flag
(``training.pretrained_decoder.Contamination.metrics``: ``provenance/contaminated_decoder`` 1
when the weights were trained on demonstrations of its tasks and were evaluated anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluators.base import Evaluator
from models.losses import sum_row_metrics
from training.config import PretrainConfig
from training.rollout import rollout
from training.state import TrainState
from training.step import sum_over_ranks
from utils.distributed import DistInfo, gather_objects

Batch = dict[str, torch.Tensor]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    outputs: dict[str, torch.Tensor] | None  # saved per-example outputs (rank 0), test order


def _real_rows(global_effective: int, local_bs: int, rank: int) -> int:
    """Rows of this rank's slice that hold examples (the rest is padding)."""
    return max(0, min(local_bs, global_effective - rank * local_bs))


def _score_at_halt(
    model: torch.nn.Module, batch: Batch, return_keys: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Per-row metrics and outputs of every slot taken at the step where it first halted."""
    rows: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    done = None
    for step in rollout(model, batch, sorted(return_keys)):
        out, newly = step.out, step.newly_halted
        per_row = {
            **out.row_metrics,
            "lm_loss": out.lm_loss_per_sample,
            "q_halt_loss": out.q_halt_loss,
        }
        for k, v in per_row.items():
            rows[k] = torch.where(newly, v, rows[k]) if k in rows else v.clone()
        for k, v in out.outputs.items():
            mask = newly.view(-1, *([1] * (v.ndim - 1)))
            outputs[k] = torch.where(mask, v, outputs[k]) if k in outputs else v.clone()
        done = step.done
    assert done is not None
    return rows, outputs, done


def evaluate(
    config: PretrainConfig,
    state: TrainState,
    loader: Iterable[tuple[str, Batch, int]],
    evaluators: list[Evaluator],
    dist_info: DistInfo,
    save_path: Path | None,
) -> EvalResult:
    """Roll out every test batch and score it; the evaluators' metrics are added (rank 0), and
    the provenance flag of ``state.contamination`` when the guard applied."""
    model = state.model
    model.eval()
    save_keys = list(config.eval_save_outputs)
    return_keys = set(save_keys)
    for ev in evaluators:
        return_keys |= set(ev.required_outputs)
        ev.begin_eval()
    sums: dict[str, dict[str, torch.Tensor]] = {}
    saved: list[dict[str, torch.Tensor]] = []
    local_bs = config.global_batch_size // dist_info.world_size
    with torch.inference_mode():
        for set_name, batch, global_effective in loader:
            batch = {k: v.to(dist_info.device) for k, v in batch.items()}
            rows, outputs, done = _score_at_halt(model, batch, return_keys)
            metrics = sum_row_metrics(rows, done)
            metrics["lm_loss"] = rows["lm_loss"].sum()
            metrics["q_halt_loss"] = rows["q_halt_loss"].sum()
            acc = sums.setdefault(
                set_name,
                {k: torch.zeros((), dtype=torch.float64, device=dist_info.device) for k in metrics},
            )
            for k, v in metrics.items():
                acc[k] += v.to(torch.float64)
            for ev in evaluators:
                ev.update_batch(batch, outputs)
            if save_keys:
                n = _real_rows(int(global_effective), local_bs, dist_info.rank)
                source = {**batch, **outputs}
                saved.append({k: source[k][:n].cpu() for k in save_keys if k in source})

    result: dict[str, float] = {}
    for set_name in sorted(sums):
        reduced = sum_over_ranks(sums[set_name], torch.float64)
        count = max(reduced.pop("count"), 1.0)
        result.update({f"{set_name}/{k}": v / count for k, v in reduced.items()})
    for ev in evaluators:
        ev_metrics = ev.result(
            str(save_path) if save_path is not None else None, group=dist_info.cpu_group
        )
        if ev_metrics:
            result.update(ev_metrics)
    if state.contamination is not None:
        result.update(state.contamination.metrics())
    return EvalResult(result, _collect_outputs(saved, dist_info) if save_keys else None)


def _collect_outputs(
    saved: list[dict[str, torch.Tensor]], dist_info: DistInfo
) -> dict[str, torch.Tensor] | None:
    """Rank 0: every rank's outputs interleaved back into test-split order."""
    gathered = gather_objects(saved, group=dist_info.cpu_group)
    if gathered is None:
        return None
    ordered: list[dict[str, torch.Tensor]] = []
    for batch_index in range(len(gathered[0])):
        ordered.extend(per_rank[batch_index] for per_rank in gathered)
    if not ordered:
        return {}
    return {k: torch.cat([part[k] for part in ordered]) for k in ordered[0]}


@contextlib.contextmanager
def ema_weights(state: TrainState) -> Iterator[None]:
    """Evaluate with the EMA shadow in place of the weights, then put the weights back
    (a parameter copy instead of upstream's deep copy of the whole train state)."""
    if state.ema is None:
        yield
        return
    model = state.raw_model
    backup = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.ema.ema(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in backup:
                    p.copy_(backup[name])
