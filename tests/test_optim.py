"""AdamATan2 against a hand-written float64 reference, and the learning-rate schedule."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from utils.optim import (
    AdamATan2,
    cosine_schedule_with_warmup_lr_lambda,
    is_fused_available,
    set_lr,
)


def reference_adam_atan2(
    p0: np.ndarray,
    grads: list[np.ndarray | None],
    lrs: list[float],
    betas: tuple[float, float],
    weight_decay: float,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The adam-atan2 0.0.3 kernel in float64 numpy: (p, m, v) after each step.

    A ``None`` gradient skips the step entirely (no decay, the step counter does not advance).
    """
    b1, b2 = betas
    p, m, v = p0.astype(np.float64), np.zeros_like(p0, np.float64), np.zeros_like(p0, np.float64)
    t = 0
    history = []
    for g, lr in zip(grads, lrs, strict=True):
        if g is not None:
            t += 1
            p = p * (1.0 - lr * weight_decay)
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            denom = np.sqrt(v) / math.sqrt(1.0 - b2**t)
            p = p - lr / (1.0 - b1**t) * np.arctan2(m, denom)
        history.append((p.copy(), m.copy(), v.copy()))
    return history


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_matches_float64_reference_over_steps(dtype: torch.dtype, atol: float) -> None:
    rng = np.random.default_rng(0)
    betas, wd = (0.9, 0.95), 0.1
    lrs = [1e-2, 0.0, 3e-2, 5e-2, 0.2, 1e-3, 0.1]
    shapes = [(3, 4), (5,)]
    p0s = [rng.normal(size=s) for s in shapes]
    grads: list[list[np.ndarray | None]] = [
        [rng.normal(scale=0.5, size=s) for _ in lrs] for s in shapes
    ]
    grads[1][3] = None  # the second parameter misses a step: its own counter lags behind
    expected = [
        reference_adam_atan2(p0, g, lrs, betas, wd) for p0, g in zip(p0s, grads, strict=True)
    ]

    params = [torch.nn.Parameter(torch.tensor(p0, dtype=dtype)) for p0 in p0s]
    opt = AdamATan2(params, lr=1.0, betas=betas, weight_decay=wd)
    for step, lr in enumerate(lrs):
        set_lr(opt, lr)
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g[step] is None else torch.tensor(g[step], dtype=dtype)
        opt.step()
        for i, p in enumerate(params):
            exp_p, exp_m, exp_v = expected[i][step]
            state = opt.state[p]
            np.testing.assert_allclose(p.detach().double().numpy(), exp_p, rtol=0, atol=atol)
            np.testing.assert_allclose(state["exp_avg"].double().numpy(), exp_m, atol=atol)
            np.testing.assert_allclose(state["exp_avg_sq"].double().numpy(), exp_v, atol=atol)
            if lr == 0.0 or grads[i][step] is None:
                assert torch.equal(p.detach(), before[i])
    assert opt.state[params[0]]["step"].item() == len(lrs)
    assert opt.state[params[1]]["step"].item() == len(lrs) - 1


def test_first_step_by_hand() -> None:
    # g = 0.5, β = (0.9, 0.999), t = 1: m = 0.05, v = 0.00025, sqrt(v)/sqrt(1 − 0.999) = 0.5.
    # The kernel scales by lr/(1 − β1) = 1 outside atan2: update = atan2(0.05, 0.5) = atan(0.1).
    # (Correcting m inside atan2 would give lr·atan2(0.5, 0.5) = 0.1·π/4 instead.)
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = AdamATan2([p], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(1.0 - math.atan(0.1), abs=1e-15)
    assert opt.state[p]["exp_avg"].item() == pytest.approx(0.05, abs=1e-15)
    assert opt.state[p]["exp_avg_sq"].item() == pytest.approx(0.00025, abs=1e-15)
    assert opt.state[p]["step"].dtype == torch.float32
    assert opt.state[p]["step"].item() == 1.0


def test_weight_decay_by_hand() -> None:
    # A zero gradient leaves only the decoupled decay: p·(1 − lr·wd) = 2·(1 − 0.5·0.1) = 1.9.
    p = torch.nn.Parameter(torch.tensor([2.0, -4.0], dtype=torch.float64))
    opt = AdamATan2([p], lr=0.5, weight_decay=0.1)
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.9, -3.8], dtype=torch.float64))


def test_lr_zero_leaves_params_but_moves_moments() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    before = p.detach().clone()
    opt = AdamATan2([p], lr=0.0, weight_decay=0.1)
    for _ in range(3):
        p.grad = torch.randn(4, 3)
        opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.state[p]["exp_avg"].abs().sum() > 0
    assert opt.state[p]["exp_avg_sq"].abs().sum() > 0
    assert opt.state[p]["step"].item() == 3


def test_params_without_grad_are_skipped() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = AdamATan2([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounds_once_like_the_kernel(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    p_half = torch.nn.Parameter(torch.randn(64).to(dtype))
    p_fp32 = torch.nn.Parameter(p_half.detach().float())
    opt_half = AdamATan2([p_half], lr=1e-2, weight_decay=0.1)
    opt_fp32 = AdamATan2([p_fp32], lr=1e-2, weight_decay=0.1)
    g = torch.randn(64).to(dtype)
    p_half.grad, p_fp32.grad = g, g.float()
    opt_half.step()
    opt_fp32.step()
    assert p_half.dtype == dtype
    assert torch.equal(p_half.detach(), p_fp32.detach().to(dtype))
    assert torch.equal(
        opt_half.state[p_half]["exp_avg"], opt_fp32.state[p_fp32]["exp_avg"].to(dtype)
    )


def _train(model: torch.nn.Module, opt: AdamATan2, seed: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        set_lr(opt, 0.01 * (i + 1))
        x = torch.randn(8, 4, generator=gen)
        model.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_state_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = AdamATan2(model.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.1)
    _train(model, opt, seed=1, steps=3)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = torch.nn.Linear(4, 3)
    resumed.load_state_dict(saved["model"])
    resumed_opt = AdamATan2(resumed.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.1)
    resumed_opt.load_state_dict(saved["optim"])

    _train(model, opt, seed=2, steps=3)
    _train(resumed, resumed_opt, seed=2, steps=3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_opt.state[resumed.weight]["step"].item() == 6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1e-3},
        {"lr": float("nan")},
        {"betas": (1.0, 0.9)},
        {"betas": (0.9, -0.1)},
        {"betas": (0.9,)},
        {"weight_decay": -0.1},
    ],
)
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        AdamATan2([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_sparse_grad_raises() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = AdamATan2([p])
    p.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.skipif(is_fused_available(), reason="the fused kernel is installed")
def test_fused_true_without_the_package_raises() -> None:
    with pytest.raises(RuntimeError, match="adam-atan2"):
        AdamATan2([torch.nn.Parameter(torch.zeros(1))], fused=True)


def test_cpu_never_uses_the_fused_path() -> None:
    opt = AdamATan2([torch.nn.Parameter(torch.zeros(1))])
    assert not opt._use_fused(opt.param_groups[0]["params"])


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and is_fused_available()),
    reason="needs CUDA and the adam-atan2 package's compiled kernel",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_matches_pure_pytorch(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(257, 33), (1000,), (7,)]
    fused = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    pure = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    opt_fused = AdamATan2(fused, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt_pure = AdamATan2(pure, betas=(0.9, 0.95), weight_decay=0.1, fused=False)
    for step in range(8):
        lr = 0.0 if step == 0 else 1e-3 * step
        set_lr(opt_fused, lr)
        set_lr(opt_pure, lr)
        for a, b in zip(fused, pure, strict=True):
            a.grad = torch.randn_like(a) * 0.01
            b.grad = a.grad.clone()
        opt_fused.step()
        opt_pure.step()
    # The kernel rounds like the pure path (float32 math, one rounding per store) but fuses
    # multiply-adds, so results may differ by an ulp.
    rtol, atol = (1e-5, 1e-7) if dtype == torch.float32 else (2e-2, 1e-6)
    for a, b in zip(fused, pure, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                opt_fused.state[a][key], opt_pure.state[b][key], rtol=rtol, atol=atol
            )
        assert opt_fused.state[a]["step"].item() == opt_pure.state[b]["step"].item() == 8


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------
def _lr(step: int, **kwargs: float) -> float:
    args = {"base_lr": 1e-3, "num_warmup_steps": 100, "num_training_steps": 1100} | kwargs
    return cosine_schedule_with_warmup_lr_lambda(step, **args)  # type: ignore[arg-type]


def test_schedule_warmup() -> None:
    assert _lr(0) == 0.0
    assert _lr(25) == pytest.approx(0.25e-3)
    assert _lr(99) == pytest.approx(0.99e-3)
    assert _lr(100) == pytest.approx(1e-3)  # end of warm-up: progress 0, cos(0) = 1


def test_schedule_cosine() -> None:
    # Half-way through the decay, cos(π/2) = 0: lr = base·(min + (1 − min)/2).
    assert _lr(600) == pytest.approx(0.5e-3)
    assert _lr(600, min_ratio=0.2) == pytest.approx(1e-3 * (0.2 + 0.8 * 0.5))
    # A quarter of the way: ½(1 + cos(π/4)).
    assert _lr(350) == pytest.approx(1e-3 * 0.5 * (1 + math.sqrt(0.5)))
    assert _lr(1100) == pytest.approx(0.0, abs=1e-18)
    assert _lr(1100, min_ratio=0.1) == pytest.approx(1e-4)


def test_schedule_min_ratio_one_is_constant_after_warmup() -> None:
    assert _lr(50, min_ratio=1.0) == pytest.approx(0.5e-3)
    for step in (100, 101, 600, 1100, 5000):
        assert _lr(step, min_ratio=1.0) == pytest.approx(1e-3)


def test_schedule_without_warmup() -> None:
    assert _lr(0, num_warmup_steps=0) == pytest.approx(1e-3)


def test_schedule_rejects_negative_lengths() -> None:
    with pytest.raises(ValueError, match="num_warmup_steps"):
        _lr(0, num_warmup_steps=-1)


def test_set_lr_sets_every_group() -> None:
    opt = AdamATan2(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))]},
            {"params": [torch.nn.Parameter(torch.zeros(1))]},
        ],
        lr=0.0,
    )
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_integer_step_in_a_loaded_state_is_accepted() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    b.data.copy_(a.data)
    opt_a, opt_b = AdamATan2([a], lr=0.1), AdamATan2([b], lr=0.1)
    for i in range(3):
        a.grad = b.grad = torch.full((3,), float(i) - 0.5)
        opt_a.step()
        opt_b.step()
    opt_b.state[b]["step"] = 3
    a.grad = b.grad = torch.ones(3)
    opt_a.step()
    opt_b.step()
    assert torch.equal(a, b)
    assert opt_b.state[b]["step"].dtype == torch.float32


def test_adam_atan2_survives_deepcopy() -> None:
    import copy

    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamATan2([p], lr=0.1, fused=False)
    clone = copy.deepcopy(opt)
    assert clone.fused is False
    q = clone.param_groups[0]["params"][0]
    assert q is not p
    q.grad = torch.ones(3)
    clone.step()  # a working optimizer over its own parameter copy
    assert torch.all(q < 1) and torch.equal(p, torch.ones(3))
