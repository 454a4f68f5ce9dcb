"""One optimizer step on one global batch, whatever the step strategy.

Upstream ``pretrain.py`` (``train_batch``): the strategy writes the gradients, they are summed
over ranks (one flat all-reduce instead of one call per parameter), both optimizers follow
warm-up + cosine, and the EMA shadow is updated after every step. On top: the global gradient
norm (logged before clipping), optional clipping by that norm after the reduction, and a check
on every rank together that the loss and the gradient norm are finite, before any optimizer or
EMA update: ``nonfinite=stop`` ends the run there (the weights stay those of the last step, so
every checkpoint holds finite weights); ``nonfinite=skip`` drops the batch's update and goes on,
ending the run after ``nonfinite_max_skips`` skips in a row. The metric sums, the non-finite
flags, the stop request of any rank (a signal, ``training.preemption``) and the norm share one
all-reduce and one host read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.config import PretrainConfig
from training.optimizers import step_optimizers
from training.state import TrainState
from utils.distributed import DistInfo, all_reduce_sum_
from utils.schema import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the step and
    the last good checkpoint."""


@dataclass
class StepResult:
    """One step's outcome, the same on every rank."""

    metrics: dict[str, float] | None  # rank 0's view; None: a batch beyond the schedule
    stop_requested: bool = False  # some rank was asked to stop (SIGTERM/SIGINT)
    skipped: str | None = None  # nonfinite=skip: what was not finite ("loss", "gradient norm")


class _SkipBatchError(Exception):
    """Raised by the guard under ``nonfinite=skip``, on every rank together."""


# Flags among the metric sums, summed over ranks and popped before the metrics are formed.
_NON_FINITE_LOSS = "_non_finite_loss"
_NON_FINITE_NORM = "_non_finite_norm"
_STOP = "_stop"


def _stop_non_finite(what: str, state: TrainState, last_checkpoint: Path | None) -> None:
    where = last_checkpoint or "none written yet"
    raise NonFiniteLossError(
        f"non-finite {what} at step {state.step}; last good checkpoint: {where} (the update was "
        "not applied); lower lr, set grad_clip_norm=..., or pass nonfinite=skip"
    )


def finite_guard(
    config: PretrainConfig, state: TrainState, last_checkpoint: Path | None
) -> Callable[[torch.Tensor], None]:
    """A check that acts on every rank together when any rank's loss is NaN or infinite (a
    rank that raised alone would leave the others waiting in the gradient all-reduce)."""

    def guard(loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        all_reduce_sum_(bad)
        if bad.item() > 0:
            if config.nonfinite == "skip":
                raise _SkipBatchError
            _stop_non_finite("loss", state, last_checkpoint)

    return guard


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank must call it)."""
    value = torch.tensor([float(flag)], device=device)
    return all_reduce_sum_(value).item() > 0


def _skip_update(
    config: PretrainConfig, state: TrainState, what: str, stop_requested: bool
) -> StepResult:
    """Drop the batch's gradients and leave weights, optimizer moments and EMA as they were.
    The ACT carry restarts (its unhalted slots may hold non-finite latents)."""
    for named in state.optimizers.values():
        named.optimizer.zero_grad()
    state.carry = None
    state.nonfinite_streak += 1
    if state.nonfinite_streak >= config.nonfinite_max_skips:
        raise NonFiniteLossError(
            f"non-finite {what} at step {state.step}: {state.nonfinite_streak} steps in a row "
            f"(nonfinite_max_skips={config.nonfinite_max_skips}), the run does not recover; "
            "lower lr or set grad_clip_norm=..."
        )
    metrics = {"train/nonfinite_skipped": 1.0, "train/nonfinite_streak": state.nonfinite_streak}
    return StepResult(metrics, stop_requested, skipped=what)


def reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum gradients over ranks with one flat all-reduce (upstream: one call per parameter)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not torch.distributed.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(metrics: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Scalar metrics summed over ranks, in sorted key order (the same on every rank)."""
    keys = sorted(metrics)
    values = torch.stack([metrics[k].to(dtype) for k in keys])
    all_reduce_sum_(values)
    return dict(zip(keys, values.cpu().tolist(), strict=True))


def normalize_metrics(
    reduced: dict[str, float], global_batch_size: int, prefix: str
) -> dict[str, float]:
    """Metric sums over ranks → means: losses / global batch, the rest / count (upstream)."""
    count = max(reduced["count"], 1.0)
    return {
        f"{prefix}/{k}": v / (global_batch_size if k.endswith("loss") else count)
        for k, v in reduced.items()
    }


def train_batch(
    config: PretrainConfig,
    state: TrainState,
    batch: dict[str, torch.Tensor],
    dist_info: DistInfo,
    last_checkpoint: Path | None = None,
    *,
    stop_requested: bool = False,
) -> StepResult:
    """One optimizer step on one global batch. ``stop_requested`` is this rank's wish to stop;
    the result says whether any rank has one."""
    state.step += 1
    if state.step > state.total_steps:  # upstream skips batches beyond the schedule
        return StepResult(None, any_rank(stop_requested, dist_info.device))
    batch = {k: v.to(dist_info.device, non_blocking=True) for k, v in batch.items()}
    if state.carry is None:
        state.carry = state.model.initial_carry(batch)

    try:
        grads_out = state.strategy.compute_gradients(
            state, batch, finite_guard(config, state, last_checkpoint)
        )
    except _SkipBatchError:
        return _skip_update(config, state, "loss", any_rank(stop_requested, dist_info.device))
    params = [p for p in state.raw_model.parameters() if p.requires_grad]
    if not grads_out.reduced_across_ranks:
        reduce_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    # The global norm after the reduction, logged before any clipping.
    grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else None
    # One all-reduce and one host read per step: the metric sums and the flags are summed over
    # ranks (so every rank takes the same decision), the global norm rides along, and all are
    # read together.
    sums = dict(grads_out.out.metrics)
    if grads_out.unchecked_non_finite is not None:
        sums[_NON_FINITE_LOSS] = grads_out.unchecked_non_finite
    if grad_norm is not None:
        sums[_NON_FINITE_NORM] = ~torch.isfinite(grad_norm)
    sums[_STOP] = torch.tensor(float(stop_requested))
    keys = sorted(sums)
    values = torch.stack([sums[k].to(dist_info.device, torch.float32) for k in keys])
    all_reduce_sum_(values)
    if grad_norm is not None:
        values = torch.cat([values, grad_norm.to(torch.float32).reshape(1)])
    host = values.cpu().tolist()
    reduced = dict(zip(keys, host, strict=False))
    stop = reduced.pop(_STOP) > 0
    bad_loss = reduced.pop(_NON_FINITE_LOSS, 0.0) > 0
    bad_norm = reduced.pop(_NON_FINITE_NORM, 0.0) > 0
    if bad_loss or bad_norm:
        what = "loss" if bad_loss else "gradient norm"
        if config.nonfinite == "stop":
            _stop_non_finite(what, state, last_checkpoint)
        return _skip_update(config, state, what, stop)
    state.nonfinite_streak = 0
    if config.grad_clip_norm is not None and grads:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)

    lr = step_optimizers(state.optimizers, state.step, state.total_steps, config)
    if state.ema is not None:
        state.ema.update(state.raw_model)

    metrics = normalize_metrics(reduced, config.global_batch_size, "train")
    metrics.update(grads_out.metrics)
    metrics["train/lr"] = lr
    if grad_norm is not None:
        metrics["train/grad_norm"] = host[-1]
    return StepResult(metrics, stop)
