"""Exponential moving average of the trainable parameters (the weights TRM evaluates)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

_COMPILE_PREFIX = "_orig_mod."


def unwrap_module(module: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``.module``) wrappers."""
    while True:
        # torch.compile's OptimizedModule keeps the original as the submodule ``_orig_mod``;
        # testing for it avoids importing torch._dynamo.
        if isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        elif isinstance(module, nn.DataParallel | nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


class EMAHelper:
    """Shadow copy ``s`` of every parameter that requires grad, updated as ``s ← μ·s + (1 − μ)·p``.

    Buffers (the puzzle-embedding table, ``H_init``/``L_init``) are not averaged. Names are those
    of the unwrapped module, so compiled, DDP and plain models share one shadow and checkpoint.

    Args:
        mu: the decay μ in ``[0, 1]`` (upstream's ``ema_rate``, 0.999).
    """

    def __init__(self, mu: float = 0.999) -> None:
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"Invalid EMA decay mu={mu}: it must be in [0, 1]")
        self.mu = mu
        self.shadow: dict[str, Tensor] = {}

    @staticmethod
    def _trainable(module: nn.Module) -> dict[str, Tensor]:
        return {name: p for name, p in unwrap_module(module).named_parameters() if p.requires_grad}

    def _matched(self, module: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """Pairs ``(shadow, parameter)``; raise if the names or shapes differ from the shadow's."""
        params = self._trainable(module)
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            unexpected = sorted(params.keys() - self.shadow.keys())
            raise ValueError(
                "EMAHelper: the module's trainable parameters differ from the registered ones "
                f"(missing from the module: {missing[:5]}, not registered: {unexpected[:5]}); "
                "call register() on this model, or load a shadow saved from the same architecture."
            )
        pairs = []
        for name, p in params.items():
            s = self.shadow[name]
            if s.shape != p.shape:
                raise ValueError(
                    f"EMAHelper: shadow of {name!r} has shape {tuple(s.shape)}, the parameter "
                    f"{tuple(p.shape)}"
                )
            if s.device != p.device:
                # A shadow loaded with map_location="cpu" follows the model to its device.
                s = self.shadow[name] = s.to(p.device)
            pairs.append((s, p))
        return pairs

    def register(self, module: nn.Module) -> None:
        """Start the shadow from a copy of the module's trainable parameters."""
        self.shadow = {name: p.detach().clone() for name, p in self._trainable(module).items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """``s ← (1 − μ)·p + μ·s`` for every registered parameter."""
        pairs = self._matched(module)
        if pairs:
            shadows, params = zip(*pairs, strict=True)
            torch._foreach_lerp_(list(shadows), list(params), 1.0 - self.mu)

    @torch.no_grad()
    def ema(self, module: nn.Module) -> None:
        """Copy the shadow into the module's parameters, in place."""
        for s, p in self._matched(module):
            p.copy_(s)

    def ema_copy(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` (wrappers included) holding the shadow weights."""
        module_copy = copy.deepcopy(module)
        self.ema(module_copy)
        return module_copy

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow, by parameter name (no wrapper prefixes)."""
        return dict(self.shadow)

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Replace the shadow; ``_orig_mod.`` prefixes of compiled models are stripped."""
        shadow = {}
        for name, value in state_dict.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"EMAHelper state for {name!r} is a {type(value).__name__}")
            shadow[name.removeprefix(_COMPILE_PREFIX)] = value.detach().clone()
        self.shadow = shadow
