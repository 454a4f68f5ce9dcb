"""``lpn_standard`` (``LPNStandardEncoder``): LPN-style, deterministic.

Each valid demo pair through the deep CLS-pooled ``LPNGridEncoder`` (pre-norm), the plain mean
over the valid demos (no cross-attention), then ``output_proj`` (Linear D → T·D, no bias).
``z_pooled`` is that mean [B, D].
"""

from __future__ import annotations

import torch

from models.encoders.base import (
    ENCODERS,
    EncoderConfig,
    EncoderOutput,
    PerDemoEncoder,
    masked_mean_over_demos,
)
from models.encoders.grid import LPNGridEncoder
from models.layers import CastedLinear


@ENCODERS.register("lpn_standard")
class LPNStandardEncoder(PerDemoEncoder):
    """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K] → context [B, T, D]."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        D, T = config.hidden_size, config.output_tokens
        self.grid_encoder = LPNGridEncoder(config)
        self.output_proj = CastedLinear(D, T * D, bias=False)

    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        z = masked_mean_over_demos(slots, demo_mask)
        return EncoderOutput(context=self.as_context(self.output_proj(z)), z_pooled=z)
