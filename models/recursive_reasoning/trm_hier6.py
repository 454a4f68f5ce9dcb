"""TRM "multi-scale z" ablation (paper Table 2): six latents z_L1..z_L6.

Upstream ``models/recursive_reasoning/trm_hier6.py``, ``TinyRecursiveReasoningModel_ACTV1``.

Inner step i (i < L_cycles <= 6) replaces latent i: z_Li ← f(Σ_j z_Lj + y + x), the sum taken
afresh each step; then y ← f(y + Σ_j z_Lj). T outer cycles, the first T−1 without gradient.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from models.layers import CosSin
from models.recursive_reasoning.act import ACTModel
from models.recursive_reasoning.common import (
    Batch,
    InnerCarry,
    InnerOutput,
    ModelDims,
    RecursiveInner,
)
from models.recursive_reasoning.configs import TRMHier6Config
from models.registry import MODELS

NUM_LATENTS = 6
LATENTS = [f"z_L{i}" for i in range(1, NUM_LATENTS + 1)]


class TinyRecursiveReasoningModel_ACTV1_Inner(RecursiveInner):
    carry_inits: ClassVar[dict[str, str]] = {
        "z_H": "H_init",
        **{f"z_L{i}": f"L{i}_init" for i in range(1, NUM_LATENTS + 1)},
    }

    def __init__(self, config: TRMHier6Config, dims: ModelDims) -> None:
        super().__init__(config, dims, config.puzzle_emb_len)
        self.L_level = self.blocks(config.L_layers)
        for buffer in self.carry_inits.values():
            self._init_buffer(buffer)
        self._init_q_head()

    def _cycle(
        self,
        z_H: torch.Tensor,
        z_L: list[torch.Tensor],
        x: torch.Tensor,
        cos_sin: CosSin | None,
        h: int,
    ) -> torch.Tensor:
        for l_step in range(self.config.L_cycles):
            z_L[l_step] = self.L_level(sum(z_L), z_H + x, cos_sin=cos_sin)
            self.record(LATENTS[l_step], h, l_step, z_L[l_step])
        z_H = self.L_level(z_H, sum(z_L), cos_sin=cos_sin)
        self.record("z_H", h, None, z_H)
        return z_H

    def forward(self, carry: InnerCarry, batch: Batch) -> InnerOutput:
        """carry {z_H, z_L1..z_L6} [B, P + S, D] → detached carry, logits [B, S, V],
        q_halt/q_continue [B]."""
        cos_sin = self.cos_sin()
        x = self.input_embeddings(batch)
        z_H, z_L = carry["z_H"], [carry[name] for name in LATENTS]
        with torch.no_grad():
            for h in range(self.config.H_cycles - 1):
                z_H = self._cycle(z_H, z_L, x, cos_sin, h)
        z_H = self._cycle(z_H, z_L, x, cos_sin, self.config.H_cycles - 1)
        new_carry = {
            "z_H": z_H.detach(),
            **{n: z.detach() for n, z in zip(LATENTS, z_L, strict=True)},
        }
        return self.readout(new_carry, z_H)


class TinyRecursiveReasoningModel_ACTV1(ACTModel):
    """Multi-scale TRM with ACT."""

    def __init__(self, config: TRMHier6Config, dims: ModelDims) -> None:
        super().__init__(config, TinyRecursiveReasoningModel_ACTV1_Inner(config, dims))


MODELS.add("trm_hier6", TinyRecursiveReasoningModel_ACTV1)
