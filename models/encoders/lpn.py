"""``lpn`` and ``lpn_var``: ETRM's "paper-exact" LPN encoders (Searching Latent Program Spaces).

A small grid encoder of its own width, fixed as ETRM fixed it: 128 wide, 8 heads of 16, 2 layers
(``LPN_HIDDEN_SIZE``, ``LPN_NUM_HEADS``, ``LPN_NUM_LAYERS``; ``hidden_size``, ``num_heads``,
``num_layers``, ``norm_style``, ``pooling_method`` and ``layer_scale_init`` do not apply).
Pre-norm blocks with weightless LayerNorm and a SiLU MLP (×4), no RoPE: each token is a colour
embedding (shared by both grids) plus learned row and column embeddings plus a channel embedding
(input 0, output 1), all N(0, 0.02²); a CLS token (truncated normal, 0.02) is prepended and its
LayerNorm-ed output is the demo vector. Layers are plain float32 ``nn.Linear``/``nn.Embedding``
with PyTorch's default initialisation, as ETRM's, so this encoder computes in float32 whatever
the forward dtype; only its context is cast.

* ``lpn`` (``LPNEncoder``): the mean over valid demos → ``output_proj`` (128 → T·D, no bias).
* ``lpn_var`` (``LPNPaperVariationalEncoder``): a posterior per demo (``mu_proj``,
  ``logvar_proj``: 128 → ``lpn_latent_dim``, no bias, ``logvar_proj`` zero-initialised,
  ``logvar`` clamped to [−10, 10]), each demo sampled, the mean over valid demos →
  ``output_proj`` (latent → T·D). ETRM never passed ``lpn_latent_dim`` on (always 32); here
  it is honoured.

The grid is square, side √S (30 for ARC's S = 900, ETRM's fixed value). Unlike real LPN there
are no grid-shape tokens, no leave-one-out training and no test-time latent search.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.base import (
    ENCODERS,
    EncoderConfig,
    EncoderOutput,
    PerDemoEncoder,
    masked_mean_over_demos,
)
from models.encoders.blocks import QKNormLinear, multi_head_attention
from models.encoders.variational_head import VariationalEncoder
from utils.schema import ConfigError


class LPNPaperMLP(nn.Module):
    """``fc2(silu(fc1(x)))``, [D → expansion·D → D], no bias."""

    def __init__(self, hidden_size: int, expansion: float) -> None:
        super().__init__()
        inner = int(hidden_size * expansion)
        self.fc1 = nn.Linear(hidden_size, inner, bias=False)
        self.fc2 = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class LPNPaperTransformerBlock(nn.Module):
    """``x += attn(norm1(x)); x += mlp(norm2(x))`` with weightless LayerNorms, fused
    ``qkv_proj`` [D → 3·D] and ``o_proj``, no positions: x [N, L, D] → [N, L, D]."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False)
        if qk_norm:
            self.qkv_proj = QKNormLinear(
                hidden_size, 3 * hidden_size, 2 * num_heads, self.head_dim, eps
            )
        else:
            self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp = LPNPaperMLP(hidden_size, expansion=4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(self.norm1(x)).unflatten(-1, (3, self.num_heads, self.head_dim))
        x = x + self.o_proj(multi_head_attention(*qkv.unbind(dim=2)))
        return x + self.mlp(self.norm2(x))


class LPNPaperGridEncoder(nn.Module):
    """[N, S] × 2 → the LayerNorm-ed CLS output [N, hidden_size] float32 (module doc)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_layers: int,
        vocab_size: int,
        grid_side: int,
        qk_norm: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.output_size, self.output_dtype = hidden_size, torch.float32
        self.color_embed = nn.Embedding(vocab_size, hidden_size)
        self.pos_row_embed = nn.Embedding(grid_side, hidden_size)
        self.pos_col_embed = nn.Embedding(grid_side, hidden_size)
        self.channel_embed = nn.Embedding(2, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.layers = nn.ModuleList(
            LPNPaperTransformerBlock(hidden_size, num_heads, qk_norm, eps)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for table in (self.color_embed, self.pos_row_embed, self.pos_col_embed, self.channel_embed):
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, input_grid: torch.Tensor, output_grid: torch.Tensor) -> torch.Tensor:
        """input_grid, output_grid int [N, S] with S = side² → [N, hidden_size]."""
        rows, cols = self.pos_row_embed.weight, self.pos_col_embed.weight
        positions = (rows[:, None] + cols[None, :]).flatten(0, 1)  # [side², D], row-major
        channel = self.channel_embed.weight  # [2, D]: input, output
        x = torch.cat(
            (
                self.color_embed(input_grid) + positions + channel[0],
                self.color_embed(output_grid) + positions + channel[1],
            ),
            dim=1,
        )
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x[:, 0])


class LPNPaperEncoderBase(PerDemoEncoder):
    """What ``lpn`` and ``lpn_var`` share: the paper grid encoder (``grid_encoder``)."""

    LPN_HIDDEN_SIZE: ClassVar[int] = 128
    LPN_NUM_HEADS: ClassVar[int] = 8
    LPN_NUM_LAYERS: ClassVar[int] = 2

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        side = math.isqrt(config.seq_len)
        if side * side != config.seq_len:
            raise ConfigError(
                f"encoder_type={config.encoder_type} needs square grids, but seq_len="
                f"{config.seq_len} is not a square; use another encoder_type for this data"
            )
        self.grid_encoder = LPNPaperGridEncoder(
            hidden_size=self.LPN_HIDDEN_SIZE,
            num_heads=self.LPN_NUM_HEADS,
            num_layers=self.LPN_NUM_LAYERS,
            vocab_size=config.vocab_size,
            grid_side=side,
            qk_norm=config.qk_norm,
            eps=config.rms_norm_eps,
        )


@ENCODERS.register("lpn")
class LPNEncoder(LPNPaperEncoderBase):
    """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K] → context [B, T, D];
    ``z_pooled`` [B, 128] float32, the mean demo vector."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        T, D = config.output_tokens, config.hidden_size
        self.output_proj = nn.Linear(self.LPN_HIDDEN_SIZE, T * D, bias=False)

    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        z = masked_mean_over_demos(slots, demo_mask)
        return EncoderOutput(context=self.as_context(self.output_proj(z)), z_pooled=z)


@ENCODERS.register("lpn_var")
class LPNPaperVariationalEncoder(VariationalEncoder, LPNPaperEncoderBase):
    """As ``LPNEncoder``, with ``kl_per_sample`` [B] and ``mu``/``logvar``/``z_pooled``
    [B, lpn_latent_dim] float32."""

    logvar_clamp: ClassVar[float | None] = 10.0

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        L, T, D = config.lpn_latent_dim, config.output_tokens, config.hidden_size
        self.mu_proj = nn.Linear(self.LPN_HIDDEN_SIZE, L, bias=False)
        self.logvar_proj = nn.Linear(self.LPN_HIDDEN_SIZE, L, bias=False)
        nn.init.zeros_(self.logvar_proj.weight)
        self.output_proj = nn.Linear(L, T * D, bias=False)

    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        return self.demo_latent_output(slots, demo_mask, self.output_proj)
