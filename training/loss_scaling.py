"""Dynamic loss scaling for ``forward_dtype=float16``: the scale, its growth and back-off.

float16 keeps 5 exponent bits, so small gradients of the activations underflow to zero in the
backward. The loss is multiplied by a scale ``s`` before its backward (``training.strategies``
folds ``s`` into its division by the batch), which lifts every activation gradient by ``s``;
``training.step`` divides the parameters' gradients by ``s`` after the cross-rank reduction and
before the norm, clipping and the optimizers, so they see the gradients of the unscaled loss.
A gradient that is not finite means the scale was too large: the update is skipped (weights,
optimizer moments and EMA stay as they were), the scale halves and the run goes on; this does
not count as a non-finite event of ``nonfinite=stop|skip``. After ``growth_interval`` finite
steps in a row the scale doubles. The decision rides on the step's one all-reduce of flags, so
every rank takes the same. These are ``torch.amp.GradScaler``'s semantics and defaults (growth
×2, back-off ×0.5, a growth that would overflow float32 is not taken).

``GradScaler`` itself is not used: it decides per optimizer, on this rank's gradients alone,
with a host read of its own inside ``step``, and it skips by not calling the optimizer, whereas
here the skip must be one decision of every rank taken in the step's single all-reduce, must
also cover the puzzle-embedding rows (buffers that live outside any parameter list and that
sign-SGD would turn into NaN rows) including those set aside by gradient accumulation, and must
leave the EMA untouched too.

Scales are powers of two (``loss_scale_init`` is refused otherwise), so scaling and unscaling
are exact in binary floating point: with float32 activations a scaled run takes the same
updates, bit for bit, as an unscaled one. The sparse puzzle-embedding gradients are not
unscaled: sign-SGD reads only their sign, which a positive scale does not change.

Jacobian descent is refused: its aggregators (UPGrad's regularised dual-cone projection, the
research fork's fall-back to the mean below a Gramian threshold) are not invariant to the
scale of the Jacobian, so a scaled loss would change the update and not only its precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from models.sparse_embedding import CastedSparseEmbedding
from training.config import PretrainConfig
from utils.schema import ConfigError

# Below this a float16 gradient could not be lifted out of the subnormals anyway (2**-24 is
# float16's smallest positive value); a non-finite gradient at this scale is a real one.
MIN_SCALE = 2.0**-24
_FLOAT32_MAX = torch.finfo(torch.float32).max


class DynamicLossScaler:
    """The loss scale and its count of finite steps in a row (GradScaler's growth tracker).

    Args:
        init_scale: the first scale, a power of two.
        growth_interval: finite steps in a row after which the scale doubles.
        puzzle_emb: the model's row-sparse puzzle table, whose gradient rows ``watch_sparse``
            checks; None for a model without one.
    """

    growth_factor = 2.0
    backoff_factor = 0.5

    def __init__(
        self,
        init_scale: float,
        growth_interval: int,
        puzzle_emb: CastedSparseEmbedding | None = None,
    ) -> None:
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.puzzle_emb = puzzle_emb
        self._sparse_bad: torch.Tensor | None = None

    @property
    def can_back_off(self) -> bool:
        """Whether a non-finite gradient may still be blamed on the scale."""
        return self.scale * self.backoff_factor >= MIN_SCALE

    def watch_sparse(self) -> None:
        """Note whether the puzzle table's current gradient rows [B, D] are all finite (once per
        micro-batch, before its rows are set aside); read by ``take_overflow_flag``."""
        grad = self.puzzle_emb.local_weights.grad if self.puzzle_emb is not None else None
        if grad is None:
            return
        bad = (~torch.isfinite(grad).all()).to(torch.float32)
        self._sparse_bad = bad if self._sparse_bad is None else self._sparse_bad + bad

    def take_overflow_flag(self, device: torch.device) -> torch.Tensor:
        """A 0-d float32 tensor, > 0 when some watched sparse gradient row was not finite since
        the last call; the dense gradients are judged by their norm in ``training.step``."""
        flag = self._sparse_bad
        self._sparse_bad = None
        return flag if flag is not None else torch.zeros((), device=device)

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """Divide every gradient by the scale, in place (exact: the scale is a power of two)."""
        if grads and self.scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> dict[str, float]:
        """After a step: back off on an overflow (restarting the count), otherwise count the
        finite step and grow the scale once ``growth_interval`` of them are in a row. Returns
        the step's metrics: ``train/loss_scale`` (the scale its backward used) and
        ``train/loss_scale_skipped`` (1.0 when the overflow dropped its update)."""
        metrics = {"train/loss_scale": self.scale, "train/loss_scale_skipped": float(overflow)}
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return metrics
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            grown = self.scale * self.growth_factor
            if grown <= _FLOAT32_MAX:
                self.scale = grown
            self.good_steps = 0
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """``{"scale": float, "good_steps": int}``."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])


def build_loss_scaler(
    config: PretrainConfig, strategy: str, puzzle_emb: CastedSparseEmbedding | None
) -> DynamicLossScaler | None:
    """The run's scaler when ``config.loss_scaled`` (None otherwise); ``strategy`` is the
    registered step-strategy name. Refuses Jacobian descent and a scale that is not a power of
    two, each in one line."""
    if not config.loss_scaled:
        return None
    if strategy == "jacobian_descent":
        raise ConfigError(
            f"loss_scaling: Jacobian descent (objective={config.objective.name}) aggregates "
            "with a solver that is not invariant to the loss scale; set loss_scaling=none "
            "(float16 gradients then go unscaled), arch.forward_dtype=bfloat16, or objective=sum"
        )
    mantissa, _ = math.frexp(config.loss_scale_init)
    if mantissa != 0.5:
        raise ConfigError(
            f"loss_scale_init: {config.loss_scale_init:g} is not a power of two, so unscaling "
            "would round the gradients; use one, e.g. 65536 (2**16)"
        )
    return DynamicLossScaler(config.loss_scale_init, config.loss_scale_growth_interval, puzzle_emb)
