"""Transformer building blocks with upstream's exact math and parameter names.

Upstream ``models/layers.py`` (``CastedLinear``, ``CastedEmbedding``, ``RotaryEmbedding``,
``Attention``, ``SwiGLU``, ``rms_norm``).

Weights are float32 masters cast to the activation dtype at every call ("casted" layers), so
``forward_dtype=bfloat16`` runs in bf16 while the optimizers update fp32 parameters.
Shapes: B batch, S sequence (prefix + tokens), D hidden, H heads, Dh head_dim.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from torch import nn

from models import per_sample
from models.common import trunc_normal_init_

CosSin = tuple[torch.Tensor, torch.Tensor]


def _find_multiple(a: int, b: int) -> int:
    """Smallest multiple of ``b`` that is >= ``a``."""
    return -(a // -b) * b


@per_sample.collecting_layer
class CastedLinear(nn.Module):
    """``y = x Wᵀ + b`` with fp32 ``weight`` [out, in] (truncated LeCun normal, std 1/√in) and
    zero-initialised ``bias`` [out], both cast to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            trunc_normal_init_(torch.empty(out_features, in_features), std=in_features**-0.5)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sink = per_sample.active(self.weight, self.bias)
        if sink is not None:
            return per_sample.linear(x, self.weight, self.bias, sink)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


@per_sample.collecting_layer
class CastedEmbedding(nn.Module):
    """Lookup in an fp32 ``embedding_weight`` [num, D] (truncated normal, ``init_std``), cast to
    ``cast_to`` before the gather."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, init_std: float, cast_to: torch.dtype
    ) -> None:
        super().__init__()
        self.cast_to = cast_to
        self.embedding_weight = nn.Parameter(
            trunc_normal_init_(torch.empty(num_embeddings, embedding_dim), std=init_std)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int → [..., D] in ``cast_to``."""
        sink = per_sample.active(self.embedding_weight)
        if sink is not None:
            return per_sample.embedding(ids, self.embedding_weight, self.cast_to, sink)
        return F.embedding(ids, self.embedding_weight.to(self.cast_to))

    def add_table(self, x: torch.Tensor) -> torch.Tensor:
        """``x + table`` for x [B, num, D] in ``cast_to``: the whole table added to every
        sample (learned positions)."""
        sink = per_sample.active(self.embedding_weight)
        if sink is not None:
            return per_sample.add_broadcast(x, self.embedding_weight, sink)
        return x + self.embedding_weight.to(self.cast_to)


class RotaryEmbedding(nn.Module):
    """1-D RoPE tables over ``max_position_embeddings`` positions (GPT-NeoX "rotate half" layout).

    ``cos_cached``/``sin_cached`` [S, Dh] float32 are non-persistent buffers, so checkpoints do
    not carry them.
    """

    def __init__(self, dim: int, max_position_embeddings: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        positions = torch.arange(max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", table.cos(), persistent=False)
        self.register_buffer("sin_cached", table.sin(), persistent=False)

    def forward(self) -> CosSin:
        return self.cos_cached, self.sin_cached


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., Dh] → [..., Dh]: (x1, x2) ↦ (−x2, x1) on the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys in float32 (the tables' dtype), then cast back."""
    dtype = q_BSHD.dtype
    cos, sin = cos_SD.unsqueeze(-2), sin_SD.unsqueeze(-2)  # broadcast over heads
    q, k = q_BSHD.to(cos.dtype), k_BSHD.to(cos.dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q.to(dtype), k.to(dtype)


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``: no mask, no dropout.

    ``qkv_proj`` [D → (H + 2·Hkv)·Dh] and ``o_proj`` [H·Dh → D], both without bias. Note that
    H·Dh may be smaller than D (upstream's baseline: 12 heads of 42 on D = 512).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_key_value_heads: int,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.output_size = head_dim * num_heads
        self.causal = causal
        qkv_heads = num_heads + 2 * num_key_value_heads
        self.qkv_proj = CastedLinear(hidden_size, qkv_heads * head_dim, bias=False)
        self.o_proj = CastedLinear(self.output_size, hidden_size, bias=False)

    def forward(self, cos_sin: CosSin | None, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, S, D] → [B, S, D]."""
        B, S, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(
            B, S, self.num_heads + 2 * self.num_key_value_heads, self.head_dim
        )
        q = qkv[:, :, : self.num_heads]
        k = qkv[:, :, self.num_heads : self.num_heads + self.num_key_value_heads]
        v = qkv[:, :, self.num_heads + self.num_key_value_heads :]
        if cos_sin is not None:
            q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        q, k, v = (einops.rearrange(t, "B S H D -> B H S D") for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        out = einops.rearrange(out, "B H S D -> B S (H D)")
        return self.o_proj(out)


class SwiGLU(nn.Module):
    """``down(silu(gate) · up)`` with inner width round_up(round(expansion·D·2/3), 256).

    ``gate_up_proj`` [D → 2·inner] and ``down_proj`` [inner → D], without bias.
    """

    def __init__(self, hidden_size: int, expansion: float) -> None:
        super().__init__()
        inner = _find_multiple(round(expansion * hidden_size * 2 / 3), 256)
        self.gate_up_proj = CastedLinear(hidden_size, inner * 2, bias=False)
        self.down_proj = CastedLinear(inner, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rms_norm(hidden_states: torch.Tensor, variance_epsilon: float) -> torch.Tensor:
    """Weightless RMSNorm over the last axis, computed in float32 and cast back."""
    dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + variance_epsilon)
    return x.to(dtype)
