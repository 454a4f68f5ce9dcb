"""``recurrent_standard``: ETRM's simplest recurrent encoder (``RecurrentAggregationEncoder``,
"variant A").

Each valid demo pair goes through ``DemoGridEncoder``; the state z_e [B, T, D] (the context)
then attends to the K demo vectors once per ACT step, post-norm, with no inner cycles:

    z ← rms(z_e + cross_attn(z_e, demos));  z ← rms(z + SwiGLU(z))

and is blended with the carried z_e (``models.encoders.recurrent_base``).
``encoder_h_cycles`` and ``encoder_l_cycles`` do not apply. A row without valid demos attends to
its zeroed slots, so its update is ``o_proj(0) = 0`` and stays finite (ETRM's all-−∞ attention
row gives NaN where the softmax is not guarded).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from models.encoders.base import ENCODERS, EncoderConfig
from models.encoders.recurrent_base import RecurrentDemoEncoder, State
from models.encoders.set_encoder import DemoSetEncoderLayer
from models.layers import SwiGLU, rms_norm


class CrossAttentionLayer(DemoSetEncoderLayer):
    """Queries [B, T, D] attend to the valid rows of keys/values [B, K, D] (``key_mask`` bool
    [B, K]) → [B, T, D]: the set encoder layer's cross-attention on its own (``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``, qk_norm included), as ETRM's ``CrossAttentionLayer``;
    the residuals and the MLP belong to the encoder here."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config.model_copy(update={"layer_scale_init": 0.0}))
        del self.mlp

    def forward(
        self, queries: torch.Tensor, demos: torch.Tensor, demo_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.cross_attention(queries, demos, demo_mask)


@ENCODERS.register("recurrent_standard")
class RecurrentAggregationEncoder(RecurrentDemoEncoder):
    """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K], state {z_e} [B, T, D] →
    context (blended z_e) [B, T, D] and the next state (module doc)."""

    state_inits: ClassVar[dict[str, str]] = {"z_e": "z_e_init"}
    context_state: ClassVar[str] = "z_e"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.cross_attn = CrossAttentionLayer(self.config)
        self.mlp = SwiGLU(hidden_size=self.config.hidden_size, expansion=self.config.expansion)
        self.norm_eps = self.config.rms_norm_eps

    def update(self, slots: torch.Tensor, demo_mask: torch.Tensor, state: State) -> State:
        z = state["z_e"]
        z = rms_norm(z + self.cross_attn(z, slots, demo_mask), variance_epsilon=self.norm_eps)
        z = rms_norm(z + self.mlp(z), variance_epsilon=self.norm_eps)
        return {"z_e": z}
