"""HRM as re-implemented in the TRM code: separate H and L networks.

Upstream ``models/recursive_reasoning/hrm.py``, ``HierarchicalReasoningModel_ACTV1``.

One supervision step runs H_cycles × L_cycles low-level updates z_L ← f_L(z_L + z_H + x) and
high-level updates z_H ← f_H(z_H + z_L) after each low-level block, all without gradient
except the very last z_L and z_H updates (HRM's "1-step gradient"). The prefix is
ceil(puzzle_emb_ndim / hidden_size) positions. ACT halts on q_halt > q_continue and always
trains Q-continue on a bootstrapped target.
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
from models.recursive_reasoning.configs import HRMConfig
from models.registry import MODELS


class HierarchicalReasoningModel_ACTV1_Inner(RecursiveInner):
    carry_inits: ClassVar[dict[str, str]] = {"z_H": "H_init", "z_L": "L_init"}

    def __init__(self, config: HRMConfig, dims: ModelDims) -> None:
        super().__init__(config, dims, puzzle_emb_len=0)
        self.H_level = self.blocks(config.H_layers)
        self.L_level = self.blocks(config.L_layers)
        self._init_buffer("H_init")
        self._init_buffer("L_init")
        self._init_q_head()

    def forward(self, carry: InnerCarry, batch: Batch) -> InnerOutput:
        """carry {z_H, z_L} [B, P + S, D] → detached carry, logits [B, S, V], q_halt/q_continue
        [B] (upstream ``HierarchicalReasoningModel_ACTV1_Inner.forward``)."""
        cos_sin = self.cos_sin()
        x = self.input_embeddings(batch)
        z_H, z_L = carry["z_H"], carry["z_L"]
        H, L = self.config.H_cycles, self.config.L_cycles
        with torch.no_grad():
            for h in range(H):
                for l_step in range(L):
                    if h == H - 1 and l_step == L - 1:
                        break  # the last low-level update runs with gradient below
                    z_L = self.L_level(z_L, z_H + x, cos_sin=cos_sin)
                    self.record("z_L", h, l_step, z_L)
                if h < H - 1:
                    z_H = self.H_level(z_H, z_L, cos_sin=cos_sin)
                    self.record("z_H", h, None, z_H)
        z_L = self.L_level(z_L, z_H + x, cos_sin=cos_sin)
        self.record("z_L", H - 1, L - 1, z_L)
        z_H = self.H_level(z_H, z_L, cos_sin=cos_sin)
        self.record("z_H", H - 1, None, z_H)
        return self.readout({"z_H": z_H.detach(), "z_L": z_L.detach()}, z_H)


class HierarchicalReasoningModel_ACTV1(ACTModel):
    """HRM with ACT: halts on q_halt > q_continue, Q-continue trained by bootstrapping."""

    def __init__(self, config: HRMConfig, dims: ModelDims) -> None:
        super().__init__(config, HierarchicalReasoningModel_ACTV1_Inner(config, dims))

    def computes_target_q(self) -> bool:
        return True


MODELS.add("hrm", HierarchicalReasoningModel_ACTV1)
