"""``hybrid_variational`` (``HybridVariationalEncoder``, the report's "cross-attention VAE").

``hybrid_standard``'s deep CLS grid encoder and cross-attention set encoder, then
``variational``'s bottleneck with ETRM's stabilisers: the token mean is RMS-normalised before
``mu_proj``/``logvar_proj``, ``logvar_proj`` starts at zero (weight and bias, so the posterior
starts with unit variance), ``logvar`` is clamped to [−10, 10], and ``decode_proj`` has no bias.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from models.encoders.base import ENCODERS, EncoderConfig
from models.encoders.grid import LPNGridEncoder
from models.encoders.variational import VariationalDemoEncoder


@ENCODERS.register("hybrid_variational")
class HybridVariationalEncoder(VariationalDemoEncoder):
    """Shapes as ``VariationalDemoEncoder``."""

    grid_encoder_class: ClassVar[type[nn.Module]] = LPNGridEncoder
    normalize_pre_latent: ClassVar[bool] = True
    decode_bias: ClassVar[bool] = False
    logvar_clamp: ClassVar[float | None] = 10.0

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        nn.init.zeros_(self.logvar_proj.weight)
        nn.init.zeros_(self.logvar_proj.bias)
