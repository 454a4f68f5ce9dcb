"""Per-sample gradients of the model's weights in one ordinary backward pass.

Per-sample objectives (IWRM: one objective per training sample) need the Jacobian ``[B, n]`` of
the B per-sample losses. For the layers of this model family it costs no more than the summed
gradient: a linear layer's weight gradient is ``Σ_b Σ_t g_bt x_btᵀ``, and keeping the sum over b
apart (``bmm`` instead of one ``matmul``) does the same arithmetic. Inside ``PerSampleGradients``,
``CastedLinear``, ``CastedEmbedding`` and learned positions route through autograd functions
whose backward writes ``[B, *param.shape]`` into the collector instead of the summed gradient
into ``param.grad``; the input gradients flow as usual. Summed over a module's every use, which
is what weight-tied recursion needs.

This is exact when samples do not interact, as in every architecture here: attention, RMS norm
and the token MLP mix positions of one sample only, the ACT carry is per slot, and the puzzle
embedding's batch rows (``local_weights``) belong one to each slot. Only the forward runs inside
the context; the backward may run after it, any number of times (each adds into the buffers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVE: list[PerSampleGradients] = []
# Layer classes whose own parameters route through the collectors (they register themselves, so
# that this module needs no import of theirs).
_COLLECTING_LAYERS: list[type[nn.Module]] = []

LayerT = TypeVar("LayerT", bound=type[nn.Module])


def collecting_layer(cls: LayerT) -> LayerT:
    """Class decorator: ``cls``'s own parameters (not its children's) get per-sample gradients,
    because its forward sends every use of them through ``linear``, ``embedding`` or
    ``add_broadcast`` when ``active`` returns a collector."""
    _COLLECTING_LAYERS.append(cls)
    return cls


class PerSampleGradients:
    """Collects per-sample gradients of ``params`` over the forwards run inside ``with``.

    The gradients accumulate in one float32 buffer ``[B, n]`` laid out in the order of
    ``params`` (each parameter a block of columns, viewed as ``[B, *shape]``); ``flat()`` is
    that buffer, the per-sample Jacobian, with zero columns for parameters no collected op
    used, and ``zero_()`` starts a new accumulation. Parameters outside ``params`` that require
    grad get their usual summed ``.grad``.
    """

    def __init__(self, params: Sequence[Tensor], batch_size: int) -> None:
        self.params = list(params)
        self.batch_size = batch_size
        n = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else None
        self._buffer = torch.zeros(batch_size, n, dtype=torch.float32, device=device)
        self._views: dict[int, Tensor] = {}
        offset = 0
        for p in self.params:
            block = self._buffer[:, offset : offset + p.numel()]
            self._views[id(p)] = block.view(batch_size, *p.shape)
            offset += p.numel()

    def __enter__(self) -> PerSampleGradients:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)

    def tracks(self, param: Tensor | None) -> bool:
        return param is not None and id(param) in self._views

    def add(self, param: Tensor, grad_B: Tensor) -> None:
        """Add ``grad_B`` [B, *param.shape] (any float dtype) to ``param``'s block."""
        if grad_B.shape[0] != self.batch_size:
            raise ValueError(
                f"per-sample gradient of a {tuple(param.shape)} parameter has batch "
                f"{grad_B.shape[0]}, expected {self.batch_size}: every collected op must keep "
                "the sample axis first"
            )
        self._views[id(param)].add_(grad_B)

    def zero_(self) -> None:
        self._buffer.zero_()

    def flat(self) -> Tensor:
        """[B, n] float32, row b the gradient of sample b's loss: the buffer itself, so read it
        before the next ``zero_()``."""
        return self._buffer


def active(*params: Tensor | None) -> PerSampleGradients | None:
    """The collector that should see an op on ``params`` now (grad mode on), or None."""
    if not _ACTIVE or not torch.is_grad_enabled():
        return None
    sink = _ACTIVE[-1]
    return sink if any(sink.tracks(p) for p in params) else None


def _summed_or_collected(
    sink: PerSampleGradients, param: Tensor | None, grad_B: Tensor, needed: bool
) -> Tensor | None:
    """Per-sample into the sink for a tracked parameter; the summed gradient for an untracked
    one that needs it; nothing otherwise."""
    if param is None:
        return None
    if sink.tracks(param):
        sink.add(param, grad_B)
        return None
    return grad_B.sum(0).to(param.dtype) if needed else None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, sink: PerSampleGradients
    ) -> Tensor:
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.sink, ctx.weight, ctx.bias = sink, weight, bias
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        sink, needs = ctx.sink, ctx.needs_input_grad
        B = g.shape[0]
        g_BTo = g.reshape(B, -1, g.shape[-1])
        grad_x = g @ w if needs[0] else None
        grad_w = grad_b = None
        if sink.tracks(ctx.weight) or needs[1]:
            grad_w_B = torch.bmm(g_BTo.transpose(1, 2), x.reshape(B, -1, x.shape[-1]))
            grad_w = _summed_or_collected(sink, ctx.weight, grad_w_B, needs[1])
        if ctx.bias is not None and (sink.tracks(ctx.bias) or needs[2]):
            grad_b = _summed_or_collected(sink, ctx.bias, g_BTo.sum(1), needs[2])
        return grad_x, grad_w, grad_b, None


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, ids: Tensor, weight: Tensor, dtype: torch.dtype, sink: PerSampleGradients
    ) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.sink, ctx.weight = sink, weight
        return F.embedding(ids, weight.to(dtype))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        B, D = g.shape[0], g.shape[-1]
        index = ids.reshape(B, -1, 1).to(torch.long).expand(-1, -1, D)
        grad_w = torch.zeros(B, *ctx.weight.shape, dtype=torch.float32, device=g.device)
        grad_w.scatter_add_(1, index, g.reshape(B, -1, D).to(torch.float32))
        grad_w = _summed_or_collected(ctx.sink, ctx.weight, grad_w, ctx.needs_input_grad[1])
        return None, grad_w, None, None


class _AddBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, sink: PerSampleGradients) -> Tensor:
        ctx.sink, ctx.weight = sink, weight
        return x + weight.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        grad_w = _summed_or_collected(ctx.sink, ctx.weight, g, ctx.needs_input_grad[1])
        return (g if ctx.needs_input_grad[0] else None), grad_w, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, sink: PerSampleGradients) -> Tensor:
    """``F.linear(x, weight, bias)`` in ``x``'s dtype; x [B, ..., in] → [B, ..., out]."""
    return _Linear.apply(x, weight, bias, sink)


def embedding(ids: Tensor, weight: Tensor, dtype: torch.dtype, sink: PerSampleGradients) -> Tensor:
    """``F.embedding(ids, weight.to(dtype))``; ids [B, ...] → [B, ..., D]."""
    return _Embedding.apply(ids, weight, dtype, sink)


def add_broadcast(x: Tensor, weight: Tensor, sink: PerSampleGradients) -> Tensor:
    """``x + weight`` with ``weight`` [...] shared by every sample of x [B, ...]."""
    return _AddBroadcast.apply(x, weight, sink)


def uncollected_parameters(model: nn.Module) -> Iterator[str]:
    """Names of trainable parameters that no collecting layer (``collecting_layer``) owns: they
    would get no per-sample gradient, so a model with any cannot use ``PerSampleGradients``."""
    layers = tuple(_COLLECTING_LAYERS)
    owned = {
        id(p) for m in model.modules() if isinstance(m, layers) for p in m.parameters(recurse=False)
    }
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            yield name
