"""Blocks the demonstration encoders share: QK normalisation, masked attention, residual blocks.

QK normalisation (``EncoderConfig.qk_norm``; ETRM declared it and never implemented it): the
queries and keys of every head are RMS-normalised over the head dimension before the dot
product, without learned gains (like every norm in this model), so each attention logit lies in
[−√Dh, √Dh]. It is done inside the projection that makes q and k (``QKNormCastedLinear``,
``QKNormLinear``), so parameter names stay ETRM's. RoPE rotates pairs of channels and keeps the
per-head RMS, so normalising before the rotation equals normalising after it.

Residual blocks (``ResidualBlock``) are post-norm ``rms(h + γ·f(h))`` or pre-norm
``h + γ·f(rms(h))``, with CaiT's optional per-channel layer scale γ (``gamma_1`` for the
attention, ``gamma_2`` for the MLP, [D] float32 starting at ``layer_scale_init``).

Shapes: B batch, S queries, K keys, H heads, Dh head_dim, D hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Attention, CastedLinear, rms_norm


def rms_norm_heads(y: torch.Tensor, num_heads: int, head_dim: int, eps: float) -> torch.Tensor:
    """y [..., F] → y with each of its first ``num_heads`` blocks of ``head_dim`` features
    RMS-normalised on its own; the remaining features (the values of a fused qkv) untouched."""
    width = num_heads * head_dim
    heads = y[..., :width].unflatten(-1, (num_heads, head_dim))
    normed = rms_norm(heads, variance_epsilon=eps).flatten(-2)
    return torch.cat((normed, y[..., width:]), dim=-1) if width < y.shape[-1] else normed


class HeadNormMixin:
    """Mixed into a bias-free linear layer (before it in the bases): its first ``num_heads``
    output heads of ``head_dim`` come out RMS-normalised (``rms_norm_heads``), so the q (and k)
    part of a projection keeps the plain layer's parameter names."""

    def __init__(
        self, in_features: int, out_features: int, num_heads: int, head_dim: int, eps: float
    ) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.normed_heads, self.head_dim, self.eps = num_heads, head_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_heads(super().forward(x), self.normed_heads, self.head_dim, self.eps)


class QKNormCastedLinear(HeadNormMixin, CastedLinear):
    """A ``CastedLinear`` with normalised output heads (``HeadNormMixin``)."""


class QKNormLinear(HeadNormMixin, nn.Linear):
    """A float32 ``nn.Linear`` (the LPN paper encoder's) with normalised output heads."""


def projection(
    in_features: int,
    out_features: int,
    qk_norm_heads: int = 0,
    head_dim: int = 1,
    eps: float = 1e-5,
) -> CastedLinear:
    """A bias-free ``CastedLinear`` [in → out]; with ``qk_norm_heads > 0`` its first that many
    heads of ``head_dim`` come out RMS-normalised."""
    if qk_norm_heads > 0:
        return QKNormCastedLinear(in_features, out_features, qk_norm_heads, head_dim, eps)
    return CastedLinear(in_features, out_features, bias=False)


def self_attention_layer(hidden_size: int, num_heads: int, qk_norm: bool, eps: float) -> Attention:
    """The standard grid encoder's non-causal self-attention (``qkv_proj``, ``o_proj``), with
    its q and k heads RMS-normalised when ``qk_norm``."""
    head_dim = hidden_size // num_heads
    attention = Attention(hidden_size, head_dim, num_heads, num_heads, causal=False)
    if qk_norm:
        attention.qkv_proj = QKNormCastedLinear(
            hidden_size, 3 * num_heads * head_dim, 2 * num_heads, head_dim, eps
        )
    return attention


def multi_head_attention(
    q_BSHD: torch.Tensor,
    k_BKHD: torch.Tensor,
    v_BKHD: torch.Tensor,
    key_mask_BK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal attention: q [B, S, H, Dh], k, v [B, K, H, Dh] → [B, S, H·Dh].

    ``key_mask_BK`` (True = attend) hides keys; a row with no key left attends to all of its
    keys instead, so that an empty set (a row without demos, an all-PAD grid) gives a finite
    output and finite gradients rather than softmax over nothing (NaN on some backends).
    """
    q, k, v = (einops.rearrange(t, "B S H D -> B H S D") for t in (q_BSHD, k_BKHD, v_BKHD))
    mask = None
    if key_mask_BK is not None:
        usable = key_mask_BK | ~key_mask_BK.any(dim=-1, keepdim=True)
        mask = usable[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return einops.rearrange(out, "B H S D -> B S (H D)")


class ResidualBlock(nn.Module):
    """Base of the encoders' transformer blocks: their residual sub-layers (module doc).

    ``gamma_1``/``gamma_2`` exist only when ``layer_scale_init > 0`` (ETRM's parameter names,
    on the block itself).
    """

    def __init__(
        self, hidden_size: int, layer_scale_init: float, pre_norm: bool, eps: float
    ) -> None:
        super().__init__()
        self.pre_norm, self.norm_eps = pre_norm, eps
        self.use_layer_scale = layer_scale_init > 0
        if self.use_layer_scale:
            self.gamma_1 = nn.Parameter(layer_scale_init * torch.ones(hidden_size))
            self.gamma_2 = nn.Parameter(layer_scale_init * torch.ones(hidden_size))

    def residual(
        self, h: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor], which: int
    ) -> torch.Tensor:
        """h [..., D] after residual sub-layer ``which`` (1: attention, 2: MLP), a map
        [..., D] → [..., D]."""
        out = sublayer(rms_norm(h, variance_epsilon=self.norm_eps) if self.pre_norm else h)
        if self.use_layer_scale:
            out = getattr(self, f"gamma_{which}").to(out.dtype) * out
        return h + out if self.pre_norm else rms_norm(h + out, variance_epsilon=self.norm_eps)
