"""One optimizer step on one global batch, whatever the step strategy.

Upstream ``pretrain.py`` (``train_batch``): the strategy writes the gradients, they are summed
over ranks (one flat all-reduce instead of one call per parameter), both optimizers follow
warm-up + cosine, and the EMA shadow is updated after every step. On top: the global gradient
norm (logged before clipping), optional clipping by that norm after the reduction, and a stop
on every rank together when a loss is not finite, before any optimizer or EMA update. The
metric sums, the non-finite flag and the norm share one all-reduce and one host read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from training.config import PretrainConfig
from training.optimizers import step_optimizers
from training.state import TrainState
from utils.distributed import DistInfo, all_reduce_sum_
from utils.schema import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


_NON_FINITE = "_non_finite"  # the non-finite flag's key among the metric sums


def _stop_non_finite(state: TrainState, last_checkpoint: Path | None) -> None:
    where = last_checkpoint or "none written yet"
    raise NonFiniteLossError(f"non-finite loss at step {state.step}; last good checkpoint: {where}")


def finite_guard(state: TrainState, last_checkpoint: Path | None) -> Callable[[torch.Tensor], None]:
    """A check that stops every rank together when any rank's loss is NaN or infinite (a rank
    that raised alone would leave the others waiting in the gradient all-reduce)."""

    def guard(loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        all_reduce_sum_(bad)
        if bad.item() > 0:
            _stop_non_finite(state, last_checkpoint)

    return guard


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
) -> dict[str, float] | None:
    """One optimizer step on one global batch; metrics (rank 0's view) or None if skipped."""
    state.step += 1
    if state.step > state.total_steps:
        return None  # upstream skips batches beyond the schedule
    batch = {k: v.to(dist_info.device, non_blocking=True) for k, v in batch.items()}
    if state.carry is None:
        state.carry = state.model.initial_carry(batch)

    grads_out = state.strategy.compute_gradients(state, batch, finite_guard(state, last_checkpoint))
    params = [p for p in state.raw_model.parameters() if p.requires_grad]
    if not grads_out.reduced_across_ranks:
        reduce_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    # The global norm after the reduction, logged before any clipping.
    grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else None
    # One all-reduce and one host read per step: the metric sums and the non-finite flag are
    # summed over ranks, the (already global) norm rides along, and all are read together.
    sums = dict(grads_out.out.metrics)
    if grads_out.unchecked_non_finite is not None:
        sums[_NON_FINITE] = grads_out.unchecked_non_finite
    keys = sorted(sums)
    values = torch.stack([sums[k].to(torch.float32) for k in keys])
    all_reduce_sum_(values)
    if grad_norm is not None:
        values = torch.cat([values, grad_norm.to(torch.float32).reshape(1)])
    host = values.cpu().tolist()
    reduced = dict(zip(keys, host, strict=False))
    if reduced.pop(_NON_FINITE, 0.0) > 0:
        _stop_non_finite(state, last_checkpoint)
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
    return metrics
