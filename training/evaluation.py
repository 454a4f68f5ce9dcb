"""Evaluation: every test batch rolled out to the end of ACT, scored and handed to evaluators.

Upstream ``pretrain.py`` (``evaluate``): metrics summed over the test split per set and
divided by the count of labelled examples, every evaluator fed each batch's predictions. Each
slot is scored at the step where it first halts: with the default (no halting at evaluation)
that is ``halt_max_steps`` for every slot, exactly upstream's final-step metrics; with
``halt_at_eval`` it is the slot's own halting step.

With a ``SearchPlan`` whose config is enabled (``tto.steps > 0``), every batch is also searched
after its plain rollout (``training.latent_search.search``): the search's ranked attempts feed
the plan's evaluators (``evaluators.arc_tto.ARCSearch``: ``ARC-tto/pass@K`` beside the plain
``ARC/pass@K`` of the same run), and the result gains, per test set, ``<set>/tto/exact_accuracy``
(attempt 1 exact) and ``<set>/tto/exact_accuracy@2`` (either attempt exact) over the same rows as
``<set>/exact_accuracy``, and over every searched row of every rank: ``tto/demo_loglik_start``
and ``tto/demo_loglik_best`` (mean demo log-likelihood of the best start and of the best latent
found), ``tto/best_is_start`` (fraction of rows whose best latent is a starting one),
``tto/seconds_per_puzzle`` and ``tto/flops_per_puzzle`` (the search's wall time and FLOPs summed
over ranks, divided by the rows searched; FLOPs absent when unknown), ``tto/puzzles`` (rows
searched) and ``tto/steps``. A row is one augmented variant of one test pair. Without a plan,
nothing of this runs and the results are exactly the plain evaluation's.

On a strict-split evaluation set the result also carries the provenance guard's flag
(``training.pretrained_decoder.Contamination.metrics``: ``provenance/contaminated_decoder`` 1
when the weights were trained on demonstrations of its tasks and were evaluated anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataset.common import IGNORE_LABEL_ID
from evaluators.base import Evaluator
from evaluators.prediction_images import PredictionSample, StepExactCurve
from models.losses import sum_row_metrics
from training.config import PretrainConfig
from training.latent_search import SearchOutput, TTOConfig, search
from training.rollout import keep_at_first_halt, rollout
from training.state import TrainState
from training.step import sum_over_ranks
from utils.distributed import DistInfo, gather_objects

Batch = dict[str, torch.Tensor]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    outputs: dict[str, torch.Tensor] | None  # saved per-example outputs (rank 0), test order
    # Exact accuracy with the answer of ACT step 1..halt_max_steps, over every rank's rows.
    exact_by_step: list[float] | None = None
    # Rank 0's first rows as prediction images, when ``log_predictions_every`` is set.
    predictions: PredictionSample | None = None


@dataclass(frozen=True)
class SearchPlan:
    """Test-time latent search during an evaluation: its options and the evaluators of its
    attempts (``evaluators.arc_tto.build_search_evaluators``)."""

    config: TTOConfig
    evaluators: Sequence[Evaluator] = field(default_factory=tuple)


def _real_rows(global_effective: int, local_bs: int, rank: int) -> int:
    """Rows of this rank's slice that hold examples (the rest is padding)."""
    return max(0, min(local_bs, global_effective - rank * local_bs))


def _score_at_halt(
    model: torch.nn.Module, batch: Batch, return_keys: set[str], curve: StepExactCurve
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Per-row metrics and outputs of every slot taken at the step where it first halted;
    ``curve`` counts each step's exact answers."""
    rows: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    done = None
    for step in rollout(model, batch, sorted(return_keys)):
        out, newly = step.out, step.newly_halted
        curve.update(out.row_metrics["exact_accuracy"], out.row_metrics["has_labels"], newly)
        per_row = {
            **out.row_metrics,
            "lm_loss": out.lm_loss_per_sample,
            "q_halt_loss": out.q_halt_loss,
        }
        keep_at_first_halt(rows, per_row, newly)
        keep_at_first_halt(outputs, out.outputs, newly)
        done = step.done
    assert done is not None
    curve.end_batch()
    return rows, outputs, done


def evaluate(
    config: PretrainConfig,
    state: TrainState,
    loader: Iterable[tuple[str, Batch, int]],
    evaluators: list[Evaluator],
    dist_info: DistInfo,
    save_path: Path | None,
    search_plan: SearchPlan | None = None,
) -> EvalResult:
    """Roll out every test batch and score it; the evaluators' metrics are added (rank 0), and
    the provenance flag of ``state.contamination`` when the guard applied. With an enabled
    ``search_plan``, each batch is searched too (the module docstring's metrics)."""
    plan = search_plan if search_plan is not None and search_plan.config.enabled else None
    model = state.model
    model.eval()
    save_keys = list(config.eval_save_outputs)
    return_keys = set(save_keys)
    for ev in evaluators:
        return_keys |= set(ev.required_outputs)
        ev.begin_eval()
    for ev in plan.evaluators if plan is not None else ():
        ev.begin_eval()
    sums: dict[str, dict[str, torch.Tensor]] = {}
    search_sums: dict[str, torch.Tensor] = {}
    saved: list[dict[str, torch.Tensor]] = []
    local_bs = config.global_batch_size // dist_info.world_size
    curve = StepExactCurve(config.arch.halt_max_steps)
    sample = None
    if config.log_predictions_every and dist_info.is_main:
        sample = PredictionSample(config.log_predictions_max_samples, config.log_predictions_crop)
    with torch.inference_mode():
        for set_name, batch, global_effective in loader:
            batch = {k: v.to(dist_info.device) for k, v in batch.items()}
            rows, outputs, done = _score_at_halt(model, batch, return_keys, curve)
            if sample is not None:
                sample.add(batch, outputs)
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
            if plan is not None:
                found = search(model, batch, plan.config)
                _add_search(search_sums, set_name, batch, found)
                attempts = _attempt_outputs(found)
                for ev in plan.evaluators:
                    ev.update_batch(batch, attempts)

    result: dict[str, float] = {}
    for set_name in sorted(sums):
        reduced = sum_over_ranks(sums[set_name], torch.float64)
        count = max(reduced.pop("count"), 1.0)
        result.update({f"{set_name}/{k}": v / count for k, v in reduced.items()})
    if plan is not None:
        result.update(_search_metrics(search_sums, plan.config))
    for ev in [*evaluators, *(plan.evaluators if plan is not None else ())]:
        ev_metrics = ev.result(
            str(save_path) if save_path is not None else None, group=dist_info.cpu_group
        )
        if ev_metrics:
            result.update(ev_metrics)
    if state.contamination is not None:
        result.update(state.contamination.metrics())
    exact_by_step = curve.curve(sum_over_ranks(curve.sums(dist_info.device), torch.float64))
    outputs_saved = _collect_outputs(saved, dist_info) if save_keys else None
    return EvalResult(result, outputs_saved, exact_by_step, sample)


def _attempt_outputs(found: SearchOutput) -> dict[str, torch.Tensor]:
    """What the search's evaluators read: every attempt, and attempt 1 under the plain names."""
    return {
        "attempt_preds": found.preds,
        "attempt_demo_loglik": found.demo_loglik,
        "attempt_q_halt_logits": found.q_halt_logits,
        "preds": found.preds[:, 0],
        "q_halt_logits": found.q_halt_logits[:, 0],
    }


def _add_search(
    sums: dict[str, torch.Tensor],
    set_name: str,
    batch: Batch,
    found: SearchOutput,
) -> None:
    """Add one batch's search sums to ``sums`` (float64 scalars, on the batch's device)."""
    device = batch["inputs"].device
    labels_BS = batch["labels"]
    valid_BS = labels_BS != IGNORE_LABEL_ID
    # The plain metrics' rows: halted (every row, at evaluation without halting) with labels.
    counted_B = valid_BS.any(dim=-1)
    exact_BA = ((found.preds == labels_BS[:, None]) | ~valid_BS[:, None]).all(dim=-1)
    searched_B = found.searched
    per_set = {
        "count": counted_B.sum(),
        "exact_accuracy": (counted_B & exact_BA[:, 0]).sum(),
        "exact_accuracy@2": (counted_B & exact_BA[:, :2].any(dim=-1)).sum(),
    }
    overall = {
        "puzzles": searched_B.sum(),
        "demo_loglik_start": torch.where(searched_B, found.loglik_start, 0).sum(),
        "demo_loglik_best": torch.where(searched_B, found.demo_loglik[:, 0], 0).sum(),
        "best_is_start": (searched_B & found.best_is_start).sum(),
        "seconds": torch.tensor(found.seconds),
        "flops": torch.tensor(found.flops if found.flops is not None else 0.0),
        "flops_unknown": torch.tensor(float(found.flops is None)),
    }
    named = {**{f"{set_name}/{k}": v for k, v in per_set.items()}, **overall}
    for key, value in named.items():
        value = value.to(device=device, dtype=torch.float64)
        sums[key] = sums[key] + value if key in sums else value


def _search_metrics(sums: dict[str, torch.Tensor], config: TTOConfig) -> dict[str, float]:
    """The search's sums over ranks turned into the module docstring's metrics."""
    reduced = sum_over_ranks(sums, torch.float64) if sums else {}
    metrics: dict[str, float] = {}
    for key in sorted(k for k in reduced if k.endswith("/count")):
        set_name = key.rsplit("/", 1)[0]
        count = max(reduced[key], 1.0)
        for name in ("exact_accuracy", "exact_accuracy@2"):
            metrics[f"{set_name}/tto/{name}"] = reduced[f"{set_name}/{name}"] / count
    puzzles = reduced.get("puzzles", 0.0)
    per = max(puzzles, 1.0)
    metrics["tto/puzzles"] = puzzles
    metrics["tto/steps"] = float(config.steps)
    for name in ("demo_loglik_start", "demo_loglik_best", "best_is_start"):
        metrics[f"tto/{name}"] = reduced.get(name, 0.0) / per
    metrics["tto/seconds_per_puzzle"] = reduced.get("seconds", 0.0) / per
    if reduced.get("flops_unknown", 0.0) == 0.0:
        metrics["tto/flops_per_puzzle"] = reduced.get("flops", 0.0) / per
    return metrics


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
