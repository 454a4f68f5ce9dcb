"""The AdamATan2 optimizer and the learning-rate schedule of the TRM training loop.

``AdamATan2`` reproduces the fused CUDA kernel of Sapient's ``adam-atan2`` package (0.0.3, the one
upstream installs): decoupled weight decay, Adam moments, and ``atan2`` in place of the division
by ``sqrt(v) + eps``. The package's kernel is used when its compiled extension
(``adam_atan2_backend``) is importable and the parameters live on a CUDA device; everywhere else
(CPU, MPS, a CUDA machine without the extension) the same math runs in plain PyTorch.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

_BACKEND_MODULE = "adam_atan2_backend"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _fused_backend() -> ModuleType | None:
    """The compiled extension of the ``adam-atan2`` package, or ``None`` when it is absent."""
    try:
        return importlib.import_module(_BACKEND_MODULE)
    except ImportError:
        return None


def is_fused_available() -> bool:
    """Whether the fused CUDA kernel of the ``adam-atan2`` package can be imported."""
    return _fused_backend() is not None


class AdamATan2(torch.optim.Optimizer):
    """Adam with ``atan2`` instead of ``m / (sqrt(v) + eps)``, as in the ``adam-atan2`` kernel.

    Per parameter, with the 1-based step ``t`` counted in ``state["step"]``::

        p ← p·(1 − lr·wd)
        m ← lerp(m, g, 1 − β1)
        v ← lerp(v, g², 1 − β2)
        p ← p − lr / (1 − β1^t) · atan2(m, sqrt(v) / sqrt(1 − β2^t))

    The first bias correction scales the step, outside ``atan2``, exactly as the package's kernel
    does. There is no epsilon and ``atan2`` is unscaled (a = b = 1). ``lr = 0`` is allowed (the
    warm-up starts there) and leaves the parameters unchanged while the moments still move.

    Args:
        params: parameters or parameter groups; grads of any shape, dense only.
        lr: learning rate, ``>= 0``; the training loop overwrites ``param_groups[i]["lr"]``.
        betas: ``(β1, β2)``, each in ``[0, 1)``.
        weight_decay: decoupled weight decay, ``>= 0`` (multiplied by ``lr``).
        fused: ``None`` uses the package's CUDA kernel for groups whose parameters are all on
            CUDA when the package is installed; ``False`` never uses it; ``True`` requires it.

    State per parameter: ``step`` (float32 scalar tensor on the parameter's device, as in the
    package), ``exp_avg`` and ``exp_avg_sq`` (like the parameter).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        *,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor):
            raise TypeError("AdamATan2 supports a float lr only (the fused kernel takes a double)")
        if not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate {lr}: it must be a finite number >= 0")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas {betas}: expected a pair (beta1, beta2)")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(
                    f"Invalid beta parameter at index {index}: {beta}; need 0 <= beta < 1"
                )
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(
                f"Invalid weight_decay {weight_decay}: it must be a finite number >= 0"
            )
        if fused is True and not is_fused_available():
            raise RuntimeError(
                f"AdamATan2(fused=True) needs the CUDA extension `{_BACKEND_MODULE}` of the "
                "`adam-atan2` package, which is not importable. Install it on a CUDA machine with "
                "`pip install adam-atan2==0.0.3 --no-build-isolation`, or pass fused=None (use it "
                "when available) or fused=False (pure PyTorch)."
            )
        self.fused = fused
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep ``fused`` too.
        return {**super().__getstate__(), "fused": self.fused}

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Collect the parameters with a gradient and their state, creating the state lazily."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamATan2 does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                step = state["step"]
                if (
                    not isinstance(step, Tensor)
                    or step.device != p.device
                    or step.dtype != torch.float32
                ):
                    # A state loaded with map_location="cpu" keeps "step" on the CPU; the fused
                    # kernel reads a float32 counter on the parameter's device.
                    state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    def _use_fused(self, params: list[Tensor]) -> bool:
        if self.fused is False:
            return False
        all_cuda = all(p.is_cuda for p in params)
        if self.fused is True and not all_cuda:
            raise ValueError(
                "AdamATan2(fused=True) got parameters that are not on a CUDA device; move the "
                "model to CUDA before building the optimizer, or pass fused=None."
            )
        return all_cuda and is_fused_available()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update every parameter that has a gradient; return ``closure()`` if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            update = _adam_atan2_fused if self._use_fused(params) else _adam_atan2_pure
            update(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                weight_decay=float(group["weight_decay"]),
            )
        return loss


def _group_indices(
    tensors: list[Tensor], steps: list[Tensor] | None = None
) -> list[tuple[float, list[int]]]:
    """Indices of ``tensors`` grouped by device and dtype, and by step value when ``steps`` is
    given (then each group comes with its step, else with 0)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    step_values = [0.0] * len(tensors) if steps is None else _steps_as_floats(steps)
    for i, (t, s) in enumerate(zip(tensors, step_values, strict=True)):
        groups.setdefault((t.device, t.dtype, s), []).append(i)
    return [(key[2], indices) for key, indices in groups.items()]


def _steps_as_floats(steps: list[Tensor]) -> list[float]:
    """The values of scalar step tensors, with one host sync per device rather than per tensor."""
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(steps):
        by_device.setdefault(s.device, []).append(i)
    values = [0.0] * len(steps)
    for indices in by_device.values():
        stacked = torch.stack([steps[i].reshape(()) for i in indices]).tolist()
        for i, value in zip(indices, stacked, strict=True):
            values[i] = float(value)
    return values


def _adam_atan2_pure(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """The kernel's math with ``torch._foreach`` ops, in float32 for half-precision tensors."""
    torch._foreach_add_(steps, 1.0)
    for t, indices in _group_indices(params, steps):
        bias_correction1 = 1.0 - beta1**t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        ps = [params[i] for i in indices]
        gs = [grads[i] for i in indices]
        ms = [exp_avgs[i] for i in indices]
        vs = [exp_avg_sqs[i] for i in indices]
        # The kernel computes in float32 ("opmath") and rounds once when storing.
        upcast = ps[0].dtype in _HALF_DTYPES
        if upcast:
            ps, gs, ms, vs = ([x.float() for x in xs] for xs in (ps, gs, ms, vs))

        decay = 1.0 - lr * weight_decay
        if decay != 1.0:
            torch._foreach_mul_(ps, decay)
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_lerp_(vs, torch._foreach_mul(gs, gs), 1.0 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        directions = [torch.atan2(m, d) for m, d in zip(ms, denoms, strict=True)]
        torch._foreach_add_(ps, directions, alpha=-lr / bias_correction1)

        if upcast:
            for i, p, m, v in zip(indices, ps, ms, vs, strict=True):
                params[i].copy_(p)
                exp_avgs[i].copy_(m)
                exp_avg_sqs[i].copy_(v)


def _adam_atan2_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One call of the package's kernel per (device, dtype) group, as its own ``step`` does.

    ``adam_atan2_cuda_impl_(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2,
    weight_decay)`` updates the tensors in place and reads, but does not advance, the float32
    step counters; they are incremented here first.
    """
    backend = _fused_backend()
    if backend is None:
        raise RuntimeError(f"`{_BACKEND_MODULE}` is not importable")
    for _, indices in _group_indices(params):
        group_steps = [steps[i] for i in indices]
        torch._foreach_add_(group_steps, 1.0)
        backend.adam_atan2_cuda_impl_(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            group_steps,
            lr,
            beta1,
            beta2,
            weight_decay,
        )


def cosine_schedule_with_warmup_lr_lambda(
    current_step: int,
    *,
    base_lr: float,
    num_warmup_steps: int,
    num_training_steps: int,
    min_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> float:
    """Upstream's learning rate at ``current_step``: linear warm-up from 0, then cosine decay.

    ``step < warmup``: ``base_lr·step/warmup``. Afterwards, with
    ``progress = (step − warmup) / max(1, total − warmup)``:
    ``base_lr·(min_ratio + max(0, (1 − min_ratio)·½·(1 + cos(2π·num_cycles·progress))))``, which
    reaches ``base_lr·min_ratio`` at ``step == total`` for the default half cycle. Progress is
    not clamped: past ``total`` (a run that trains on every batch, ``cap_total_steps=False``)
    the cosine goes on and the lr rises again, as in the JD fork's copy of this function.
    """
    if num_warmup_steps < 0 or num_training_steps < 0:
        raise ValueError(
            f"num_warmup_steps ({num_warmup_steps}) and num_training_steps ({num_training_steps}) "
            "must be >= 0"
        )
    if current_step < num_warmup_steps:
        return base_lr * float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(
        max(1, num_training_steps - num_warmup_steps)
    )
    cosine = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return base_lr * (min_ratio + max(0.0, (1.0 - min_ratio) * cosine))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group of ``optimizer`` (done before each step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
