"""``standard``: ETRM's main encoder (``StandardDemoEncoder``), deterministic.

Each valid demo pair through ``DemoGridEncoder`` (2 post-norm layers by default, mean pooling),
then the cross-attention ``DemoSetEncoder`` turns the K demo vectors into the T context tokens.
``z_pooled`` is the context's mean over tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.encoders.base import ENCODERS, EncoderConfig, EncoderOutput, PerDemoEncoder
from models.encoders.grid import DemoGridEncoder
from models.encoders.set_encoder import DemoSetEncoder


@ENCODERS.register("standard")
class StandardDemoEncoder(PerDemoEncoder):
    """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K] → context [B, T, D],
    ``z_pooled`` [B, D]."""

    grid_encoder_class: ClassVar[type[nn.Module]] = DemoGridEncoder

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.grid_encoder = self.grid_encoder_class(config)
        self.set_encoder = DemoSetEncoder(config)

    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        context = self.set_encoder(slots, demo_mask)
        return EncoderOutput(context=context, z_pooled=context.mean(dim=1))
