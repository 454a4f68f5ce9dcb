"""TRM "single z" ablation (paper Table 2): only one latent z is carried.

Upstream ``models/recursive_reasoning/trm_singlez.py``, ``TinyRecursiveReasoningModel_ACTV1``.

One supervision step: T times (n times z ← f(z + x); then z ← f(z)), the first T−1 without
gradient. Logits and the Q head read z.
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
from models.recursive_reasoning.configs import TRMSingleZConfig
from models.registry import MODELS


class TinyRecursiveReasoningModel_ACTV1_Inner(RecursiveInner):
    carry_inits: ClassVar[dict[str, str]] = {"z_L": "L_init"}

    def __init__(self, config: TRMSingleZConfig, dims: ModelDims) -> None:
        super().__init__(config, dims, config.puzzle_emb_len)
        self.L_level = self.blocks(config.L_layers)
        self._init_buffer("L_init")
        self._init_q_head()

    def _cycle(
        self, z: torch.Tensor, x: torch.Tensor, cos_sin: CosSin | None, h: int
    ) -> torch.Tensor:
        for l_step in range(self.config.L_cycles):
            z = self.L_level(z, x, cos_sin=cos_sin)
            self.record("z_L", h, l_step, z)
        z = self.L_level(z, None, cos_sin=cos_sin)
        self.record("z_L", h, None, z)
        return z

    def forward(self, carry: InnerCarry, batch: Batch) -> InnerOutput:
        """carry {z_L} [B, P + S, D] → detached carry, logits [B, S, V], q_halt/q_continue
        [B]."""
        cos_sin = self.cos_sin()
        x = self.input_embeddings(batch)
        z = carry["z_L"]
        with torch.no_grad():
            for h in range(self.config.H_cycles - 1):
                z = self._cycle(z, x, cos_sin, h)
        z = self._cycle(z, x, cos_sin, self.config.H_cycles - 1)
        return self.readout({"z_L": z.detach()}, z)


class TinyRecursiveReasoningModel_ACTV1(ACTModel):
    """Single-z TRM with ACT."""

    def __init__(self, config: TRMSingleZConfig, dims: ModelDims) -> None:
        super().__init__(config, TinyRecursiveReasoningModel_ACTV1_Inner(config, dims))


MODELS.add("trm_singlez", TinyRecursiveReasoningModel_ACTV1)
