"""TRM: TinyRecursiveReasoningModel_ACTV1 (upstream ``models/recursive_reasoning/trm.py``).

One shared network f (``L_level``, ``L_layers`` blocks) updates the latent z (``z_L``) and the
answer y (``z_H``). One supervision step, with x the input embedding:

    repeat T−1 times without gradient:  (n times z ← f(z + y + x)); y ← f(y + z)
    once with gradient:                 (n times z ← f(z + y + x)); y ← f(y + z)

T = ``H_cycles``, n = ``L_cycles``. The carry (y, z) is detached between supervision steps;
logits come from ``lm_head(y)`` without the prefix and the Q head reads y's first position.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from models.recursive_reasoning.act import ACTModel
from models.recursive_reasoning.common import (
    Batch,
    InnerCarry,
    InnerOutput,
    ModelDims,
    RecursiveInner,
)
from models.recursive_reasoning.configs import TRMConfig
from models.registry import MODELS


class TinyRecursiveReasoningModel_ACTV1_Inner(RecursiveInner):
    carry_inits: ClassVar[dict[str, str]] = {"z_H": "H_init", "z_L": "L_init"}

    def __init__(self, config: TRMConfig, dims: ModelDims) -> None:
        super().__init__(config, dims, config.puzzle_emb_len)
        self.L_level = self.blocks(config.L_layers)
        self._init_buffer("H_init")
        self._init_buffer("L_init")
        self._init_q_head()

    def _cycle(
        self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, cos_sin: object, h: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for l_step in range(self.config.L_cycles):
            z_L = self.L_level(z_L, z_H + x, cos_sin=cos_sin)
            self.record("z_L", h, l_step, z_L)
        z_H = self.L_level(z_H, z_L, cos_sin=cos_sin)
        self.record("z_H", h, None, z_H)
        return z_H, z_L

    def forward(self, carry: InnerCarry, batch: Batch) -> InnerOutput:
        """carry {z_H, z_L} [B, P + S, D] → detached carry, logits [B, S, V], q_halt/q_continue
        [B] (upstream ``TinyRecursiveReasoningModel_ACTV1_Inner.forward``)."""
        cos_sin = self.cos_sin()
        x = self.input_embeddings(batch)
        z_H, z_L = carry["z_H"], carry["z_L"]
        with torch.no_grad():
            for h in range(self.config.H_cycles - 1):
                z_H, z_L = self._cycle(z_H, z_L, x, cos_sin, h)
        # Full backpropagation through the last recursion only.
        z_H, z_L = self._cycle(z_H, z_L, x, cos_sin, self.config.H_cycles - 1)
        return self.readout({"z_H": z_H.detach(), "z_L": z_L.detach()}, z_H)


class TinyRecursiveReasoningModel_ACTV1(ACTModel):
    """TRM with ACT; ``forward(carry, batch) -> (carry, outputs)`` is one supervision step."""

    def __init__(self, config: TRMConfig, dims: ModelDims) -> None:
        super().__init__(config, TinyRecursiveReasoningModel_ACTV1_Inner(config, dims))


MODELS.add("trm", TinyRecursiveReasoningModel_ACTV1)
