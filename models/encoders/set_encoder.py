"""The set encoder: K demo vectors in, T context tokens out, by cross-attention (ETRM's
``DemoSetEncoder`` in ``models/encoders/standard.py``, used by ``standard``, ``variational``
and the ``hybrid_*`` encoders).

T learned query tokens (``query_tokens`` [T, D], std 0.02) pass through
``set_encoder_layers`` layers of cross-attention to the valid demo vectors (8 heads of D/8 in
ETRM's configuration, no bias) and a SwiGLU MLP, post-norm (or pre-norm), with optional layer
scale; a weightless RMS norm closes the stack. A row without valid demos attends to its K
zeroed slots, which gives ``o_proj(0) = 0``: finite on every backend (ETRM's all-−∞ attention
row is NaN where the softmax is not guarded).
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import trunc_normal_init_
from models.encoders.base import EncoderConfig
from models.encoders.blocks import ResidualBlock, multi_head_attention, projection
from models.layers import CastedLinear, SwiGLU, rms_norm


class DemoSetEncoderLayer(ResidualBlock):
    """Cross-attention from the queries to the demos (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, each [D → D]) then a SwiGLU ``mlp``: queries [B, T, D] → [B, T, D]."""

    def __init__(self, config: EncoderConfig) -> None:
        D, H = config.hidden_size, config.num_heads
        super().__init__(
            D, config.layer_scale_init, config.norm_style == "pre", config.rms_norm_eps
        )
        self.num_heads, self.head_dim = H, D // H
        qk_heads = H if config.qk_norm else 0
        self.q_proj = projection(D, D, qk_heads, self.head_dim, config.rms_norm_eps)
        self.k_proj = projection(D, D, qk_heads, self.head_dim, config.rms_norm_eps)
        self.v_proj = CastedLinear(D, D, bias=False)
        self.o_proj = CastedLinear(D, D, bias=False)
        self.mlp = SwiGLU(hidden_size=D, expansion=config.expansion)

    def cross_attention(
        self, queries: torch.Tensor, demos: torch.Tensor, demo_mask: torch.Tensor
    ) -> torch.Tensor:
        """queries [B, T, D], demos [B, K, D], demo_mask bool [B, K] → [B, T, D]."""
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(queries).unflatten(-1, heads)
        k = self.k_proj(demos).unflatten(-1, heads)
        v = self.v_proj(demos).unflatten(-1, heads)
        return self.o_proj(multi_head_attention(q, k, v, demo_mask))

    def forward(
        self, queries: torch.Tensor, demos: torch.Tensor, demo_mask: torch.Tensor
    ) -> torch.Tensor:
        def attend(x: torch.Tensor) -> torch.Tensor:
            return self.cross_attention(x, demos, demo_mask)

        return self.residual(self.residual(queries, attend, 1), self.mlp, 2)


class DemoSetEncoder(nn.Module):
    """demos [B, K, D] (invalid slots zero), demo_mask bool [B, K] → context [B, T, D],
    every token RMS-normalised (module doc)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.forward_dtype = getattr(torch, config.forward_dtype)
        self.norm_eps = config.rms_norm_eps
        self.query_tokens = nn.Parameter(
            trunc_normal_init_(torch.empty(config.output_tokens, config.hidden_size), std=0.02)
        )
        self.layers = nn.ModuleList(
            DemoSetEncoderLayer(config) for _ in range(config.set_encoder_layers)
        )

    def forward(self, demos: torch.Tensor, demo_mask: torch.Tensor) -> torch.Tensor:
        context = self.query_tokens.to(self.forward_dtype).expand(demos.shape[0], -1, -1)
        for layer in self.layers:
            context = layer(context, demos, demo_mask)
        # ETRM added this norm (commit 58c77f8) after its reported runs; its HEAD has it.
        return rms_norm(context, variance_epsilon=self.norm_eps)
