"""Non-recursive transformer baseline, Model_ACTV2.

Upstream ``models/recursive_reasoning/transformers_baseline.py``, ``Model_ACTV2``.

Each supervision step is one pass z_H ← f_H(z_H + x) through ``H_layers`` blocks, with
gradient. ACT is optional: ``act_enabled`` (training) and ``act_inference`` (evaluation, which
then reports ``actual_steps``). Halting uses q_halt > q_continue, and upstream never trains
q_continue (its loss head does not request the target): it stays near its initial −5, so a
slot halts as soon as q_halt rises above that. Kept as upstream by default;
``compute_target_q=True`` trains q_continue on the bootstrapped target instead.
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
from models.recursive_reasoning.configs import TransformerBaselineConfig
from models.registry import MODELS


class Model_ACTV2_Inner(RecursiveInner):
    carry_inits: ClassVar[dict[str, str]] = {"z_H": "H_init"}

    def __init__(self, config: TransformerBaselineConfig, dims: ModelDims) -> None:
        super().__init__(config, dims, puzzle_emb_len=0)
        self.H_level = self.blocks(config.H_layers)
        self._init_buffer("H_init")
        self._init_q_head()

    def forward(self, carry: InnerCarry, batch: Batch) -> InnerOutput:
        """carry {z_H} [B, P + S, D] → detached carry, logits [B, S, V], q_halt/q_continue
        [B] (upstream ``Model_ACTV2_Inner.forward``)."""
        x = self.input_embeddings(batch)
        z_H = self.H_level(carry["z_H"], x, cos_sin=self.cos_sin())
        self.record("z_H", 0, None, z_H)
        return self.readout({"z_H": z_H.detach()}, z_H)


class Model_ACTV2(ACTModel):
    """The baseline with (optional) ACT."""

    def __init__(self, config: TransformerBaselineConfig, dims: ModelDims) -> None:
        super().__init__(config, Model_ACTV2_Inner(config, dims))

    def computes_target_q(self) -> bool:
        return bool(self.config.compute_target_q)

    def update_halting(
        self,
        steps: torch.Tensor,
        inner_carry: InnerCarry,
        current_data: Batch,
        outputs: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        cfg = self.config
        q_halt, q_continue = outputs["q_halt_logits"], outputs["q_continue_logits"]
        is_last_step = steps >= cfg.halt_max_steps
        halted = is_last_step
        adaptive = cfg.halt_max_steps > 1 and (
            (self.training and cfg.act_enabled) or (not self.training and cfg.act_inference)
        )
        if adaptive:
            halted = halted | (q_halt > q_continue)
            if self.training:
                halted = self._explore(steps, halted, q_halt)
                if self.computes_target_q():
                    outputs["target_q_continue"] = self._target_q(
                        is_last_step, inner_carry, current_data
                    )
            else:
                outputs["actual_steps"] = steps.float()
        return halted


MODELS.add("transformers_baseline", Model_ACTV2)
