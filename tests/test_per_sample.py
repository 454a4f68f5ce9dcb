"""Per-sample gradients in one backward (``models.per_sample``) against one backward per sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from models import per_sample
from models.arch_config import ARCH_CONFIGS
from models.encoders.base import DemoEncoder
from models.family import family_of
from models.layers import CastedEmbedding, CastedLinear
from models.recursive_reasoning.common import ModelDims
from tests.conftest import model_batch
from training.config import load_pretrain_config
from utils.config import compose

DIMS = ModelDims(batch_size=3, seq_len=10, vocab_size=6, num_puzzle_identifiers=5)


def tiny_head(arch: str, **overrides: object) -> nn.Module:
    over = ["+experiment=tiny_cpu", f"arch={arch}", "arch.hidden_size=16",
            "arch.halt_max_steps=3", "arch.halt_exploration_prob=0"]  # fmt: skip
    over += [f"arch.{k}={v}" for k, v in overrides.items()]
    config = load_pretrain_config(compose(overrides=over)).arch
    torch.manual_seed(0)
    head = family_of(config).build(config, DIMS)
    with torch.no_grad():  # away from the zero-initialised Q head and puzzle table
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    head.train()
    return head


def tiny_batch(arch: str = "trm") -> dict[str, Tensor]:
    """The fields ``arch``'s family reads; rows 0 and 2 share a puzzle (and its demos)."""
    g = torch.Generator().manual_seed(3)
    shape = (DIMS.batch_size, DIMS.seq_len)
    labels = torch.randint(0, DIMS.vocab_size, shape, generator=g, dtype=torch.int32)
    labels[0, -4:] = -100  # a sample with ignored tokens
    base = {
        "inputs": torch.randint(0, DIMS.vocab_size, shape, generator=g, dtype=torch.int32),
        "labels": labels,
        "puzzle_identifiers": torch.tensor([1, 2, 1], dtype=torch.int32),  # one id twice
    }
    return model_batch(arch, base, DIMS.vocab_size)


def per_sample_losses(head: nn.Module, carry: object, batch: dict[str, Tensor]) -> Tensor:
    torch.manual_seed(7)  # the same dropout masks in every forward
    out = head(carry=carry, batch=batch)
    return out.lm_loss_per_sample + out.halt_loss_per_sample


def second_step_carry(head: nn.Module, batch: dict[str, Tensor]) -> object:
    """The carry after one step: the latents are no longer the init buffers."""
    with torch.no_grad():
        return head(carry=head.initial_carry(batch), batch=batch).new_carry


def flat(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def one_backward_per_sample(losses: Tensor, params: list[Tensor]) -> Tensor:
    """The reference [B, n]: sample b's gradient from its own backward pass."""
    return torch.stack(
        [
            flat(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
            for loss in losses
        ]
    )


CASES = [(name, {}) for name in ARCH_CONFIGS.names()] + [
    ("trm", {"pos_encodings": "learned"}),
    ("trm", {"pos_encodings": "none", "mlp_t": True}),
    ("trmjd", {"dropout": 0.1}),
]


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=lambda v: str(v))
def test_one_backward_gives_every_samples_own_gradient(arch: str, overrides: dict) -> None:
    """Per-sample gradients of every weight where the family reports per-sample layers;
    elsewhere of every weight outside the demonstration encoder, whose weights (learned query
    tokens among them) keep their summed gradient."""
    head = tiny_head(arch, **overrides)
    config = head.model.config
    encoder = {id(p) for m in head.modules() if isinstance(m, DemoEncoder) for p in m.parameters()}
    named = dict(head.named_parameters())
    uncollected = list(per_sample.uncollected_parameters(head))
    assert all(id(named[n]) in encoder for n in uncollected), uncollected
    if family_of(config).capabilities(config, head).per_sample_layers:
        assert uncollected == []
        encoder = set()
    trainable = [p for p in head.parameters() if p.requires_grad]
    params = [p for p in trainable if id(p) not in encoder]
    others = [p for p in trainable if id(p) in encoder]
    batch = tiny_batch(arch)
    carry = second_step_carry(head, batch)

    losses = per_sample_losses(head, carry, batch)
    expected = one_backward_per_sample(losses, params)
    summed = torch.autograd.grad(losses.sum(), params + others, allow_unused=True)

    sink = per_sample.PerSampleGradients(params, DIMS.batch_size)
    with sink:
        collected_losses = per_sample_losses(head, carry, batch)
    torch.testing.assert_close(collected_losses, losses, rtol=0, atol=0)  # the same forward
    collected_losses.sum().backward()
    J = sink.flat()
    torch.testing.assert_close(J, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(J.sum(0), flat(summed[: len(params)], params), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in params)  # nothing went to the summed gradient
    assert not torch.allclose(J[0], J[1])  # the samples really are apart
    for p, g in zip(others, summed[len(params) :], strict=True):
        assert g is not None and p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_bfloat16_rows_match_per_sample_backward_passes() -> None:
    head = tiny_head("trm", forward_dtype="bfloat16")
    batch = tiny_batch()
    carry = second_step_carry(head, batch)
    params = [p for p in head.parameters() if p.requires_grad]
    losses = per_sample_losses(head, carry, batch)
    expected = one_backward_per_sample(losses, params)
    sink = per_sample.PerSampleGradients(params, DIMS.batch_size)
    with sink:
        per_sample_losses(head, carry, batch).sum().backward()
    J = sink.flat()
    assert J.dtype == torch.float32
    for b in range(DIMS.batch_size):  # bf16 matmuls on both sides, summed in different orders
        err = torch.linalg.vector_norm(J[b] - expected[b]) / torch.linalg.vector_norm(expected[b])
        assert err < 2e-2, (b, float(err))


def test_untracked_parameters_keep_their_summed_gradient() -> None:
    head = tiny_head("trm")
    batch = tiny_batch()
    carry = second_step_carry(head, batch)
    named = dict(head.named_parameters())
    lm = named["model.inner.lm_head.weight"]
    others = [p for n, p in named.items() if p is not lm]
    losses = per_sample_losses(head, carry, batch)
    expected_lm = torch.stack(
        [torch.autograd.grad(losses[b], lm, retain_graph=True)[0] for b in range(3)]
    )
    expected_others = torch.autograd.grad(losses.sum(), others, allow_unused=True)

    sink = per_sample.PerSampleGradients([lm], DIMS.batch_size)
    with sink:
        losses = per_sample_losses(head, carry, batch)
    losses.sum().backward()
    torch.testing.assert_close(sink.flat().view_as(expected_lm), expected_lm)
    assert lm.grad is None
    for p, g in zip(others, expected_others, strict=True):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_layers_by_hand() -> None:
    """Linear, embedding and a table added to every sample, against hand-written gradients."""
    torch.manual_seed(0)
    lin, emb, pos = (
        CastedLinear(4, 3, bias=True),
        CastedEmbedding(5, 4, 1.0, torch.float32),
        (CastedEmbedding(2, 4, 1.0, torch.float32)),
    )
    ids = torch.tensor([[0, 3], [3, 3]])
    params = [lin.weight, lin.bias, emb.embedding_weight, pos.embedding_weight]
    sink = per_sample.PerSampleGradients(params, 2)
    with sink:
        h = pos.add_table(emb(ids))  # [2, 2, 4]
        y = lin(h)  # [2, 2, 3]
    g = torch.randn(2, 2, 3)
    y.backward(g)
    grads = dict(zip(["w", "b", "e", "p"], sink.flat().split([12, 3, 20, 8], dim=1), strict=True))
    with torch.no_grad():
        h = emb.embedding_weight[ids] + pos.embedding_weight
        dh = g @ lin.weight  # the cotangent reaching h
        for b in range(2):
            torch.testing.assert_close(grads["w"][b].view(3, 4), g[b].T @ h[b])
            torch.testing.assert_close(grads["b"][b], g[b].sum(0))
            e = torch.zeros(5, 4)
            e.index_add_(0, ids[b], dh[b])  # token 3 twice in sample 1: both uses add up
            torch.testing.assert_close(grads["e"][b].view(5, 4), e)
            torch.testing.assert_close(grads["p"][b].view(2, 4), dh[b])


def test_nothing_is_collected_without_grad_or_outside_the_context() -> None:
    lin = CastedLinear(4, 3, bias=False)
    x = torch.randn(2, 5, 4)
    sink = per_sample.PerSampleGradients([lin.weight], 2)
    with sink, torch.no_grad():
        y = lin(x)
    assert not y.requires_grad and torch.count_nonzero(sink.flat()) == 0
    lin(x).sum().backward()  # outside: the ordinary summed gradient
    assert lin.weight.grad is not None and torch.count_nonzero(sink.flat()) == 0
    assert per_sample.active(lin.weight) is None


def test_parameters_outside_the_collecting_layers_are_named() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = CastedLinear(4, 4, bias=False)
            self.scale = nn.Parameter(torch.ones(4))

    assert list(per_sample.uncollected_parameters(Scaled())) == ["scale"]


def test_a_batch_axis_that_is_not_the_samples_is_refused() -> None:
    lin = CastedLinear(4, 3, bias=False)
    sink = per_sample.PerSampleGradients([lin.weight], 2)
    with sink:
        y = lin(torch.randn(5, 4, requires_grad=True))  # 5 rows, not 2 samples
    with pytest.raises(ValueError, match="expected 2"):
        y.sum().backward()


def test_imports_go_from_the_layers_to_the_collectors_only() -> None:
    """``per_sample`` imports no layer module; the layers register themselves with it."""
    code = (
        "import sys; import models.per_sample as ps; "
        "assert 'models.layers' not in sys.modules, 'per_sample imported the layers'; "
        "assert ps._COLLECTING_LAYERS == []; "
        "from models.layers import CastedEmbedding, CastedLinear; "
        "assert ps._COLLECTING_LAYERS == [CastedLinear, CastedEmbedding]"
    )
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
