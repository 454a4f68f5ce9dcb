"""Grid encoders: one demonstration pair (input grid, output grid) in, one vector out.

Two families, as ETRM's (``models/encoders/standard.py`` and ``lpn_standard.py``):

* ``DemoGridEncoder`` (``standard``, ``variational``): separate input and output embedding
  tables, the two grids concatenated to 2·S tokens and scaled by √D, RoPE over the 2·S
  positions, ``num_layers`` post-norm (or pre-norm) blocks, then pooling over the non-PAD
  tokens (``mean``, ``attention`` or ``weighted``; EOS tokens count) and ``pool_proj``.
* ``LPNGridEncoder`` (``lpn_*``, ``hybrid_*``): the same embeddings with a learned CLS token
  prepended (1 + 2·S tokens), always pre-norm blocks with a fused ``qkv_proj``, RoPE on every
  token but CLS (grid tokens take positions 0..2·S−1), and the RMS-normalised CLS output.

Neither masks PAD tokens inside attention (ETRM's behaviour). Inputs: ``input_grid``,
``output_grid`` int [N, S] with PAD 0; output [N, D] in the forward dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.common import trunc_normal_init_
from models.encoders.base import EncoderConfig
from models.encoders.blocks import (
    ResidualBlock,
    multi_head_attention,
    projection,
    self_attention_layer,
)
from models.layers import (
    CastedEmbedding,
    CastedLinear,
    CosSin,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary_pos_emb,
    rms_norm,
)

ROPE_BASE = 10000.0  # ETRM's encoders fix it; the decoder's rope_theta does not reach them


def embed_pair(
    input_embed: CastedEmbedding,
    output_embed: CastedEmbedding,
    input_grid: torch.Tensor,
    output_grid: torch.Tensor,
) -> torch.Tensor:
    """[N, S] × 2 → √D · [input_embed(input); output_embed(output)] [N, 2·S, D]."""
    hidden = torch.cat((input_embed(input_grid), output_embed(output_grid)), dim=1)
    return math.sqrt(hidden.shape[-1]) * hidden


def pair_embeddings(config: EncoderConfig, forward_dtype: torch.dtype) -> list[CastedEmbedding]:
    """The input and output embedding tables [vocab, D], std 1/√D (ETRM's init)."""
    std = 1.0 / math.sqrt(config.hidden_size)
    return [
        CastedEmbedding(config.vocab_size, config.hidden_size, std, forward_dtype) for _ in range(2)
    ]


class DemoGridEncoderBlock(ResidualBlock):
    """Self-attention + SwiGLU, post-norm by default (``norm_style``), optional layer scale.
    hidden [N, 2·S, D] → [N, 2·S, D]."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(
            config.hidden_size,
            config.layer_scale_init,
            pre_norm=config.norm_style == "pre",
            eps=config.rms_norm_eps,
        )
        self.self_attn = self_attention_layer(
            config.hidden_size, config.num_heads, config.qk_norm, config.rms_norm_eps
        )
        self.mlp = SwiGLU(hidden_size=config.hidden_size, expansion=config.expansion)

    def forward(self, hidden_states: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
        def attend(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(cos_sin=cos_sin, hidden_states=x)

        return self.residual(self.residual(hidden_states, attend, 1), self.mlp, 2)


class DemoGridEncoder(nn.Module):
    """The standard family's grid encoder: [N, S] × 2 → [N, D] (module doc).

    Pooling over the tokens that are not PAD: ``mean`` (masked mean), ``attention`` (one learned
    query ``pool_query`` [1, D], std 0.02, cross-attending through ``pool_{q,k,v,o}_proj``) or
    ``weighted`` (softmax of ``pool_weight_proj`` scores). A grid without any non-PAD token (an
    empty slot, encoded only on the padded path) pools over all its tokens instead of nothing.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        D, H = config.hidden_size, config.num_heads
        self.forward_dtype = getattr(torch, config.forward_dtype)
        self.output_size, self.output_dtype = D, self.forward_dtype
        self.pooling_method = config.pooling_method
        self.num_heads = H
        self.input_embed, self.output_embed = pair_embeddings(config, self.forward_dtype)
        self.rotary_emb = RotaryEmbedding(
            dim=D // H, max_position_embeddings=2 * config.seq_len, base=ROPE_BASE
        )
        self.layers = nn.ModuleList(DemoGridEncoderBlock(config) for _ in range(config.num_layers))
        if self.pooling_method == "attention":
            self.pool_query = nn.Parameter(trunc_normal_init_(torch.empty(1, D), std=0.02))
            qk_heads = H if config.qk_norm else 0
            eps = config.rms_norm_eps
            self.pool_q_proj = projection(D, D, qk_heads, D // H, eps)
            self.pool_k_proj = projection(D, D, qk_heads, D // H, eps)
            self.pool_v_proj = CastedLinear(D, D, bias=False)
            self.pool_o_proj = CastedLinear(D, D, bias=False)
        elif self.pooling_method == "weighted":
            self.pool_weight_proj = CastedLinear(D, 1, bias=False)
        self.pool_proj = CastedLinear(D, D, bias=False)

    def pool(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """hidden [N, L, D], token_mask bool [N, L] (True = not PAD) → [N, D]."""
        mask = token_mask | ~token_mask.any(dim=-1, keepdim=True)
        if self.pooling_method == "attention":
            N, D = hidden.shape[0], hidden.shape[-1]
            query = self.pool_query.to(hidden.dtype).expand(N, -1, -1)  # [N, 1, D]
            heads = (self.num_heads, D // self.num_heads)
            q = self.pool_q_proj(query).unflatten(-1, heads)
            k = self.pool_k_proj(hidden).unflatten(-1, heads)
            v = self.pool_v_proj(hidden).unflatten(-1, heads)
            return self.pool_o_proj(multi_head_attention(q, k, v, mask)).squeeze(1)
        if self.pooling_method == "weighted":
            scores = self.pool_weight_proj(hidden).squeeze(-1).masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            return (weights.unsqueeze(-1) * hidden).sum(dim=1)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def forward(self, input_grid: torch.Tensor, output_grid: torch.Tensor) -> torch.Tensor:
        """input_grid, output_grid int [N, S] → [N, D]."""
        hidden = embed_pair(self.input_embed, self.output_embed, input_grid, output_grid)
        cos_sin = self.rotary_emb()
        for layer in self.layers:
            hidden = layer(hidden, cos_sin)
        token_mask = torch.cat((input_grid, output_grid), dim=1) != 0
        return self.pool_proj(self.pool(hidden, token_mask))


class LPNTransformerBlock(ResidualBlock):
    """Pre-norm block with a fused ``qkv_proj`` [D → 3·D], ``o_proj`` and SwiGLU ``mlp``;
    RoPE on every position but 0 (CLS); optional layer scale. hidden [N, 1 + L, D] → same."""

    def __init__(self, config: EncoderConfig) -> None:
        D, H = config.hidden_size, config.num_heads
        super().__init__(D, config.layer_scale_init, pre_norm=True, eps=config.rms_norm_eps)
        self.num_heads, self.head_dim = H, D // H
        self.qkv_proj = projection(D, 3 * D, 2 * H if config.qk_norm else 0, D // H, self.norm_eps)
        self.o_proj = CastedLinear(D, D, bias=False)
        self.mlp = SwiGLU(hidden_size=D, expansion=config.expansion)

    def attend(self, normed: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
        """Self-attention over [N, 1 + L, D], CLS (position 0) left unrotated."""
        qkv = self.qkv_proj(normed).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=2)  # [N, 1 + L, H, Dh] each
        L = q.shape[1] - 1
        cos, sin = cos_sin
        q_grid, k_grid = apply_rotary_pos_emb(q[:, 1:], k[:, 1:], cos[:L], sin[:L])
        q = torch.cat((q[:, :1], q_grid), dim=1)
        k = torch.cat((k[:, :1], k_grid), dim=1)
        return self.o_proj(multi_head_attention(q, k, v))

    def forward(self, hidden_states: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
        def attend(x: torch.Tensor) -> torch.Tensor:
            return self.attend(x, cos_sin)

        return self.residual(self.residual(hidden_states, attend, 1), self.mlp, 2)


class LPNGridEncoder(nn.Module):
    """The deep CLS-pooled grid encoder of the ``lpn_*`` and ``hybrid_*`` encoders:
    [N, S] × 2 → [N, D], the RMS-normalised CLS output (module doc). ``cls_token`` [1, 1, D]
    has std 0.02; ``norm_style`` and ``pooling_method`` do not apply (always pre-norm, CLS)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.forward_dtype = getattr(torch, config.forward_dtype)
        self.output_size, self.output_dtype = D, self.forward_dtype
        self.final_norm_eps = config.rms_norm_eps
        self.input_embed, self.output_embed = pair_embeddings(config, self.forward_dtype)
        self.cls_token = nn.Parameter(trunc_normal_init_(torch.empty(1, 1, D), std=0.02))
        self.rotary_emb = RotaryEmbedding(
            dim=D // config.num_heads,
            max_position_embeddings=2 * config.seq_len + 1,
            base=ROPE_BASE,
        )
        self.layers = nn.ModuleList(LPNTransformerBlock(config) for _ in range(config.num_layers))

    def forward(self, input_grid: torch.Tensor, output_grid: torch.Tensor) -> torch.Tensor:
        """input_grid, output_grid int [N, S] → [N, D]."""
        hidden = embed_pair(self.input_embed, self.output_embed, input_grid, output_grid)
        cls = self.cls_token.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        hidden = torch.cat((cls, hidden), dim=1)
        cos_sin = self.rotary_emb()
        for layer in self.layers:
            hidden = layer(hidden, cos_sin)
        return rms_norm(hidden[:, 0], variance_epsilon=self.final_norm_eps)
