"""EMAHelper: closed-form shadow, names without wrapper prefixes, copies and checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from models.ema import EMAHelper, unwrap_module

# torch.compile imports torch._dynamo, which warns about its own use of torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


class Tiny(nn.Module):
    """Two trainable tensors, one frozen parameter and one buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2, dtype=torch.float64)
        self.frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
        self.register_buffer("H_init", torch.zeros(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.frozen + self.H_init


def _fill(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_shadow_follows_the_closed_form() -> None:
    torch.manual_seed(0)
    model = Tiny()
    p0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    mu, k, target = 0.9, 7, 2.5
    ema = EMAHelper(mu)
    ema.register(model)
    _fill(model, target)
    for _ in range(k):
        ema.update(model)
    for name in ("linear.weight", "linear.bias"):
        expected = target + (p0[name] - target) * mu**k
        torch.testing.assert_close(ema.shadow[name], expected, rtol=0, atol=1e-12)


def test_buffers_and_frozen_parameters_are_excluded() -> None:
    ema = EMAHelper()
    ema.register(Tiny())
    assert sorted(ema.shadow) == ["linear.bias", "linear.weight"]


def test_compile_and_data_parallel_prefixes_are_stripped() -> None:
    torch.manual_seed(0)
    model = Tiny()
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until it is called
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    assert unwrap_module(compiled) is model
    assert unwrap_module(nn.DataParallel(compiled)) is model

    ema = EMAHelper(0.5)
    ema.register(compiled)
    assert sorted(ema.shadow) == ["linear.bias", "linear.weight"]
    start = model.linear.weight.detach().clone()
    _fill(model, 1.0)
    ema.update(nn.DataParallel(model))  # the same names through another wrapper
    torch.testing.assert_close(ema.shadow["linear.weight"], 0.5 * start + 0.5)


def test_ema_copy_leaves_the_original_untouched() -> None:
    torch.manual_seed(0)
    model = Tiny()
    ema = EMAHelper(0.0)  # mu = 0: the shadow becomes the latest parameters
    ema.register(model)
    _fill(model, 3.0)
    ema.update(model)
    _fill(model, -1.0)

    copy = ema.ema_copy(model)
    assert copy is not model
    assert torch.equal(copy.linear.weight, torch.full((2, 3), 3.0, dtype=torch.float64))
    assert torch.equal(model.linear.weight, torch.full((2, 3), -1.0, dtype=torch.float64))
    assert torch.equal(copy.frozen, model.frozen)  # not averaged, copied as is

    compiled_copy = ema.ema_copy(torch.compile(model))
    assert torch.equal(unwrap_module(compiled_copy).linear.bias, torch.full((2,), 3.0).double())
    assert torch.equal(model.linear.bias, torch.full((2,), -1.0).double())


def test_ema_writes_the_shadow_in_place() -> None:
    model = Tiny()
    ema = EMAHelper()
    ema.register(model)
    expected = ema.shadow["linear.weight"].clone()
    _fill(model, 9.0)
    ema.ema(model)
    assert torch.equal(model.linear.weight, expected)


def test_state_round_trip() -> None:
    torch.manual_seed(0)
    model = Tiny()
    ema = EMAHelper(0.8)
    ema.register(model)
    _fill(model, 1.0)
    ema.update(model)

    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMAHelper(0.8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.shadow.keys() == ema.shadow.keys()
    for helper in (ema, restored):
        helper.update(model)
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value)


def test_load_strips_the_compile_prefix() -> None:
    model = Tiny()
    ema = EMAHelper()
    ema.register(model)
    prefixed = {f"_orig_mod.{name}": value for name, value in ema.state_dict().items()}
    restored = EMAHelper()
    restored.load_state_dict(prefixed)
    restored.update(model)
    assert sorted(restored.shadow) == ["linear.bias", "linear.weight"]


def test_mismatched_module_raises() -> None:
    ema = EMAHelper()
    ema.register(Tiny())
    with pytest.raises(ValueError, match="differ from the registered"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="differ from the registered"):
        ema.ema(nn.Sequential(Tiny()))
    other = Tiny()
    other.linear = nn.Linear(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        ema.update(other)


@pytest.mark.parametrize("mu", [-0.1, 1.5])
def test_bad_mu_raises(mu: float) -> None:
    with pytest.raises(ValueError, match="mu"):
        EMAHelper(mu)
