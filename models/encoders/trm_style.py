"""``trm_style``: ETRM's TRM-like recurrent encoder (``TRMStyleEncoder``, "variant B").

The demos are read as by ``standard`` (each valid pair through ``DemoGridEncoder``), then
averaged over the row's valid demos into one vector x, broadcast to the T state tokens. Two
states, h = z_e_H (the context) and l = z_e_L, are refined with the decoder's recursion over
the T tokens, by one network f (``L_level``: ``encoder_l_layers`` post-norm attention + SwiGLU
blocks, RoPE over T positions):

    repeat H−1 times without gradient:  (L times l ← f(l + h + x)); h ← f(h + l)
    once with gradient:                 (L times l ← f(l + h + x)); h ← f(h + l)

H = ``encoder_h_cycles``, L = ``encoder_l_cycles``. Both states are then blended with the
carried ones (``models.encoders.recurrent_base``); the blended z_e_H is the context.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.encoders.base import ENCODERS, EncoderConfig, masked_mean_over_demos
from models.encoders.grid import ROPE_BASE, DemoGridEncoderBlock
from models.encoders.recurrent_base import RecurrentDemoEncoder, State
from models.layers import CosSin, RotaryEmbedding


class EncoderReasoningModule(nn.Module):
    """``f(h, injection) = layers(h + injection)`` over h [B, T, D] (ETRM's
    ``TRMStyleEncoderReasoningModule``); ``layers`` is a ModuleList of blocks."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self, hidden_states: torch.Tensor, input_injection: torch.Tensor, cos_sin: CosSin
    ) -> torch.Tensor:
        h = hidden_states + input_injection
        for layer in self.layers:
            h = layer(h, cos_sin)
        return h


@ENCODERS.register("trm_style")
class TRMStyleEncoder(RecurrentDemoEncoder):
    """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K], state {z_e_H, z_e_L}
    [B, T, D] → context (blended z_e_H) [B, T, D] and the next state (module doc)."""

    state_inits: ClassVar[dict[str, str]] = {"z_e_H": "z_e_H_init", "z_e_L": "z_e_L_init"}
    context_state: ClassVar[str] = "z_e_H"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        config = self.config
        # ETRM's TRMStyleEncoderBlock is the grid encoder's block, always post-norm and without
        # layer scale whatever encoder_norm_style and encoder_layer_scale_init say.
        block_config = config.model_copy(update={"norm_style": "post", "layer_scale_init": 0.0})
        self.L_level = EncoderReasoningModule(
            [DemoGridEncoderBlock(block_config) for _ in range(config.encoder_l_layers)]
        )
        self.rotary_emb = RotaryEmbedding(
            dim=config.hidden_size // config.num_heads,
            max_position_embeddings=config.output_tokens,
            base=ROPE_BASE,
        )

    def _cycle(
        self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, cos_sin: CosSin
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(self.config.encoder_l_cycles):
            z_L = self.L_level(z_L, z_H + x, cos_sin=cos_sin)
        z_H = self.L_level(z_H, z_L, cos_sin=cos_sin)
        return z_H, z_L

    def update(self, slots: torch.Tensor, demo_mask: torch.Tensor, state: State) -> State:
        x = masked_mean_over_demos(slots, demo_mask).unsqueeze(1)  # [B, 1, D], broadcast over T
        cos_sin = self.rotary_emb()
        z_H, z_L = state["z_e_H"], state["z_e_L"]
        with torch.no_grad():
            for _ in range(self.config.encoder_h_cycles - 1):
                z_H, z_L = self._cycle(z_H, z_L, x, cos_sin)
        # Gradient through the last cycle only, as in the decoder.
        z_H, z_L = self._cycle(z_H, z_L, x, cos_sin)
        return {"z_e_H": z_H, "z_e_L": z_L}
