"""``variational`` (``VariationalDemoEncoder``) and the base of ``hybrid_variational``.

The ``standard`` encoder up to its context, then a VAE bottleneck: the context's mean over
tokens → ``mu_proj``, ``logvar_proj`` (Linear D → D with bias) → z (sampled in training) →
``decode_proj`` (Linear D → T·D) → the context. ETRM's model refused this encoder type although
the class exists; it is registered here.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.encoders.base import ENCODERS, EncoderConfig, EncoderOutput, PerDemoEncoder
from models.encoders.grid import DemoGridEncoder
from models.encoders.set_encoder import DemoSetEncoder
from models.encoders.variational_head import VariationalEncoder
from models.layers import CastedLinear, rms_norm


@ENCODERS.register("variational")
class VariationalDemoEncoder(VariationalEncoder, PerDemoEncoder):
    """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K] → context [B, T, D],
    ``kl_per_sample`` [B], ``mu``/``logvar``/``z_pooled`` [B, D]."""

    grid_encoder_class: ClassVar[type[nn.Module]] = DemoGridEncoder
    normalize_pre_latent: ClassVar[bool] = False  # RMS-normalise the token mean first
    decode_bias: ClassVar[bool] = True

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        D, T = config.hidden_size, config.output_tokens
        self.grid_encoder = self.grid_encoder_class(config)
        self.set_encoder = DemoSetEncoder(config)
        self.mu_proj = CastedLinear(D, D, bias=True)
        self.logvar_proj = CastedLinear(D, D, bias=True)
        self.decode_proj = CastedLinear(D, T * D, bias=self.decode_bias)

    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        z_pre = self.set_encoder(slots, demo_mask).mean(dim=1)
        if self.normalize_pre_latent:
            z_pre = rms_norm(z_pre, variance_epsilon=self.config.rms_norm_eps)
        return self.row_latent_output(z_pre, demo_mask, self.decode_proj)
