"""TRM-JD (``arch=trmjd``), its loss heads and the family's dropout.

The behaviour checked is the Jacobian-descent fork's (mattbuot/TinyRecursiveModelsJD:
``models/recursive_reasoning/trm.py`` and ``trmjd.py``, ``models/losses.py``).

Models are built from their config classes and heads constructed directly, so these tests do not
depend on the YAML loss section.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import Tensor, nn

from models.arch_config import ARCH_CONFIGS
from models.losses import (
    IGNORE_LABEL_ID,
    LOSS_HEADS,
    ACTLossHead,
    NoACTLossHead,
    stablemax_cross_entropy,
    sum_row_metrics,
)
from models.recursive_reasoning.act import ACTCarry
from models.recursive_reasoning.common import ModelDims
from models.recursive_reasoning.configs import TRMConfig, TRMJDConfig
from models.recursive_reasoning.recording import record_steps
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from models.recursive_reasoning.trmjd import TinyRecursiveReasoningModelJD_V1, perturb_carry
from models.registry import MODELS
from tests.reference_models import trm_recursion_by_hand
from tests.test_losses import FakeCarry, FakeModel
from utils.config import CONFIG_DIR

DIMS = ModelDims(batch_size=4, seq_len=12, vocab_size=7, num_puzzle_identifiers=9)
P = 2  # prefix positions of the tiny configs


def tiny(**overrides: object) -> TRMJDConfig:
    base = dict(
        name="trmjd", hidden_size=32, num_heads=2, expansion=2, L_layers=1, H_cycles=3,
        L_cycles=2, halt_max_steps=4, puzzle_emb_ndim=32, puzzle_emb_len=P,
        forward_dtype="float32", dropout=0.0,
    )  # fmt: skip
    return TRMJDConfig(**{**base, **overrides})


def model_for(config: TRMJDConfig) -> TinyRecursiveReasoningModelJD_V1:
    torch.manual_seed(0)
    return TinyRecursiveReasoningModelJD_V1(config, DIMS)


def batch(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = (DIMS.batch_size, DIMS.seq_len)
    labels = torch.randint(0, DIMS.vocab_size, tokens, generator=g, dtype=torch.int32)
    labels[:, -3:] = IGNORE_LABEL_ID
    return {
        "inputs": torch.randint(0, DIMS.vocab_size, tokens, generator=g, dtype=torch.int32),
        "labels": labels,
        "puzzle_identifiers": torch.randint(1, 9, (DIMS.batch_size,), generator=g,
                                            dtype=torch.int32),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Config and registration
# ----------------------------------------------------------------------------------------------
def test_config_defaults_registration_and_yaml() -> None:
    c = TRMJDConfig(name="trmjd")
    assert c.no_act and c.dropout == 0.1 and c.no_ACT_continue
    assert TRMConfig(name="trm").dropout == 0.0  # upstream: no dropout
    assert ARCH_CONFIGS.get("recursive_reasoning.trmjd@TinyRecursiveReasoningModelJD_V1") is (
        TRMJDConfig
    )
    assert MODELS.get("trmjd") is TinyRecursiveReasoningModelJD_V1
    with pytest.raises(ValueError, match="less than 1"):
        TRMJDConfig(name="trmjd", dropout=1.0)
    raw = yaml.safe_load((CONFIG_DIR / "arch" / "trmjd.yaml").read_text())
    assert raw.pop("loss") == {
        "name": "NoACTLossHead",
        "loss_type": "stablemax_cross_entropy",
        "differential_loss": False,
    }
    c = TRMJDConfig(**{**raw, "puzzle_emb_ndim": 512})
    assert (c.H_cycles, c.L_cycles, c.halt_max_steps, c.no_act, c.dropout) == (3, 6, 16, True, 0.1)
    assert LOSS_HEADS.get("NoACTLossHead") is NoACTLossHead
    assert LOSS_HEADS.get("losses@NoACTLossHead") is NoACTLossHead


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def test_cycle_logits_carry_and_no_q_head() -> None:
    cfg = tiny()
    m = model_for(cfg)
    assert not hasattr(m.inner, "q_head")
    assert not any("q_head" in k for k in m.state_dict())
    assert m.inner.output_logits_init.shape == (DIMS.vocab_size,)
    b = batch()
    carry, out = m(m.initial_carry(b), b)
    cycles = out["cycle_logits"]
    assert len(cycles) == cfg.H_cycles + 1
    assert all(c.shape == (4, DIMS.seq_len, DIMS.vocab_size) for c in cycles)
    assert torch.count_nonzero(cycles[0]) == 0
    assert out["logits"] is cycles[-1] and out["logits"].requires_grad
    assert torch.equal(out["q_halt_logits"], torch.zeros(4))
    assert not out["q_halt_logits"].requires_grad
    assert set(carry.inner_carry) == {"z_H", "z_L", "output_logits"}
    assert not any(v.requires_grad for v in carry.inner_carry.values())
    torch.testing.assert_close(carry.inner_carry["output_logits"], out["logits"].detach())


def test_cycle_logits_match_a_hand_written_loop() -> None:
    cfg = tiny(H_cycles=3, L_cycles=2)
    m = model_for(cfg)
    m.eval()
    b = batch()
    _, out = m(m.initial_carry(b), b)
    inner = m.inner
    with torch.no_grad():
        expected = [inner.lm_head(z_H)[:, P:] for z_H in trm_recursion_by_hand(inner, b)]
    assert len(expected) == cfg.H_cycles
    for got, want in zip(out["cycle_logits"][1:], expected, strict=True):
        torch.testing.assert_close(got, want)


def test_every_cycle_gets_gradient_through_its_own_computation_only() -> None:
    """Cycle i's internal loss reaches the L_level calls of cycle i and no other; the final
    (LM) loss reaches only the last cycle's; each reaches the shared weights."""
    cfg = tiny(H_cycles=3, L_cycles=2)
    head = NoACTLossHead(model_for(cfg))
    head.train()
    inner = head.model.inner
    reached: set[int] = set()
    calls: list[Tensor] = []

    def hook(_module: nn.Module, _args: object, output: Tensor) -> None:
        index = len(calls)
        calls.append(output)
        output.register_hook(lambda grad: reached.add(index))

    handle = inner.L_level.register_forward_hook(hook)
    b = batch()
    out = head(carry=head.initial_carry(b), batch=b)
    handle.remove()
    per_cycle = cfg.L_cycles + 1
    assert len(calls) == cfg.H_cycles * per_cycle and all(c.requires_grad for c in calls)
    assert out.internal_token_loss is not None and len(out.internal_token_loss) == cfg.H_cycles

    weights = [p for n, p in inner.named_parameters() if "L_level" in n]
    for i, loss in enumerate(out.internal_token_loss):
        reached.clear()
        grads = torch.autograd.grad(loss.sum(), weights, retain_graph=True)
        assert reached == set(range(i * per_cycle, (i + 1) * per_cycle))
        assert all(g.abs().sum() > 0 for g in grads)
    reached.clear()
    torch.autograd.grad(out.total(), weights, retain_graph=True)
    last = cfg.H_cycles - 1
    assert reached == set(range(last * per_cycle, (last + 1) * per_cycle))
    # Every cycle's loss also trains the input embedding (not detached, as in the fork).
    for loss in out.internal_token_loss:
        (g,) = torch.autograd.grad(loss.sum(), inner.embed_tokens.embedding_weight,
                                   retain_graph=True)  # fmt: skip
        assert g.abs().sum() > 0


def test_output_logits_restart_from_the_buffer_and_carry_the_previous_step() -> None:
    m = model_for(tiny(halt_max_steps=3))
    m.eval()
    captured: list[Tensor] = []
    m.inner.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0]["output_logits"].clone())
    )
    b1, b2 = batch(seed=1), batch(seed=2)
    init = m.inner.output_logits_init.expand(4, DIMS.seq_len, DIMS.vocab_size)
    carry, out1 = m(m.initial_carry(b1), b1)
    torch.testing.assert_close(captured[0], init)
    torch.testing.assert_close(out1["previous_logits"], init)
    carry.halted = torch.tensor([True, False, True, False])
    _, out2 = m(carry, b2)
    rows = carry.halted
    torch.testing.assert_close(captured[1][rows], init[rows])
    torch.testing.assert_close(captured[1][~rows], out1["logits"].detach()[~rows])
    torch.testing.assert_close(out2["previous_logits"], captured[1])
    assert not out2["previous_logits"].requires_grad


@pytest.mark.parametrize("training", [True, False])
def test_no_act_runs_exactly_halt_max_steps(training: bool) -> None:
    n_max = 3
    m = model_for(tiny(halt_max_steps=n_max, halt_exploration_prob=1.0, no_ACT_continue=False))
    m.train(training)
    b = batch()
    carry = m.initial_carry(b)
    with torch.no_grad():
        for step in range(1, 3 * n_max + 1):
            carry, out = m(carry, b)
            expected = (step - 1) % n_max + 1
            assert carry.steps.tolist() == [expected] * 4
            assert carry.halted.tolist() == [expected == n_max] * 4
            assert "target_q_continue" not in out


def test_act_variant_keeps_a_q_head_and_halts_on_it() -> None:
    m = model_for(tiny(no_act=False, halt_exploration_prob=0.0, no_ACT_continue=False))
    assert "inner.q_head.weight" in m.state_dict()
    assert torch.equal(m.inner.q_head.bias, torch.full((2,), -5.0))
    m.train()
    with torch.no_grad():
        m.inner.q_head.bias.copy_(torch.tensor([10.0, 0.0]))
    b = batch()
    carry, out = m(m.initial_carry(b), b)
    assert carry.halted.all() and carry.steps.tolist() == [1] * 4
    # The bootstrapped target (an unpacking crash in the fork) comes from one more inner step.
    t = out["target_q_continue"]
    assert t.shape == (4,) and not t.requires_grad
    head = ACTLossHead(m)
    loss_out = head(carry=head.initial_carry(b), batch=b)
    assert loss_out.has_halting and loss_out.q_continue_loss is not None
    assert loss_out.internal_token_loss is not None  # per-cycle logits: internal losses too
    assert loss_out.q_halt_loss.requires_grad


def test_recording_sees_every_latent_update_and_the_carried_one_last() -> None:
    cfg = tiny()
    m = model_for(cfg)
    b = batch()
    with record_steps(m, latents=True) as rec:
        carry, _ = m(m.initial_carry(b), b)
    assert len(rec.act_steps) == 1
    assert len(rec.act_steps[0]) == cfg.H_cycles * (cfg.L_cycles + 1)
    torch.testing.assert_close(rec.act_steps[0][-1].value, carry.inner_carry["z_H"])
    # The last record's prediction is the step's own (the final cycle's logits).
    assert torch.equal(rec.act_steps[0][-1].preds, carry.inner_carry["output_logits"].argmax(-1))


def test_bfloat16_forward() -> None:
    m = model_for(tiny(forward_dtype="bfloat16"))
    b = batch()
    carry, out = m(m.initial_carry(b), b)
    assert m.inner.output_logits_init.dtype == torch.bfloat16
    assert all(c.dtype == torch.bfloat16 for c in out["cycle_logits"])
    assert carry.inner_carry["output_logits"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Loss heads against a fake model
# ----------------------------------------------------------------------------------------------
def slow_stablemax_ce(row: list[float], label: int) -> float:
    """−log s(x)[label]/Σ s(x) with s(x) = x + 1 (x ≥ 0), 1/(1 − x) (x < 0), Python floats."""
    s = [x + 1 if x >= 0 else 1 / (1 - x) for x in row]
    return -math.log(s[label] / sum(s))


# One slot, three tokens (the last unlabelled), vocabulary of three, two H-cycles.
CYCLE1 = [[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [3.0, 0.0, 0.0]]]
CYCLE2 = [[[2.0, -1.0, 0.0], [0.0, 1.0, 1.5], [0.0, 3.0, 0.0]]]
PREVIOUS = [[[0.5, 0.5, -2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
LABELS = [[0, 2, IGNORE_LABEL_ID]]


def fake_case(
    head_cls: type[ACTLossHead] = NoACTLossHead, **head_kwargs: bool
) -> tuple[ACTLossHead, dict[str, Tensor], dict[str, Tensor]]:
    leaves = {
        "cycle1": torch.tensor(CYCLE1, requires_grad=True),
        "cycle2": torch.tensor(CYCLE2, requires_grad=True),
    }
    outputs = {
        "logits": leaves["cycle2"],
        "cycle_logits": [torch.zeros(1, 3, 3), leaves["cycle1"], leaves["cycle2"]],
        "previous_logits": torch.tensor(PREVIOUS),
        "q_halt_logits": torch.zeros(1),
        "q_continue_logits": torch.zeros(1),
    }
    b = {
        "inputs": torch.zeros(1, 3, dtype=torch.int32),
        "labels": torch.tensor(LABELS, dtype=torch.int32),
        "puzzle_identifiers": torch.zeros(1, dtype=torch.int32),
    }
    carry = FakeCarry(torch.ones(1, dtype=torch.bool), torch.full((1,), 4), b)
    return head_cls(FakeModel(carry, outputs), **head_kwargs), leaves, b


def run(head: ACTLossHead, b: dict[str, Tensor], **kwargs: object):
    return head(carry=head.initial_carry(b), batch=b, **kwargs)


def test_internal_losses_by_hand() -> None:
    head, leaves, b = fake_case()
    out = run(head, b)
    assert out.internal_token_loss is not None and len(out.internal_token_loss) == 2
    first, second = out.internal_token_loss
    diff = [[c2 - c1 for c1, c2 in zip(r1, r2, strict=True)]
            for r1, r2 in zip(CYCLE1[0], CYCLE2[0], strict=True)]  # fmt: skip
    expected_first = [slow_stablemax_ce(CYCLE1[0][s], LABELS[0][s]) for s in range(2)] + [0.0]
    expected_second = [slow_stablemax_ce(diff[s], LABELS[0][s]) for s in range(2)] + [0.0]
    # Summed over tokens, not divided by the number of labelled tokens (2).
    assert first[0].tolist() == pytest.approx(expected_first, rel=1e-12)
    assert second[0].tolist() == pytest.approx(expected_second, rel=1e-12)
    assert out.metrics["cycle0_lm_loss"].item() == pytest.approx(sum(expected_first), rel=1e-12)
    assert out.metrics["cycle1_lm_loss"].item() == pytest.approx(sum(expected_second), rel=1e-12)
    # The later cycle's loss does not reach the earlier cycle's logits.
    second.sum().backward(retain_graph=True)
    assert leaves["cycle1"].grad is None and leaves["cycle2"].grad is not None
    first.sum().backward()
    assert leaves["cycle1"].grad is not None and (leaves["cycle1"].grad[0, 2] == 0).all()


@pytest.mark.parametrize("head_cls", [ACTLossHead, NoACTLossHead])
def test_differential_loss_subtracts_the_previous_step(head_cls: type[ACTLossHead]) -> None:
    labels = torch.tensor(LABELS)
    plain, _, b = fake_case(head_cls)
    differential, _, _ = fake_case(head_cls, differential_loss=True)
    out_plain, out_diff = run(plain, b), run(differential, b)
    cycle2, previous = torch.tensor(CYCLE2), torch.tensor(PREVIOUS)
    torch.testing.assert_close(out_plain.token_loss, stablemax_cross_entropy(cycle2, labels))
    torch.testing.assert_close(
        out_diff.token_loss, stablemax_cross_entropy(cycle2 - previous, labels)
    )
    assert not torch.allclose(out_plain.token_loss, out_diff.token_loss)
    # Predictions and metrics read the logits, not the difference.
    assert torch.equal(out_diff.outputs["preds"], out_plain.outputs["preds"])
    assert out_diff.metrics["accuracy"] == out_plain.metrics["accuracy"]
    # Internal losses are differential across cycles regardless of the flag.
    for a, c in zip(out_plain.internal_token_loss, out_diff.internal_token_loss, strict=True):
        torch.testing.assert_close(a, c)


def test_heads_reject_models_without_what_they_need() -> None:
    head, _, b = fake_case(ACTLossHead, differential_loss=True)
    del head.model.outputs["previous_logits"]
    with pytest.raises(ValueError, match="differential_loss=True needs a model that carries"):
        run(head, b)
    head, _, b = fake_case(NoACTLossHead)
    del head.model.outputs["cycle_logits"]
    with pytest.raises(ValueError, match="NoACTLossHead needs a model with per-H-cycle logits"):
        run(head, b)
    # The real TRM has neither.
    trm = TinyRecursiveReasoningModel_ACTV1(trm_config(0.0), DIMS)
    b = batch()
    for head in (NoACTLossHead(trm), ACTLossHead(trm, differential_loss=True)):
        with pytest.raises(ValueError, match="TinyRecursiveReasoningModel_ACTV1"):
            run(head, b)


def test_no_act_head_has_no_halting_losses() -> None:
    head, _, b = fake_case(NoACTLossHead)
    out = run(head, b, return_keys=["cycle_logits", "logits"])
    assert not out.has_halting and out.q_continue_loss is None
    assert torch.equal(out.q_halt_loss, torch.zeros(1)) and not out.q_halt_loss.requires_grad
    assert "q_halt_accuracy" not in out.metrics and "q_halt_accuracy" not in out.row_metrics
    assert out.metrics["q_halt_loss"].item() == 0.0
    assert {"count", "accuracy", "exact_accuracy", "steps", "lm_loss"} <= set(out.metrics)
    # total() is the usual sum: the LM loss only, internal losses left out.
    torch.testing.assert_close(out.total(), out.normalized_token_loss.sum())
    assert set(sum_row_metrics(out.row_metrics, torch.ones(1, dtype=torch.bool))) == {
        "count", "accuracy", "exact_accuracy", "steps",
    }  # fmt: skip
    # A per-cycle list output comes back stacked along dim 1: [B, H + 1, S, V].
    assert out.outputs["cycle_logits"].shape == (1, 3, 3, 3)
    assert not out.outputs["cycle_logits"].requires_grad


def test_act_head_is_unchanged_for_models_without_cycle_logits() -> None:
    head, _, b = fake_case(ACTLossHead)
    del head.model.outputs["cycle_logits"]
    out = run(head, b)
    assert out.internal_token_loss is None and out.has_halting
    assert "q_halt_accuracy" in out.metrics
    assert not any(k.startswith("cycle") for k in out.metrics)


def test_no_act_head_on_the_real_model() -> None:
    cfg = tiny()
    head = NoACTLossHead(model_for(cfg), differential_loss=True)
    head.train()
    b = batch()
    carry = head.initial_carry(b)
    for _ in range(2):
        previous = carry.inner_carry["output_logits"].clone()
        out = head(carry=carry, batch=b, return_keys=["logits", "previous_logits"])
        logits = out.outputs["logits"]
        expected = stablemax_cross_entropy(logits - out.outputs["previous_logits"], b["labels"])
        torch.testing.assert_close(out.token_loss.detach(), expected)
        out.total().backward()
        carry = out.new_carry
    # The second step's previous logits are the first step's final logits.
    assert not torch.equal(previous, carry.inner_carry["output_logits"])
    with torch.inference_mode():
        out = head(carry=head.initial_carry(b), batch=b)
    assert torch.isfinite(out.total())


# ----------------------------------------------------------------------------------------------
# Carry perturbation
# ----------------------------------------------------------------------------------------------
def big_carry(dtype: torch.dtype = torch.float32) -> ACTCarry:
    g = torch.Generator().manual_seed(0)
    shape = (8, 64, 128)
    return ACTCarry(
        inner_carry={
            "z_H": torch.randn(shape, generator=g).to(dtype),
            "z_L": torch.randn(shape, generator=g).to(dtype),
            "output_logits": torch.randn(8, 60, 11, generator=g).to(dtype),
        },
        steps=torch.ones(8, dtype=torch.int32),
        halted=torch.zeros(8, dtype=torch.bool),
        current_data={"inputs": torch.zeros(8, 60, dtype=torch.int32)},
    )


def test_perturb_carry_adds_gaussian_noise_to_the_latents_only() -> None:
    carry = big_carry()
    before = {k: v.clone() for k, v in carry.inner_carry.items()}
    rate = 0.3
    new = perturb_carry(carry, rate, torch.Generator().manual_seed(1))
    for name in ("z_H", "z_L"):
        noise = new.inner_carry[name] - before[name]
        assert abs(noise.mean().item()) < 0.005
        assert noise.std().item() == pytest.approx(rate, rel=0.01)
    assert new.inner_carry["output_logits"] is carry.inner_carry["output_logits"]
    assert new.steps is carry.steps and new.current_data is carry.current_data
    for k, v in carry.inner_carry.items():  # the input carry is untouched
        assert torch.equal(v, before[k])
    # Independent noise for z_H and z_L; reproducible from the generator.
    assert not torch.equal(new.inner_carry["z_H"] - before["z_H"],
                           new.inner_carry["z_L"] - before["z_L"])  # fmt: skip
    again = TinyRecursiveReasoningModelJD_V1.perturb_carry(
        carry, rate, torch.Generator().manual_seed(1)
    )
    assert torch.equal(again.inner_carry["z_H"], new.inner_carry["z_H"])
    low = perturb_carry(big_carry(torch.bfloat16), rate)
    assert low.inner_carry["z_H"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Dropout (whole recursive family)
# ----------------------------------------------------------------------------------------------
def trm_config(dropout: float) -> TRMConfig:
    cfg = tiny().model_dump(exclude={"no_act"})
    return TRMConfig(**{**cfg, "name": "trm", "dropout": dropout})


def test_dropout_is_stochastic_in_training_only() -> None:
    torch.manual_seed(0)
    m = TinyRecursiveReasoningModel_ACTV1(trm_config(0.3), DIMS)
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 1  # L_layers = 1
    b = batch()
    m.train()
    _, a = m(m.initial_carry(b), b)
    _, c = m(m.initial_carry(b), b)
    assert not torch.allclose(a["logits"], c["logits"])
    m.eval()
    _, a = m(m.initial_carry(b), b)
    _, c = m(m.initial_carry(b), b)
    assert torch.equal(a["logits"], c["logits"])


def test_no_dropout_adds_no_module_and_keys_never_change() -> None:
    torch.manual_seed(0)
    plain = TinyRecursiveReasoningModel_ACTV1(trm_config(0.0), DIMS)
    assert not any(isinstance(x, nn.Dropout) for x in plain.modules())
    torch.manual_seed(0)
    with_dropout = TinyRecursiveReasoningModel_ACTV1(trm_config(0.3), DIMS)
    assert list(plain.state_dict()) == list(with_dropout.state_dict())
    for k, v in plain.state_dict().items():  # same initialisation: dropout draws no numbers
        assert torch.equal(v, with_dropout.state_dict()[k]), k
    # With dropout 0 the train-mode forward is deterministic.
    plain.train()
    b = batch()
    _, a = plain(plain.initial_carry(b), b)
    _, c = plain(plain.initial_carry(b), b)
    assert torch.equal(a["logits"], c["logits"])
