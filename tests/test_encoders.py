"""Demonstration encoders: the contract of every registered encoder, packed encoding, the KL,
QK normalisation, and ETRM's checkpoint keys and outputs (fixtures in tests/fixtures/)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from models.encoders.base import (
    ENCODERS,
    DemoEncoder,
    EncoderConfig,
    EncoderOutput,
    build_encoder,
    encode_demo_slots,
)
from models.encoders.blocks import rms_norm_heads
from models.encoders.variational_head import gaussian_kl
from utils.schema import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
ETRM_TYPES = [
    "standard",
    "variational",
    "lpn_standard",
    "lpn_variational",
    "lpn_variational_v2",
    "hybrid_standard",
    "hybrid_variational",
    "lpn",
    "lpn_var",
]
PER_DEMO_LATENTS = {"lpn_variational", "lpn_var"}
SIDE = 8  # 8 × 8 canvases keep the tests fast; ARC's is 30 × 30
TINY = dict(
    hidden_size=32,
    num_heads=2,
    num_layers=1,
    output_tokens=4,
    seq_len=SIDE * SIDE,
    forward_dtype="float32",
)
# Rows with K, 1, 0 and 2 valid demos (the last with a gap at slot 0).
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("standard", {"pooling_method": "attention"}),
    ("standard", {"pooling_method": "weighted"}),
    ("standard", {"norm_style": "pre", "layer_scale_init": 0.1, "set_encoder_layers": 2}),
    ("standard", {"qk_norm": True, "pooling_method": "attention"}),
    ("hybrid_variational", {"layer_scale_init": 0.1, "qk_norm": True}),
    ("lpn", {"qk_norm": True}),
]
CASES = [(name, {}) for name in ENCODERS.names()] + VARIANTS
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in over.items()) for name, over in CASES]


def arc_like(mask: torch.Tensor, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """demo_inputs, demo_labels int [B, K, side²]: colours 2..11 in an h × w corner closed by
    EOS (1) on the row and column after it, PAD (0) elsewhere and in empty slots."""
    g = torch.Generator().manual_seed(seed)
    B, K = mask.shape
    grids = torch.zeros(2, B, K, side, side, dtype=torch.int64)
    for which, b, k in ((w, b, k) for w in range(2) for b in range(B) for k in range(K)):
        if mask[b, k]:
            h, w = torch.randint(1, side, (2,), generator=g).tolist()
            grids[which, b, k, :h, :w] = torch.randint(2, 12, (h, w), generator=g)
            grids[which, b, k, h, : w + 1] = 1
            grids[which, b, k, :h, w] = 1
    return grids[0].flatten(2), grids[1].flatten(2)


def make(name: str, seed: int = 0, **overrides: Any) -> DemoEncoder:
    torch.manual_seed(seed)
    return build_encoder(EncoderConfig(encoder_type=name, **{**TINY, **overrides}))


def run(encoder: DemoEncoder, mask: torch.Tensor = MASK, seed: int = 7) -> EncoderOutput:
    inputs, labels = arc_like(mask, SIDE, seed)
    state = encoder.initial_state(mask.shape[0]) if encoder.is_recurrent else None
    return encoder(inputs, labels, mask, state)


def context_loss(out: EncoderOutput) -> torch.Tensor:
    """A loss no parameter can be indifferent to: the context against fixed random weights."""
    weights = torch.randn(out.context.shape, generator=torch.Generator().manual_seed(3))
    return (out.context.float() * weights).sum()


def outputs_of(out: EncoderOutput) -> dict[str, torch.Tensor]:
    fields = ("context", "z_pooled", "kl_per_sample", "mu", "logvar")
    return {f: getattr(out, f) for f in fields if getattr(out, f) is not None}


# ---------------------------------------------------------------------------------------------
# Contract of every registered encoder
# ---------------------------------------------------------------------------------------------
def test_the_registry_has_every_etrm_encoder() -> None:
    assert set(ETRM_TYPES) <= set(ENCODERS.names())
    with pytest.raises(ValueError, match=r"choose one of: .*hybrid_standard"):
        build_encoder(EncoderConfig(encoder_type="nope", **TINY))


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_output_shapes_and_dtypes(name: str, overrides: dict[str, Any]) -> None:
    encoder = make(name, **overrides)
    out = run(encoder)
    B, T, D = MASK.shape[0], TINY["output_tokens"], TINY["hidden_size"]
    assert out.context.shape == (B, T, D) and out.context.dtype == torch.float32
    assert out.z_pooled is not None and out.z_pooled.shape[0] == B and out.z_pooled.dim() == 2
    if encoder.is_variational:
        assert out.kl_per_sample.shape == (B,) and out.kl_per_sample.dtype == torch.float32
        assert out.mu.shape == out.logvar.shape == out.z_pooled.shape
    else:
        assert out.kl_per_sample is None and out.mu is None and out.logvar is None


@pytest.mark.parametrize("name", ENCODERS.names())
def test_bfloat16_forward_gives_a_bfloat16_context(name: str) -> None:
    out = run(make(name, forward_dtype="bfloat16"), mask=MASK[:2])
    assert out.context.dtype == torch.bfloat16 and out.context.shape == (2, 4, 32)
    assert torch.isfinite(out.context.float()).all()
    if out.kl_per_sample is not None:
        assert out.kl_per_sample.dtype == torch.float32


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_every_parameter_gets_a_gradient_from_the_context(
    name: str, overrides: dict[str, Any]
) -> None:
    # No exceptions: the zero-initialised logvar heads get theirs through the sampled noise.
    encoder = make(name, **overrides).train()
    context_loss(run(encoder)).backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_packed_encoding_equals_padded_encoding(name: str, overrides: dict[str, Any]) -> None:
    encoder = make(name, **overrides).train()
    seen: list[int] = []
    grid = getattr(encoder, "grid_encoder", None)
    if grid is not None:
        grid.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    results = {}
    for pack in (True, False):
        encoder.pack_demos = pack
        torch.manual_seed(11)  # the same noise for the variational encoders
        results[pack] = outputs_of(run(encoder))
    assert results[True].keys() == results[False].keys()
    for field, packed in results[True].items():
        torch.testing.assert_close(packed, results[False][field], atol=2e-6, rtol=1e-5)
    if grid is not None:
        assert seen == [int(MASK.sum()), MASK.numel()]


def test_packing_scatters_each_vector_to_its_own_slot() -> None:
    def grid(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack((inputs[:, 0], labels[:, 0]), dim=-1).float()

    grid.output_size, grid.output_dtype = 2, torch.float32
    inputs = torch.arange(4 * 3 * 5).view(4, 3, 5)
    labels = -inputs
    slots = encode_demo_slots(grid, inputs, labels, MASK, pack=True)
    expected = torch.stack((inputs[..., 0], labels[..., 0]), dim=-1).float() * MASK[..., None]
    assert torch.equal(slots, expected)
    empty = encode_demo_slots(grid, inputs, labels, torch.zeros_like(MASK), pack=True)
    assert torch.equal(empty, torch.zeros(4, 3, 2))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_rows_without_demos_are_finite(name: str, overrides: dict[str, Any], pack: bool) -> None:
    encoder = make(name, **overrides).train()
    encoder.pack_demos = pack
    for mask in (MASK, torch.zeros_like(MASK)):
        encoder.zero_grad()
        out = run(encoder, mask=mask)
        for field, value in outputs_of(out).items():
            assert torch.isfinite(value).all(), field
        loss = context_loss(out)
        if out.kl_per_sample is not None:
            assert torch.equal(
                out.kl_per_sample[~mask.any(1)], torch.zeros(int((~mask.any(1)).sum()))
            )
            loss = loss + out.kl_per_sample.sum()
        loss.backward()
        for n, p in encoder.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=CASE_IDS)
def test_eval_mode_is_deterministic(name: str, overrides: dict[str, Any]) -> None:
    encoder = make(name, **overrides)
    if not encoder.deterministic_at_eval:
        pytest.skip(f"{name} is not deterministic at evaluation")
    encoder.eval()
    first, second = outputs_of(run(encoder)), outputs_of(run(encoder))
    for field in first:
        assert torch.equal(first[field], second[field]), field
    if encoder.is_variational:
        # Evaluation decodes the posterior mean; training samples around it.
        assert torch.equal(first["z_pooled"], first["mu"])
        encoder.train()
        assert not torch.equal(run(encoder).context, run(encoder).context)


# ---------------------------------------------------------------------------------------------
# KL divergence
# ---------------------------------------------------------------------------------------------
def test_gaussian_kl_by_hand() -> None:
    # KL(N(1, 1) ‖ N(0, 1)) = ½; KL(N(0, 2) ‖ N(0, 1)) = ½ (2 − 1 − ln 2).
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    expected = torch.tensor([0.5 + 0.5 * (1 - math.log(2.0)), 0.0])
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)


VARIATIONAL = [name for name in ENCODERS.names() if ENCODERS.get(name).is_variational]


@pytest.mark.parametrize("name", VARIATIONAL)
def test_kl_per_sample_is_the_closed_form(name: str) -> None:
    encoder = make(name).train()
    captured: dict[str, torch.Tensor] = {}
    for head in ("mu_proj", "logvar_proj"):
        getattr(encoder, head).register_forward_hook(
            lambda _m, _a, out, head=head: captured.__setitem__(head, out.detach().double())
        )
    out = run(encoder)
    mu, logvar = captured["mu_proj"], captured["logvar_proj"]
    assert logvar.abs().max() < 10  # so no clamp is in play
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)  # [B] or [B, K]
    has_demos = MASK.any(1)
    if kl.dim() == 2:  # one latent per demo: averaged over the row's valid demos
        kl = (kl * MASK).sum(1) / MASK.sum(1).clamp(min=1)
    expected = torch.where(has_demos, kl, 0.0).float()
    torch.testing.assert_close(out.kl_per_sample, expected, atol=1e-5, rtol=1e-5)
    assert out.kl_per_sample[has_demos].min() > 0


@pytest.mark.parametrize("name", ["hybrid_variational", "lpn_var"])
def test_logvar_is_clamped_where_etrm_clamps_it(name: str) -> None:
    encoder = make(name).eval()
    with torch.no_grad():
        encoder.logvar_proj.weight.normal_(std=1e3)
    out = run(encoder)
    assert out.logvar.abs().max() <= 10 and out.logvar.abs().max() > 9
    assert torch.isfinite(out.kl_per_sample).all()


# ---------------------------------------------------------------------------------------------
# QK normalisation
# ---------------------------------------------------------------------------------------------
def test_rms_norm_heads_normalises_the_first_heads_only() -> None:
    y = torch.tensor([[3.0, 4.0, 0.0, 2.0, 5.0, 6.0]])
    out = rms_norm_heads(y, num_heads=2, head_dim=2, eps=0.0)
    rms = math.sqrt((9 + 16) / 2)
    expected = torch.tensor([[3 / rms, 4 / rms, 0.0, math.sqrt(2.0), 5.0, 6.0]])
    torch.testing.assert_close(out, expected)


def scale_queries_and_keys(encoder: DemoEncoder, factor: float) -> None:
    """Multiply every query and key projection (fused ones: their first two thirds) by
    ``factor``; ETRM's parameter names say which they are."""
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)
            elif name.endswith("qkv_proj.weight"):
                p[: 2 * p.shape[0] // 3].mul_(factor)


QK_NORM_CASES = [
    ("standard", {"pooling_method": "attention"}),
    ("hybrid_standard", {}),
    ("lpn_standard", {}),
    ("lpn", {}),
]


@pytest.mark.parametrize(("name", "overrides"), QK_NORM_CASES)
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(
    name: str, overrides: dict[str, Any]
) -> None:
    # A negligible epsilon: the context's query tokens start tiny (std 0.02), where 1e-5 counts.
    overrides = {**overrides, "rms_norm_eps": 1e-12}
    plain = make(name, **overrides).eval()
    normed = make(name, qk_norm=True, **overrides).eval()
    normed.load_state_dict(plain.state_dict())  # same names, same weights
    reference, reference_normed = run(plain).context, run(normed).context
    assert not torch.allclose(reference, reference_normed, atol=1e-3)
    for encoder in (plain, normed):
        scale_queries_and_keys(encoder, 4.0)
    torch.testing.assert_close(run(normed).context, reference_normed, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(run(plain).context, reference, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lpn", "lpn_var"])
def test_paper_lpn_refuses_non_square_grids(name: str) -> None:
    with pytest.raises(ConfigError, match="seq_len=60 is not a square"):
        make(name, seq_len=60)


# ---------------------------------------------------------------------------------------------
# ETRM compatibility (fixtures produced by running ETRM's code; tests/fixtures/README.md)
# ---------------------------------------------------------------------------------------------
def etrm_config(base: dict[str, Any], overrides: dict[str, Any]) -> EncoderConfig:
    return EncoderConfig(**{**base, **overrides})


KEY_CASES = json.loads((FIXTURES / "etrm_encoder_keys.json").read_text())


@pytest.mark.parametrize("case", sorted(KEY_CASES["cases"]))
def test_state_dict_keys_and_shapes_equal_etrms(case: str) -> None:
    expected = KEY_CASES["cases"][case]
    encoder = build_encoder(etrm_config(KEY_CASES["base_config"], expected["overrides"]))
    ours = {k: list(v.shape) for k, v in encoder.state_dict().items()}
    assert ours == expected["state_dict"]


GOLDEN = torch.load(FIXTURES / "etrm_encoders_golden.pt", weights_only=True)


def golden_encoder(case: dict[str, Any]) -> DemoEncoder:
    """Our encoder for a fixture case: the paper LPN encoders at the fixture's size."""
    config = etrm_config(GOLDEN["base_config"], case["overrides"])
    cls = ENCODERS.get(config.encoder_type)
    if hasattr(cls, "LPN_HIDDEN_SIZE"):
        size = {
            "LPN_HIDDEN_SIZE": GOLDEN["lpn_hidden_size"],
            "LPN_NUM_HEADS": GOLDEN["lpn_num_heads"],
        }
        cls = type(cls.__name__, (cls,), size)
    encoder = cls(config)
    state = {k: v.to(torch.float32) for k, v in case["state_dict"].items()}
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("name", ETRM_TYPES)
def test_outputs_equal_etrms_with_its_weights(name: str, pack: bool) -> None:
    case = GOLDEN["cases"][name]
    encoder = golden_encoder(case)
    encoder.pack_demos = pack
    mask = GOLDEN["demo_mask"]
    with torch.no_grad():
        out = encoder(case["demo_inputs"].long(), case["demo_labels"].long(), mask)
    has_demos = mask.any(1)
    compared = torch.isfinite(case["context"]).flatten(1).all(1)
    assert compared[has_demos].all()  # ETRM's output is finite wherever there are demos
    torch.testing.assert_close(
        out.context[compared], case["context"][compared], atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        out.z_pooled[has_demos], case["z_pooled"][has_demos], atol=1e-5, rtol=1e-4
    )
    if "kl_loss" not in case:
        assert out.kl_per_sample is None
        return
    for field in ("mu", "logvar"):
        torch.testing.assert_close(
            getattr(out, field)[has_demos], case[field][has_demos], atol=1e-5, rtol=1e-4
        )
    kl = out.kl_per_sample
    assert torch.equal(kl[~has_demos], torch.zeros(int((~has_demos).sum())))
    if name in PER_DEMO_LATENTS:
        # ETRM: the mean over every valid demo of the batch.
        counts = mask.sum(1).float()
        torch.testing.assert_close(
            (kl * counts).sum() / counts.sum(), case["kl_loss"], atol=1e-5, rtol=1e-5
        )
    else:
        # ETRM: the batch mean, rows without demos included; ours is 0 there.
        etrm_rows = gaussian_kl(case["mu"], case["logvar"])
        torch.testing.assert_close(etrm_rows.mean(), case["kl_loss"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kl[has_demos], etrm_rows[has_demos], atol=1e-5, rtol=1e-5)
