"""``hybrid_standard`` (``HybridStandardEncoder``): LPN's deep CLS-pooled grid encoder
(``LPNGridEncoder``, pre-norm) with the standard encoder's cross-attention set encoder; no
bottleneck. ``z_pooled`` is the context's mean over tokens.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from models.encoders.base import ENCODERS
from models.encoders.grid import LPNGridEncoder
from models.encoders.standard import StandardDemoEncoder


@ENCODERS.register("hybrid_standard")
class HybridStandardEncoder(StandardDemoEncoder):
    """Shapes as ``StandardDemoEncoder``."""

    grid_encoder_class: ClassVar[type[nn.Module]] = LPNGridEncoder
