"""The recurrent encoders (``trm_style``, ``recurrent_standard``) and ``arch=etrmtrm``.

The point of these tests is ETRM's bug (spec §3.7): its decoder read the detached encoder
state, so no loss gradient reached the recurrent encoders. Here the step's context keeps its
gradient and only the carried state is detached; ``encoder_detach_context=True`` reproduces
ETRM's behaviour and the gradient test fails on it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from models.arch_config import ARCH_CONFIGS
from models.encoders.base import ENCODERS, EncoderConfig, build_encoder
from models.encoders.recurrent_base import RecurrentDemoEncoder
from models.etrm.etrmtrm import STATE_PREFIX, ETRMTRMConfig, TRMWithRecurrentEncoder
from models.family import family_of
from models.recursive_reasoning.act import ACTCarry
from models.recursive_reasoning.common import ModelDims

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG_ARCH = Path(__file__).parent.parent / "config" / "arch"
RECURRENT = ["trm_style", "recurrent_standard"]
SIDE = 8
B, K, S = 4, 3, SIDE * SIDE
TINY_ARCH: dict[str, Any] = dict(
    name="etrmtrm",
    hidden_size=32,
    num_heads=2,
    expansion=4,
    H_cycles=2,
    L_cycles=1,
    L_layers=1,
    puzzle_emb_len=4,
    encoder_num_layers=1,
    encoder_h_cycles=2,
    encoder_l_cycles=1,
    encoder_l_layers=1,
    halt_max_steps=8,
    forward_dtype="float32",
)
DIMS = ModelDims(batch_size=B, seq_len=S, vocab_size=12, num_puzzle_identifiers=4)
# Rows with K, 1, 0 and 2 valid demos.
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pad = MASK.unsqueeze(-1)
    return {
        "inputs": torch.randint(2, 12, (B, S), generator=g),
        "labels": torch.randint(2, 12, (B, S), generator=g),
        "puzzle_identifiers": torch.tensor([1, 2, 3, 1]),
        "group_ids": torch.tensor([0, 1, 2, 0]),
        "demo_inputs": torch.randint(2, 12, (B, K, S), generator=g) * pad,
        "demo_labels": torch.randint(2, 12, (B, K, S), generator=g) * pad,
        "demo_mask": MASK.clone(),
    }


def make_head(encoder: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    arch = ETRMTRMConfig(**{**TINY_ARCH, "recurrent_encoder_type": encoder, **overrides})
    torch.manual_seed(seed)
    return family_of(arch).build(arch, DIMS)


def encoder_state(carry: ACTCarry) -> dict[str, torch.Tensor]:
    n = len(STATE_PREFIX)
    return {k[n:]: v for k, v in carry.current_data.items() if k.startswith(STATE_PREFIX)}


# ---------------------------------------------------------------------------------------------
# The encoders on their own
# ---------------------------------------------------------------------------------------------
def make_encoder(name: str) -> RecurrentDemoEncoder:
    torch.manual_seed(0)
    config = EncoderConfig(
        encoder_type=name, hidden_size=32, num_heads=2, num_layers=1, output_tokens=4,
        seq_len=S, forward_dtype="float32", encoder_h_cycles=2, encoder_l_cycles=2,
    )  # fmt: skip
    encoder = build_encoder(config)
    assert isinstance(encoder, RecurrentDemoEncoder)
    return encoder


@pytest.mark.parametrize("name", RECURRENT)
def test_registered_as_recurrent(name: str) -> None:
    encoder = ENCODERS.get(name)
    assert encoder.is_recurrent and not encoder.is_variational
    assert not make_encoder(name).deterministic_at_eval  # its context depends on the step


@pytest.mark.parametrize("name", RECURRENT)
def test_context_is_the_blend_with_gradient_and_the_state_is_its_detached_copy(name: str) -> None:
    encoder = make_encoder(name)
    batch = make_batch(1)
    g = torch.Generator().manual_seed(2)
    state = {n: torch.randn(B, 4, 32, generator=g) for n in encoder.state_inits}
    new: dict[str, torch.Tensor] = {}
    update = encoder.update

    def spy(*args: Any) -> dict[str, torch.Tensor]:
        new.update(update(*args))
        for value in new.values():
            value.retain_grad()
        return new

    encoder.update = spy  # type: ignore[method-assign]
    out = encoder(batch["demo_inputs"], batch["demo_labels"], batch["demo_mask"], state=state)
    assert out.state is not None and set(out.state) == set(state) == set(new)
    for n in state:
        torch.testing.assert_close(out.state[n], 0.9 * state[n] + 0.1 * new[n].detach())
        assert out.state[n].grad_fn is None and not out.state[n].requires_grad
    assert torch.equal(out.context.detach(), out.state[encoder.context_state])
    assert out.context.requires_grad  # ETRM's context was the detached state: no grad_fn

    # d context / d new = 0.1 exactly; the carried part contributes nothing.
    probe = torch.randn(out.context.shape, generator=g)
    (out.context * probe).sum().backward()
    torch.testing.assert_close(new[encoder.context_state].grad, 0.1 * probe)


@pytest.mark.parametrize("name", RECURRENT)
def test_initial_state_is_the_init_buffers_and_reset_restores_them(name: str) -> None:
    encoder = make_encoder(name)
    state = encoder.initial_state(3)
    for n, buffer in encoder.state_inits.items():
        init = getattr(encoder, buffer)
        assert init.shape == (4, 32)
        assert torch.equal(state[n], init.expand(3, -1, -1))
        # ETRM's init: truncated normal with std 1, the decoder's H_init scale.
        assert 0.5 < init.std().item() < 1.5 and init.abs().max().item() <= 2.3
        state[n][1] += 1.0  # rows own their storage
        assert torch.equal(getattr(encoder, buffer), init)
    reset = encoder.reset_state(torch.tensor([True, False, False]), state)
    for n, buffer in encoder.state_inits.items():
        assert torch.equal(reset[n][0], getattr(encoder, buffer))
        assert torch.equal(reset[n][1], state[n][1])


# ---------------------------------------------------------------------------------------------
# arch=etrmtrm: the encoder inside the ACT loop
# ---------------------------------------------------------------------------------------------
def encoder_grads(head: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in head.model.encoder.named_parameters()}


@pytest.mark.parametrize("detach_context", [False, True], ids=["fixed", "etrm_bug"])
@pytest.mark.parametrize("name", RECURRENT)
def test_encoder_learns_from_the_decoder_loss_at_every_act_step(
    name: str, detach_context: bool
) -> None:
    head = make_head(name, encoder_detach_context=detach_context).train()
    batch = make_batch(0)
    carry = head.initial_carry(batch)
    for step in range(2):  # step 0 starts from the initial state, step 1 continues from it
        head.zero_grad(set_to_none=True)
        out = head(carry=carry, batch=batch)
        # Frees this step's graph: had the carried state kept a graph, the next step's backward
        # would run into it ("Trying to backward through the graph a second time").
        out.total().backward()
        carry = out.new_carry
        assert not carry.halted.any()  # every row continues with its carried state
        for value in encoder_state(carry).values():
            assert value.grad_fn is None and not value.requires_grad
        grads = encoder_grads(head)
        if detach_context:
            # ETRM's code: the decoder's loss never reaches the encoder.
            assert all(g is None for g in grads.values()), step
        else:
            silent = [n for n, g in grads.items() if g is None or not g.any()]
            assert not silent, (step, silent)
        decoder = head.model.inner.L_level.layers[0].mlp.down_proj.weight.grad
        assert decoder is not None and decoder.any()


@pytest.mark.parametrize("name", RECURRENT)
def test_rows_that_reset_restart_from_the_initial_state_with_their_new_demos(name: str) -> None:
    head = make_head(name).train()
    model: TRMWithRecurrentEncoder = head.model
    encoder = model.encoder
    first, second = make_batch(0), make_batch(1)
    carry = head.initial_carry(first)
    carry = head(carry=carry, batch=first).new_carry
    state_1 = encoder_state(carry)
    reset = torch.tensor([True, False, True, False])
    carry.halted = reset.clone()

    carry_2 = head(carry=carry, batch=second).new_carry
    state_2 = encoder_state(carry_2)
    assert torch.equal(carry_2.steps, torch.where(reset, 1, 2).to(carry_2.steps.dtype))

    def encode(batch: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict:
        demos = (batch["demo_inputs"], batch["demo_labels"], batch["demo_mask"])
        out = encoder(*demos, state=state)
        return out.state

    with torch.no_grad():
        restarted = encode(second, encoder.initial_state(B))  # new demos, fresh state
        continued = encode(first, state_1)  # old demos, carried state
    for n in encoder.state_inits:
        torch.testing.assert_close(state_2[n][reset], restarted[n][reset], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(state_2[n][~reset], continued[n][~reset], atol=1e-6, rtol=1e-5)
        # The two rules differ, so the checks above can tell them apart.
        assert not torch.allclose(restarted[n][~reset], continued[n][~reset], atol=1e-3)
    assert torch.equal(carry_2.current_data["demo_inputs"][reset], second["demo_inputs"][reset])
    assert torch.equal(carry_2.current_data["demo_inputs"][~reset], first["demo_inputs"][~reset])


@pytest.mark.parametrize("name", RECURRENT)
def test_state_survives_a_carry_state_dict_round_trip(name: str) -> None:
    head = make_head(name).train()
    batch = make_batch(0)
    carry = head(carry=head.initial_carry(batch), batch=batch).new_carry
    buffer = io.BytesIO()
    torch.save(carry.state_dict(), buffer)
    buffer.seek(0)
    restored = ACTCarry.from_state_dict(torch.load(buffer, weights_only=True))
    saved = encoder_state(restored)
    assert set(saved) == set(head.model.encoder.state_inits)
    for n, value in encoder_state(carry).items():
        assert torch.equal(saved[n], value)

    results = []
    for c in (carry, restored):
        torch.manual_seed(5)  # the same exploration draws
        out = head(carry=c, batch=batch)
        results.append((out.outputs["preds"], encoder_state(out.new_carry)))
    assert torch.equal(results[0][0], results[1][0])
    for n in saved:
        assert torch.equal(results[0][1][n], results[1][1][n])


def test_evaluation_re_encodes_from_the_carried_state_at_every_step() -> None:
    # A deterministic encoder's context is cached at evaluation; a recurrent one's cannot be.
    head = make_head("trm_style", halt_max_steps=2).eval()
    encoder = head.model.encoder
    batch = make_batch(0)
    demos = (batch["demo_inputs"], batch["demo_labels"], batch["demo_mask"])
    carry = head.initial_carry(batch)
    with torch.no_grad():
        first = head(carry=carry, batch=batch)
        second = head(carry=first.new_carry, batch=batch)
        expected = encoder(*demos, state=encoder_state(first.new_carry)).state
    assert bool(second.all_halted) and not bool(first.all_halted)
    for n, value in encoder_state(second.new_carry).items():
        torch.testing.assert_close(value, expected[n], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(value, encoder_state(first.new_carry)[n], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Configuration and checkpoint compatibility
# ---------------------------------------------------------------------------------------------
def test_yaml_validates_with_etrms_values_and_the_alias_resolves() -> None:
    raw = yaml.safe_load((CONFIG_ARCH / "etrmtrm.yaml").read_text())
    arch = ARCH_CONFIGS.get(raw["name"]).model_validate(raw)
    assert isinstance(arch, ETRMTRMConfig) and arch.family == "encoder"
    assert (arch.recurrent_encoder_type, arch.encoder_h_cycles, arch.encoder_l_cycles) == (
        "trm_style",
        3,
        4,
    )
    assert (arch.L_cycles, arch.halt_exploration_prob, arch.puzzle_emb_len) == (4, 0.1, 16)
    assert not arch.encoder_detach_context and not arch.has_kl_loss
    assert ARCH_CONFIGS.canonical("recursive_reasoning.etrmtrm@TRMWithRecurrentEncoder") == (
        "etrmtrm"
    )
    encoder_config = arch.encoder_config(12, 900)
    assert encoder_config.encoder_type == "trm_style" and encoder_config.encoder_l_layers == 2
    for field in ETRMTRMConfig.model_fields.values():
        assert field.description


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"recurrent_encoder_type": "standard"}, "not a recurrent encoder"),
        ({"recurrent_encoder_type": "nope"}, "unknown encoder_type"),
        ({"encoder_type": "lpn"}, "arch.recurrent_encoder_type"),
        ({"conditioning_refresh": "on_reset_detached"}, "cannot be cached"),
        ({"encoder_set_layers": 2}, "no effect"),
        ({"lpn_latent_dim": 64}, "no effect"),
    ],
)
def test_config_refuses_what_a_recurrent_encoder_cannot_do(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ETRMTRMConfig(**{**TINY_ARCH, **overrides})


def test_encoder_type_may_name_the_recurrent_encoder() -> None:
    arch = ETRMTRMConfig(
        **{**TINY_ARCH, "recurrent_encoder_type": "trm_style", "encoder_type": "trm_style"}
    )
    assert arch.encoder_config(12, S).encoder_type == "trm_style"


GOLDEN = json.loads((FIXTURES / "etrmtrm_model_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_state_dict_keys_and_shapes_equal_etrms(name: str) -> None:
    etrm = GOLDEN["config"]
    arch = ETRMTRMConfig(
        name="etrmtrm",
        recurrent_encoder_type=name,
        **{k: etrm[k] for k in etrm if k not in ("batch_size", "seq_len", "vocab_size")},
    )
    dims = ModelDims(etrm["batch_size"], etrm["seq_len"], etrm["vocab_size"], 1)
    head = family_of(arch).build(arch, dims)
    ours = {k: list(v.shape) for k, v in head.state_dict().items()}
    assert ours == GOLDEN["cases"][name]
