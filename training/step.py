"""One optimizer step on one global batch (or on k micro-batches), whatever the step strategy.

Upstream ``pretrain.py`` (``train_batch``): the strategy writes the gradients, they are summed
over ranks (one flat all-reduce instead of one call per parameter), both optimizers follow
warm-up + cosine, and the EMA shadow is updated after every step. On top: the global gradient
norm (logged before clipping, with the norm of each of the family's ``norm_groups``, e.g.
encoder and decoder), optional clipping by that norm after the reduction, and a check on every
rank together that the loss and the gradient norm are finite, before any optimizer or EMA
update: ``nonfinite=stop`` ends the run there (the weights stay those of the last step, so
every checkpoint holds finite weights); ``nonfinite=skip`` drops the batch's update and goes on,
ending the run after ``nonfinite_max_skips`` skips in a row. The metric sums, the non-finite
flags, the stop request of any rank (a signal, ``training.preemption``) and the norms share one
all-reduce and one host read; every ``log_param_grad_norms_every`` steps rank 0 adds each
parameter's gradient norm to that read (``training.param_norms``). A step past ``total_steps``
trains on nothing (upstream) unless ``cap_total_steps=False`` (the JD fork).

``freeze_decoder_steps=N`` (ETRM's staged training) trains only the encoder for the first N
optimizer steps: the decoder's parameters take no gradient then, so their weights, optimizer
moments and EMA shadow stay as they were.

Metric sums are turned into means by family (``normalize_metrics``): ``F/name`` by ``F/count``.

Gradient accumulation (``grad_accum_steps`` or ``effective_batch_size``: k micro-batches per
optimizer step) calls ``train_batch`` once per micro-batch. Each micro-batch runs its own ACT
carry slot (``TrainState.slot_carries``), the strategy adds its gradients to ``.grad`` with the
loss divided by ``global_batch_size × k`` (``StepStrategy.loss_divisor``), the puzzle-embedding
optimizer keeps its (ids, rows) aside, and its metric sums and non-finite flag are added up on
the device: no collective and no host read until the last micro-batch (Jacobian descent alone
checks each micro-batch's loss on every rank and, for objectives every rank shares, sums each
micro-batch's Jacobian over ranks: ``training.strategies``). The last one does the rest
of the step once: the cross-rank reduction, the norms, the non-finite check, clipping, the
optimizers and the schedule (``step`` counts optimizer steps), the EMA, and the metrics, summed
over the micro-batches and normalised by ``global_batch_size × k``, with
``train/micro_batches``. The EMA follows every micro-batch instead under ``ema_every=micro``
(k updates per step, the first k − 1 with the weights of the step before, as the research fork
does). A stop request is seen at the last micro-batch, so checkpoints fall between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from training.config import PretrainConfig
from training.optimizers import keep_micro_batch_gradients, step_optimizers
from training.param_norms import logs_param_grad_norms, param_grad_norms
from training.state import AccumulationWindow, TrainState
from training.strategies import Gradients
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
    batch_done: bool = True  # the strategy took its last step on this batch
    update_done: bool = True  # an optimizer step ended here (not a window's earlier micro-batch)
    # This rank's rows of the update's last supervision step: the carry's examples
    # (``new_carry.current_data``, which a slot that did not halt took from an earlier batch)
    # with that step's ``preds``, for prediction images.
    predicted: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)


class _SkipBatchError(Exception):
    """Raised by the guard under ``nonfinite=skip``, on every rank together."""


# Flags among the metric sums, summed over ranks and popped before the metrics are formed.
_NON_FINITE_LOSS = "_non_finite_loss"
_NON_FINITE_NORM = "_non_finite_norm"
_STOP = "_stop"
_SCALED_OVERFLOW = "_scaled_overflow"  # loss scaling: a sparse gradient row was not finite


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
    state.slot_carries = [None] * len(state.slot_carries)
    state.nonfinite_streak += 1
    if state.nonfinite_streak >= config.nonfinite_max_skips:
        raise NonFiniteLossError(
            f"non-finite {what} at step {state.step}: {state.nonfinite_streak} steps in a row "
            f"(nonfinite_max_skips={config.nonfinite_max_skips}), the run does not recover; "
            "lower lr or set grad_clip_norm=..."
        )
    metrics = {"train/nonfinite_skipped": 1.0, "train/nonfinite_streak": state.nonfinite_streak}
    return StepResult(metrics, stop_requested, skipped=what)


def _skip_overflow(
    config: PretrainConfig,
    state: TrainState,
    reduced: dict[str, float],
    strategy_metrics: dict[str, float],
    stop_requested: bool,
) -> StepResult:
    """Loss scaling: a finite loss with a non-finite gradient means the scale was too large.
    The update is dropped as ``_skip_update`` drops it and the scale backs off, but this is
    not a non-finite event: ``nonfinite_streak`` stays as it was, and the ACT carry, from a
    finite forward, goes on. The step's losses are logged."""
    assert state.loss_scaler is not None
    for named in state.optimizers.values():
        named.optimizer.zero_grad()
    k = state.accumulation_steps
    metrics = normalize_metrics(reduced, config.global_batch_size * k, "train")
    metrics.update(strategy_metrics)
    metrics.update(state.loss_scaler.update(overflow=True))
    return StepResult(metrics, stop_requested)


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


def _is_loss(key: str) -> bool:
    """``lm_loss``, ``q_halt_loss``, ``kl_loss_weighted``, ``encoder/kl_loss``: sums over
    samples, which the global batch divides."""
    return "loss" in key.rsplit("/", 1)[-1].split("_")


def normalize_metrics(
    reduced: dict[str, float], global_batch_size: int, prefix: str
) -> dict[str, float]:
    """Metric sums over ranks → means, key by key.

    Losses (a name with a ``loss`` word) / ``global_batch_size`` (with gradient accumulation
    the caller passes the effective batch, the micro-batches' sums being added); a family's
    ``F/name`` / the family's own ``F/count`` (the rows it counted, e.g. ``all_steps/`` every
    row at every step, ``encoder/`` the encoded rows); bare names / ``count`` (upstream: the
    rows that halted).
    The ``F/count`` entries themselves are not returned; the bare ``count`` is (upstream logs
    it, always 1).
    """
    counts = {k.rsplit("/", 1)[0]: v for k, v in reduced.items() if k.endswith("/count")}
    means = {}
    for key, value in reduced.items():
        family = key.rsplit("/", 1)[0] if "/" in key else None
        if family is not None and key == f"{family}/count":
            continue
        if _is_loss(key):
            divisor = float(global_batch_size)
        elif family is None:
            divisor = reduced["count"]
        elif family in counts:
            divisor = counts[family]
        else:
            raise ValueError(f"metric {key!r} has no {family}/count to be divided by")
        means[f"{prefix}/{key}"] = value / max(divisor, 1.0)
    return means


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of several tensors together (0 for none)."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))


def beyond_schedule(config: PretrainConfig, state: TrainState) -> bool:
    """Whether the current step is past ``total_steps`` and so not trained on (upstream, and
    ``cap_total_steps=True``); the JD fork trains on every batch the data yields."""
    return config.cap_total_steps and state.step > state.total_steps


def decoder_frozen(config: PretrainConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based) trains only the encoder."""
    return step <= config.freeze_decoder_steps


@contextmanager
def _without_gradient(params: list[nn.Parameter]) -> Iterator[None]:
    """``params`` take no gradient inside: their ``.grad`` stays None, so the optimizers skip
    them (no update, no weight decay, no moment update), and their EMA shadow, equal to them
    since the run began, stays equal (``s + (1 - μ)·(p - s)`` with ``p = s``). The backward
    through them to the layers before still runs."""
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def train_batch(
    config: PretrainConfig,
    state: TrainState,
    batch: dict[str, torch.Tensor],
    dist_info: DistInfo,
    last_checkpoint: Path | None = None,
    *,
    stop_requested: bool = False,
) -> StepResult:
    """One global batch: an optimizer step, or with gradient accumulation one micro-batch of
    one (the step is taken at the window's last; the earlier ones return
    ``update_done=False`` and no metrics). ``stop_requested`` is this rank's wish to stop;
    the result of a step says whether any rank has one. A strategy with several steps per
    batch is called with the same batch until ``StepResult.batch_done``."""
    assert state.strategy is not None
    window = state.window
    if window.position == 0:
        state.step += 1
    if window.position < state.accumulation_steps - 1:
        _micro_batch(config, state, batch, dist_info, last_checkpoint)
        window.position += 1
        return StepResult(None, update_done=False)
    try:
        result = _optimizer_step(config, state, batch, dist_info, last_checkpoint, stop_requested)
    finally:
        window.reset()
    result.batch_done = state.strategy.advance()
    return result


def _enter_slot(state: TrainState, batch: dict[str, torch.Tensor]) -> None:
    """Make the current micro-batch slot's carry the active one (a new carry if it has none)."""
    if state.slot_carries:
        state.carry = state.slot_carries[state.window.position]
    if state.carry is None:
        state.carry = state.model.initial_carry(batch)


def _leave_slot(state: TrainState) -> None:
    if state.slot_carries:
        state.slot_carries[state.window.position] = state.carry


def _gradients(
    config: PretrainConfig,
    state: TrainState,
    batch: dict[str, torch.Tensor],
    last_checkpoint: Path | None,
) -> Gradients:
    """The strategy's gradients of one (micro-)batch, in its slot's carry (the decoder without
    gradient while frozen), its halted rows counted for hard-example sampling.
    ``_SkipBatchError`` (every rank together) when its loss is not finite under
    ``nonfinite=skip``."""
    strategy = state.strategy
    assert strategy is not None
    _enter_slot(state, batch)
    frozen = decoder_frozen(config, state.step)
    with _without_gradient(strategy.norm_groups["decoder"] if frozen else []):
        grads = strategy.compute_gradients(
            state, batch, finite_guard(config, state, last_checkpoint)
        )
    _leave_slot(state)
    if state.hard_examples is not None and not grads.rows_observed:
        state.hard_examples.observe_output(grads.out)
    return grads


def _micro_batch(
    config: PretrainConfig,
    state: TrainState,
    batch: dict[str, torch.Tensor],
    dist_info: DistInfo,
    last_checkpoint: Path | None,
) -> None:
    """A window's micro-batch before its last: gradients added up, nothing reduced or read."""
    window = state.window
    if beyond_schedule(config, state) or window.skip is not None:
        return
    batch = {k: v.to(dist_info.device, non_blocking=True) for k, v in batch.items()}
    try:
        grads_out = _gradients(config, state, batch, last_checkpoint)
    except _SkipBatchError:
        # Every rank raised together; the step at the window's end skips the update.
        window.skip = "loss"
        return
    _add_to_window(window, grads_out)
    if state.loss_scaler is not None:
        state.loss_scaler.watch_sparse()
    keep_micro_batch_gradients(state.optimizers)
    if state.ema is not None and config.ema_per_micro_batch:
        state.ema.update(state.raw_model)


def _add_to_window(window: AccumulationWindow, grads: Gradients) -> None:
    """Add a micro-batch's metric sums and non-finite flag to the window's (device tensors)."""
    for key, value in grads.out.metrics.items():
        value = value.detach()
        window.metric_sums[key] = (
            window.metric_sums[key] + value if key in window.metric_sums else value
        )
    if grads.unchecked_non_finite is not None:
        flag = grads.unchecked_non_finite.detach()
        window.non_finite = flag if window.non_finite is None else window.non_finite + flag
    window.strategy_metrics.append(dict(grads.metrics))


def _window_metrics(
    window: AccumulationWindow, grads: Gradients
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, float]]:
    """(metric sums, non-finite flag, the strategy's metrics) of the whole window: with no
    earlier micro-batch the last one's own, unchanged; otherwise sums over the micro-batches
    and the mean of each strategy metric."""
    if not window.strategy_metrics:
        return dict(grads.out.metrics), grads.unchecked_non_finite, grads.metrics
    _add_to_window(window, grads)
    runs = window.strategy_metrics
    means = {k: sum(m[k] for m in runs) / len(runs) for k in runs[-1] if all(k in m for m in runs)}
    return dict(window.metric_sums), window.non_finite, means


def _optimizer_step(
    config: PretrainConfig,
    state: TrainState,
    batch: dict[str, torch.Tensor],
    dist_info: DistInfo,
    last_checkpoint: Path | None,
    stop_requested: bool,
) -> StepResult:
    strategy = state.strategy
    assert strategy is not None
    if beyond_schedule(config, state):
        return StepResult(None, any_rank(stop_requested, dist_info.device))
    batch = {k: v.to(dist_info.device, non_blocking=True) for k, v in batch.items()}
    if state.window.skip is not None:
        return _skip_update(
            config, state, state.window.skip, any_rank(stop_requested, dist_info.device)
        )
    try:
        grads_out = _gradients(config, state, batch, last_checkpoint)
    except _SkipBatchError:
        return _skip_update(config, state, "loss", any_rank(stop_requested, dist_info.device))
    window_sums, non_finite, strategy_metrics = _window_metrics(state.window, grads_out)
    params = [p for p in state.raw_model.parameters() if p.requires_grad]
    if not grads_out.reduced_across_ranks:
        reduce_gradients(params)
    with_grad = [p for p in params if p.grad is not None]
    scaler = state.loss_scaler
    if scaler is not None:  # the norm, clipping and optimizers see the unscaled loss's gradients
        scaler.watch_sparse()
        scaler.unscale_([p.grad for p in with_grad])
    # The global norm after the reduction, logged before any clipping, and the norms of the
    # family's groups, which ride along in the same host read.
    norms: dict[str, torch.Tensor] = {}
    if with_grad:
        norms["train/grad_norm"] = _norm([p.grad for p in with_grad], dist_info.device)
        for name, group in strategy.norm_groups.items():
            members = {id(p) for p in group}
            grads = [p.grad for p in with_grad if id(p) in members]
            norms[f"train/grad_norm/{name}"] = _norm(grads, dist_info.device)
        if dist_info.is_main and logs_param_grad_norms(config, state.step):
            norms.update(param_grad_norms(state.raw_model))
    # One all-reduce and one host read per step: the metric sums and the flags are summed over
    # ranks (so every rank takes the same decision), the norms ride along, and all are read
    # together.
    sums = window_sums
    if non_finite is not None:
        sums[_NON_FINITE_LOSS] = non_finite
    if norms:
        sums[_NON_FINITE_NORM] = ~torch.isfinite(norms["train/grad_norm"])
    sums[_STOP] = torch.tensor(float(stop_requested))
    if scaler is not None:
        sums[_SCALED_OVERFLOW] = scaler.take_overflow_flag(dist_info.device)
    keys = sorted(sums)
    values = torch.stack([sums[k].to(dist_info.device, torch.float32) for k in keys])
    all_reduce_sum_(values)
    if norms:
        extra = [n.to(dist_info.device, torch.float32).reshape(1) for n in norms.values()]
        values = torch.cat([values, *extra])
    host = values.cpu().tolist()
    reduced = dict(zip(keys, host, strict=False))
    stop = reduced.pop(_STOP) > 0
    bad_loss = reduced.pop(_NON_FINITE_LOSS, 0.0) > 0
    bad_norm = reduced.pop(_NON_FINITE_NORM, 0.0) > 0
    bad_norm |= reduced.pop(_SCALED_OVERFLOW, 0.0) > 0
    if scaler is not None and bad_norm and not bad_loss and scaler.can_back_off:
        return _skip_overflow(config, state, reduced, strategy_metrics, stop)
    if bad_loss or bad_norm:
        what = "loss" if bad_loss else "gradient norm"
        if config.nonfinite == "stop":
            _stop_non_finite(what, state, last_checkpoint)
        return _skip_update(config, state, what, stop)
    state.nonfinite_streak = 0
    if config.grad_clip_norm is not None and with_grad:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)

    lr = step_optimizers(state.optimizers, state.step, state.total_steps, config)
    if state.ema is not None:
        state.ema.update(state.raw_model)
    scale_metrics = scaler.update(overflow=False) if scaler is not None else {}

    k = state.accumulation_steps
    metrics = normalize_metrics(reduced, config.global_batch_size * k, "train")
    metrics.update(strategy_metrics)
    metrics["train/lr"] = lr
    metrics.update(scale_metrics)
    if k > 1:
        metrics["train/micro_batches"] = float(k)
    metrics.update(zip(norms, host[len(keys) :], strict=True))
    if config.freeze_decoder_steps:
        metrics["train/decoder_frozen"] = float(decoder_frozen(config, state.step))
    out = grads_out.out
    predicted = {**out.new_carry.current_data, "preds": out.outputs["preds"]}
    return StepResult(metrics, stop, predicted=predicted)
