"""Building blocks against first-principles formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.common import trunc_normal_init_
from models.layers import (
    Attention,
    CastedEmbedding,
    CastedLinear,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary_pos_emb,
    rms_norm,
)


def truncated_sd(lower: float, upper: float) -> float:
    """Standard deviation of N(0, 1) truncated to [lower, upper] (textbook formula)."""
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    z = cdf(upper) - cdf(lower)
    mean = (pdf(lower) - pdf(upper)) / z
    var = 1 + (lower * pdf(lower) - upper * pdf(upper)) / z - mean**2
    return math.sqrt(var)


@pytest.mark.parametrize("std", [1.0, 0.02])
def test_trunc_normal_has_the_requested_std_and_bounds(std: float) -> None:
    torch.manual_seed(0)
    t = trunc_normal_init_(torch.empty(400_000), std=std)
    assert abs(t.std().item() / std - 1) < 0.01
    assert abs(t.mean().item()) < 0.01 * std
    bound = 2 * std / truncated_sd(-2, 2)
    assert t.abs().max().item() <= bound + 1e-7
    assert t.abs().max().item() > 0.99 * bound
    assert torch.count_nonzero(trunc_normal_init_(torch.ones(5), std=0)) == 0


def test_casted_linear_and_embedding_cast_to_the_activation_dtype() -> None:
    lin = CastedLinear(8, 3, bias=True)
    assert lin.weight.dtype == torch.float32 and torch.count_nonzero(lin.bias) == 0
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x @ lin.weight.to(torch.bfloat16).T))
    emb = CastedEmbedding(5, 4, init_std=0.1, cast_to=torch.bfloat16)
    out = emb(torch.tensor([[1, 4]]))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 4)
    torch.testing.assert_close(out[0, 1], emb.embedding_weight[4].to(torch.bfloat16))


@pytest.mark.parametrize(
    ("hidden", "expansion", "inner"), [(512, 4, 1536), (97, 4, 512), (916, 4, 2560), (64, 2, 256)]
)
def test_swiglu_inner_width_rounds_up_to_256(hidden: int, expansion: float, inner: int) -> None:
    m = SwiGLU(hidden, expansion)
    assert m.gate_up_proj.weight.shape == (2 * inner, hidden)
    assert m.down_proj.weight.shape == (hidden, inner)
    x = torch.randn(3, hidden)
    gate, up = (x @ m.gate_up_proj.weight.T).split(inner, dim=-1)
    torch.testing.assert_close(m(x), (gate * torch.sigmoid(gate) * up) @ m.down_proj.weight.T)


def test_rms_norm_is_weightless_and_computed_in_float32() -> None:
    x = torch.randn(4, 10) * 3
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rms_norm(x, 1e-5), expected)
    xb = x.to(torch.bfloat16)
    assert rms_norm(xb, 1e-5).dtype == torch.bfloat16


def test_rope_rotates_pairs_by_position_times_frequency() -> None:
    dim, S, base = 8, 5, 10000.0
    rope = RotaryEmbedding(dim, S, base)
    cos, sin = rope()
    assert cos.shape == (S, dim) and "cos_cached" not in rope.state_dict()
    q = torch.randn(1, S, 2, dim)
    k = torch.randn(1, S, 2, dim)
    q_rot, _ = apply_rotary_pos_emb(q, k, cos, sin)
    # Pair (i, i + dim/2) at position p turns by angle p·base^(−2i/dim).
    for p in range(S):
        for i in range(dim // 2):
            theta = p * base ** (-2 * i / dim)
            a, b = q[0, p, :, i], q[0, p, :, i + dim // 2]
            torch.testing.assert_close(q_rot[0, p, :, i], a * math.cos(theta) - b * math.sin(theta))
            torch.testing.assert_close(
                q_rot[0, p, :, i + dim // 2], b * math.cos(theta) + a * math.sin(theta)
            )
    # Rotations preserve norms; relative positions only: <R_p q, R_r k> depends on p − r.
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))


def test_attention_equals_softmax_attention_by_hand() -> None:
    torch.manual_seed(0)
    D, H, Dh, S = 16, 2, 8, 5
    attn = Attention(D, Dh, H, H)
    x = torch.randn(2, S, D)
    qkv = (x @ attn.qkv_proj.weight.T).view(2, S, 3 * H, Dh)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : 2 * H], qkv[:, :, 2 * H :]
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(Dh)
    out = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(2, S, H * Dh)
    torch.testing.assert_close(attn(None, x), out @ attn.o_proj.weight.T)
    assert F.scaled_dot_product_attention is not None


def test_attention_allows_fewer_channels_than_hidden() -> None:
    attn = Attention(512, 512 // 12, 12, 12)
    assert attn.qkv_proj.weight.shape == (3 * 12 * 42, 512)
    assert attn.o_proj.weight.shape == (512, 504)
    assert attn(None, torch.randn(1, 3, 512)).shape == (1, 3, 512)
