"""``lpn_variational`` and ``lpn_variational_v2``: LPN-style VAE encoders.

Both read each valid demo pair with the deep CLS-pooled ``LPNGridEncoder`` and end with
``output_proj`` (Linear D → T·D, no bias); ``mu_proj`` and ``logvar_proj`` are Linear D → D
with bias, without clamping.

* ``lpn_variational`` (``LPNVariationalEncoder``, v1, LPN's way): a posterior per demo, each
  demo's latent sampled, then their mean over the valid demos; the KL is averaged over a row's
  valid demos.
* ``lpn_variational_v2`` (``LPNVariationalEncoderV2``, aggregate first): the mean of the demo
  vectors, then one posterior per row.
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
from models.encoders.variational_head import VariationalEncoder
from models.layers import CastedLinear


@ENCODERS.register("lpn_variational")
class LPNVariationalEncoder(VariationalEncoder, PerDemoEncoder):
    """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K] → context [B, T, D],
    ``kl_per_sample`` [B], ``mu``/``logvar``/``z_pooled`` [B, D]."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        D, T = config.hidden_size, config.output_tokens
        self.grid_encoder = LPNGridEncoder(config)
        self.mu_proj = CastedLinear(D, D, bias=True)
        self.logvar_proj = CastedLinear(D, D, bias=True)
        self.output_proj = CastedLinear(D, T * D, bias=False)

    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        return self.demo_latent_output(slots, demo_mask, self.output_proj)


@ENCODERS.register("lpn_variational_v2")
class LPNVariationalEncoderV2(LPNVariationalEncoder):
    """Shapes as ``LPNVariationalEncoder``."""

    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        z_pre = masked_mean_over_demos(slots, demo_mask)
        return self.row_latent_output(z_pre, demo_mask, self.output_proj)
