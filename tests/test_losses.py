"""Per-token losses, the ACT loss head (against a fake model) and the loss registries."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import dataset.common
from models import losses
from models.arch_config import LOSS_HEAD_ALIASES, LOSS_TYPES
from models.losses import (
    IGNORE_LABEL_ID,
    LOSS_FUNCTIONS,
    LOSS_HEADS,
    ACTLossHead,
    LossOutput,
    log_stablemax,
    softmax_cross_entropy,
    stablemax_cross_entropy,
)
from tests.conftest import TEST_DEVICE

DEVICE = TEST_DEVICE


def t(data: object, dtype: torch.dtype = torch.float32, grad: bool = False) -> Tensor:
    return torch.tensor(data, dtype=dtype, device=DEVICE, requires_grad=grad)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def bce(x: float, y: float) -> float:
    """BCE with logits from its definition: −y·log σ(x) − (1 − y)·log(1 − σ(x))."""
    return y * softplus(-x) + (1 - y) * softplus(x)


# ----------------------------------------------------------------------------------------------
# Per-token losses
# ----------------------------------------------------------------------------------------------
def slow_stablemax_ce(logits: list[list[float]], labels: list[int]) -> list[float]:
    """Reference with Python floats: s(x) = x + 1 (x ≥ 0), 1/(1 − x) (x < 0)."""
    out = []
    for row, label in zip(logits, labels, strict=True):
        if label == IGNORE_LABEL_ID:
            out.append(0.0)
            continue
        s = [x + 1 if x >= 0 else 1 / (1 - x) for x in row]
        out.append(-math.log(s[label] / sum(s)))
    return out


def test_stablemax_matches_slow_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3).to(DEVICE)
    labels = torch.randint(0, 7, (2, 5), generator=g).to(DEVICE)
    labels[0, 1] = labels[1, 4] = IGNORE_LABEL_ID
    loss = stablemax_cross_entropy(logits, labels)
    assert loss.shape == (2, 5) and loss.dtype == torch.float64
    for b in range(2):
        expected = slow_stablemax_ce(logits[b].tolist(), labels[b].tolist())
        assert loss[b].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_stablemax_hand_values() -> None:
    # s([0, 1, −1, 0]) = [1, 2, 1/2, 1], Σ = 4.5
    loss = stablemax_cross_entropy(t([[0.0, 1.0, -1.0, 0.0]]), t([1], torch.int32))
    assert loss.item() == pytest.approx(math.log(4.5 / 2), rel=1e-12)


def test_stablemax_is_float64_for_low_precision_logits() -> None:
    logits = t([[[0.5, -2.0, 3.0]]], torch.bfloat16)
    loss = stablemax_cross_entropy(logits, t([[2]], torch.int32))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(slow_stablemax_ce([[0.5, -2.0, 3.0]], [2])[0], rel=1e-12)


def test_stablemax_probabilities_sum_to_one() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 10).to(DEVICE)
    p = log_stablemax(x).exp()
    assert (p > 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stablemax_finite_at_extreme_logits(dtype: torch.dtype) -> None:
    logits = t([[[1e4, -1e4, 0.0, 1.0], [-1e4, -1e4, -1e4, 1e4]]], dtype, grad=True)
    labels = t([[1, 0]], torch.int32)
    loss = stablemax_cross_entropy(logits, labels)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).any()


def test_stablemax_gradient_finite_at_one_in_float32() -> None:
    # 1/(1 − x + 1e-30) at x = 1 has derivative 1e60 = inf in float32; upstream's where() then
    # back-propagated 0 · inf = NaN on devices that fall back to float32 (MPS).
    x = t([[1.0, -0.5, 2.0]], grad=True)
    log_stablemax(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_softmax_ce_from_first_principles() -> None:
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 3, 5, generator=g) * 4).to(DEVICE)
    labels = t([[0, 4, IGNORE_LABEL_ID], [2, IGNORE_LABEL_ID, 1]], torch.int32)
    loss = softmax_cross_entropy(logits, labels)
    assert loss.shape == (2, 3) and loss.dtype == torch.float32
    for b in range(2):
        for s in range(3):
            label = int(labels[b, s])
            row = logits[b, s].double().tolist()
            expected = (
                0.0
                if label == IGNORE_LABEL_ID
                else math.log(sum(math.exp(v) for v in row)) - row[label]
            )
            assert loss[b, s].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", LOSS_FUNCTIONS.names())
def test_masked_tokens_contribute_exactly_zero(name: str) -> None:
    loss_fn = LOSS_FUNCTIONS.get(name)
    logits = t([[[3.0, -1.0, 0.5], [0.0, 2.0, -2.0], [1.0, 1.0, 1.0]]], grad=True)
    labels = t([[IGNORE_LABEL_ID, 1, 999]], torch.int64)  # 999 would index out of range
    valid = t([[False, True, False]], torch.bool)
    loss = loss_fn(logits, labels, ignore_index=IGNORE_LABEL_ID, valid_mask=valid)
    assert loss.shape == (1, 3)
    assert loss[0, 0].item() == 0.0 and loss[0, 2].item() == 0.0
    assert loss[0, 1].item() > 0
    loss.sum().backward()
    assert logits.grad is not None
    assert (logits.grad[0, [0, 2]] == 0).all() and (logits.grad[0, 1] != 0).all()


@pytest.mark.parametrize("name", LOSS_FUNCTIONS.names())
def test_default_mask_is_ignore_index(name: str) -> None:
    loss_fn = LOSS_FUNCTIONS.get(name)
    logits = t([[[3.0, -1.0], [0.0, 2.0]]])
    labels = t([[IGNORE_LABEL_ID, 1]], torch.int32)
    default = loss_fn(logits, labels)
    explicit = loss_fn(logits, labels, valid_mask=labels != IGNORE_LABEL_ID)
    assert default[0, 0].item() == 0.0
    torch.testing.assert_close(default, explicit)


def test_ignore_label_is_the_one_the_loader_writes() -> None:
    """One definition, ``dataset.common``'s, still importable from ``models.losses``."""
    assert losses.IGNORE_LABEL_ID is dataset.common.IGNORE_LABEL_ID == IGNORE_LABEL_ID == -100


@pytest.mark.parametrize("name", LOSS_FUNCTIONS.names())
def test_loss_is_nonnegative_and_small_when_confident(name: str) -> None:
    loss_fn = LOSS_FUNCTIONS.get(name)
    logits = t([[[50.0, -50.0, -50.0], [-50.0, -50.0, 50.0]]])
    assert (loss_fn(logits, t([[0, 2]], torch.int32)) < 0.1).all()
    assert (loss_fn(logits, t([[1, 1]], torch.int32)) > 1.0).all()


# ----------------------------------------------------------------------------------------------
# ACT loss head against a fake model
# ----------------------------------------------------------------------------------------------
@dataclass
class FakeCarry:
    halted: Tensor
    steps: Tensor
    current_data: dict[str, Tensor]


class FakeModel(nn.Module):
    """Returns a preset carry and outputs; ``inner`` only gives it parameters to name."""

    def __init__(self, new_carry: FakeCarry, outputs: dict[str, Tensor]) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.new_carry = new_carry
        self.outputs = outputs
        self.calls: list[tuple[FakeCarry, dict[str, Tensor]]] = []

    def initial_carry(self, batch: dict[str, Tensor]) -> FakeCarry:
        B = batch["inputs"].shape[0]
        return FakeCarry(
            halted=torch.ones(B, dtype=torch.bool, device=DEVICE),
            steps=torch.zeros(B, dtype=torch.int32, device=DEVICE),
            current_data={k: torch.empty_like(v) for k, v in batch.items()},
        )

    def forward(
        self, carry: FakeCarry, batch: dict[str, Tensor]
    ) -> tuple[FakeCarry, dict[str, Tensor]]:
        self.calls.append((carry, batch))
        return self.new_carry, dict(self.outputs)


# Four slots, three tokens, vocabulary of four. s(·) values are chosen to give exact fractions.
#   slot 0: halted, steps 3, labels [1, 2, −], one of two correct, q_halt −1 (says "wrong": right)
#   slot 1: halted, steps 5, labels [0, 3, 3], all correct, q_halt 0 (≥ 0 says "right": right)
#   slot 2: running, steps 1, labels [0, 0, 0], all correct: in the losses, not in the metrics
#   slot 3: halted, steps 2, no labels: no LM loss, not in the metrics, q target "correct"
LOGITS = [
    [[0, 1, -1, 0], [2, 0, 0, -1], [5, 0, 0, 0]],
    [[1, 0, 0, 0], [0, 0, 0, 1], [-1, -1, -1, 0]],
    [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]],
    [[0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3]],
]
LABELS = [[1, 2, -100], [0, 3, 3], [0, 0, 0], [-100, -100, -100]]
HALTED = [True, True, False, True]
STEPS = [3, 5, 1, 2]
Q_HALT = [-1.0, 0.0, 2.0, 0.5]
Q_CONTINUE = [0.0, 1.0, -1.0, 0.0]
TARGET_Q_CONTINUE = [0.5, 0.25, 1.0, 0.0]

LM_PER_SAMPLE = [
    (math.log(4.5 / 2) + math.log(5.5 / 1)) / 2,  # s = [1, 2, ½, 1] and [3, 1, 1, ½]
    math.log(5 / 2),  # each token: p = 2 / 5
    math.log(5 / 2),
    0.0,
]
SEQ_IS_CORRECT = [0.0, 1.0, 1.0, 1.0]
Q_HALT_LOSS = [bce(x, y) for x, y in zip(Q_HALT, SEQ_IS_CORRECT, strict=True)]
Q_CONTINUE_LOSS = [bce(x, y) for x, y in zip(Q_CONTINUE, TARGET_Q_CONTINUE, strict=True)]


def make_case(
    with_target: bool = True, logits_dtype: torch.dtype = torch.float32
) -> tuple[ACTLossHead, dict[str, Tensor], dict[str, Tensor]]:
    """The head, the leaf tensors the fake model outputs, and a batch whose labels are decoys."""
    leaves = {
        "logits": t(LOGITS, logits_dtype, grad=True),
        "q_halt_logits": t(Q_HALT, grad=True),
        "q_continue_logits": t(Q_CONTINUE, grad=True),
    }
    outputs = dict(leaves)
    if with_target:
        outputs["target_q_continue"] = t(TARGET_Q_CONTINUE)
    labels = t(LABELS, torch.int32)
    # The batch's labels differ everywhere: any use of them would change every number below.
    batch = {
        "inputs": torch.zeros(4, 3, dtype=torch.int32, device=DEVICE),
        "labels": torch.where(labels == IGNORE_LABEL_ID, 1, IGNORE_LABEL_ID).to(torch.int32),
        "puzzle_identifiers": torch.zeros(4, dtype=torch.int32, device=DEVICE),
    }
    carry = FakeCarry(
        halted=t(HALTED, torch.bool),
        steps=t(STEPS, torch.int32),
        current_data={**batch, "labels": labels},
    )
    head = ACTLossHead(FakeModel(carry, outputs), loss_type="stablemax_cross_entropy").to(DEVICE)
    return head, leaves, batch


def run_head(head: ACTLossHead, batch: dict[str, Tensor], **kwargs: object) -> LossOutput:
    return head(carry=head.initial_carry(batch), batch=batch, **kwargs)


def test_head_metrics_by_hand() -> None:
    head, _, batch = make_case()
    out = run_head(head, batch)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["count"] == 2  # slots 0 and 1: halted with labels
    assert m["accuracy"] == pytest.approx(0.5 + 1.0)
    assert m["exact_accuracy"] == 1
    assert m["q_halt_accuracy"] == 2
    assert m["steps"] == 3 + 5
    assert m["lm_loss"] == pytest.approx(sum(LM_PER_SAMPLE), rel=1e-12)
    assert m["q_halt_loss"] == pytest.approx(sum(Q_HALT_LOSS), rel=1e-6)
    assert m["q_continue_loss"] == pytest.approx(sum(Q_CONTINUE_LOSS), rel=1e-6)
    assert all(not v.requires_grad and v.ndim == 0 for v in out.metrics.values())
    assert all(v.device == out.token_loss.device for v in out.metrics.values())


def test_head_losses_by_hand() -> None:
    head, _, batch = make_case()
    out = run_head(head, batch)
    assert out.token_loss.shape == (4, 3) and out.token_loss.dtype == torch.float64
    assert out.loss_divisor.tolist() == [2, 3, 3, 1]
    assert out.token_loss[0, 2].item() == 0.0 and (out.token_loss[3] == 0).all()
    # Every slot is supervised, the running slot 2 included.
    assert out.lm_loss_per_sample.tolist() == pytest.approx(LM_PER_SAMPLE, rel=1e-12)
    assert out.q_halt_loss.tolist() == pytest.approx(Q_HALT_LOSS, rel=1e-6)
    assert out.q_continue_loss is not None
    assert out.q_continue_loss.tolist() == pytest.approx(Q_CONTINUE_LOSS, rel=1e-6)
    expected = sum(LM_PER_SAMPLE) + 0.5 * (sum(Q_HALT_LOSS) + sum(Q_CONTINUE_LOSS))
    assert out.total().item() == pytest.approx(expected, rel=1e-6)
    assert out.total().ndim == 0
    halt = [0.5 * (a + b) for a, b in zip(Q_HALT_LOSS, Q_CONTINUE_LOSS, strict=True)]
    assert out.halt_loss_per_sample.tolist() == pytest.approx(halt, rel=1e-6)
    torch.testing.assert_close(out.normalized_token_loss.sum(-1), out.lm_loss_per_sample)
    assert out.all_halted.dtype == torch.bool and out.all_halted.ndim == 0
    assert not out.all_halted.item()


def test_q_continue_loss_only_with_target() -> None:
    head, _, batch = make_case(with_target=False)
    out = run_head(head, batch)
    assert out.q_continue_loss is None
    assert "q_continue_loss" not in out.metrics
    expected = sum(LM_PER_SAMPLE) + 0.5 * sum(Q_HALT_LOSS)
    assert out.total().item() == pytest.approx(expected, rel=1e-6)
    assert out.halt_loss_per_sample.tolist() == pytest.approx(
        [0.5 * q for q in Q_HALT_LOSS], rel=1e-6
    )


def test_labels_come_from_the_carry_not_the_batch() -> None:
    head, _, batch = make_case()
    out = run_head(head, batch)
    assert out.loss_divisor.tolist() == [2, 3, 3, 1]  # the batch's labels would give [1, 1, 1, 3]
    assert out.new_carry is head.model.new_carry
    assert head.model.calls and head.model.calls[0][1] is batch


def test_all_halted_flag() -> None:
    head, _, batch = make_case()
    head.model.new_carry.halted = torch.ones(4, dtype=torch.bool, device=DEVICE)
    out = run_head(head, batch)
    assert out.all_halted.item()
    assert out.metrics["count"].item() == 3  # slot 2 joins; slot 3 still has no labels
    assert out.metrics["steps"].item() == 3 + 5 + 1


def test_gradients_reach_logits_and_q_heads() -> None:
    head, leaves, batch = make_case()
    out = run_head(head, batch)
    out.token_loss.sum().backward(retain_graph=True)
    grad = leaves["logits"].grad
    assert grad is not None
    valid = t(LABELS, torch.int32) != IGNORE_LABEL_ID
    assert (grad[valid] != 0).any(dim=-1).all() and (grad[~valid] == 0).all()
    assert leaves["q_halt_logits"].grad is None

    out.q_halt_loss.sum().backward(retain_graph=True)
    assert leaves["q_halt_logits"].grad is not None
    assert (leaves["q_halt_logits"].grad != 0).all()

    assert out.q_continue_loss is not None
    out.q_continue_loss.sum().backward(retain_graph=True)
    assert leaves["q_continue_logits"].grad is not None

    for leaf in leaves.values():
        leaf.grad = None
    out.total().backward()
    # d/dq of 0.5 · BCE(q, y) = 0.5 · (σ(q) − y)
    q = t(Q_HALT)
    expected_q_grad = 0.5 * (torch.sigmoid(q) - t(SEQ_IS_CORRECT))
    torch.testing.assert_close(leaves["q_halt_logits"].grad, expected_q_grad)


def test_return_keys_are_detached_and_missing_ones_skipped() -> None:
    head, leaves, batch = make_case()
    out = run_head(head, batch, return_keys=["logits", "q_halt_logits", "inputs"])
    assert set(out.outputs) == {"logits", "q_halt_logits", "preds"}
    assert not any(v.requires_grad for v in out.outputs.values())
    torch.testing.assert_close(out.outputs["logits"], leaves["logits"].detach())
    assert out.outputs["preds"].tolist() == [[1, 0, 0], [0, 3, 3], [0, 0, 0], [1, 2, 3]]
    assert set(run_head(head, batch).outputs) == {"preds"}


def test_head_with_bfloat16_logits_and_softmax() -> None:
    head, _, batch = make_case(logits_dtype=torch.bfloat16)
    out = run_head(head, batch)
    assert out.token_loss.dtype == torch.float64
    assert out.lm_loss_per_sample.tolist() == pytest.approx(LM_PER_SAMPLE, rel=1e-12)

    head.loss_fn = LOSS_FUNCTIONS.get("softmax_cross_entropy")
    out = run_head(head, batch)
    assert out.token_loss.dtype == torch.float32
    log_z = math.log(math.exp(1) + 3)  # logits [1, 0, 0, 0], label 0
    assert out.lm_loss_per_sample[2].item() == pytest.approx(log_z - 1, rel=1e-6)


def test_head_under_inference_mode() -> None:
    head, _, batch = make_case()
    with torch.inference_mode():
        out = run_head(head, batch)
    assert out.total().item() == pytest.approx(
        sum(LM_PER_SAMPLE) + 0.5 * (sum(Q_HALT_LOSS) + sum(Q_CONTINUE_LOSS)), rel=1e-6
    )


# ----------------------------------------------------------------------------------------------
# Registries and checkpoint compatibility
# ----------------------------------------------------------------------------------------------
def test_loss_function_names_match_the_config() -> None:
    assert set(LOSS_FUNCTIONS.names()) == {"stablemax_cross_entropy", "softmax_cross_entropy"}
    assert set(LOSS_FUNCTIONS.names()) == set(LOSS_TYPES)
    assert LOSS_FUNCTIONS.get("stablemax_cross_entropy") is stablemax_cross_entropy
    assert LOSS_FUNCTIONS.get("softmax_cross_entropy") is softmax_cross_entropy


@pytest.mark.parametrize("name", LOSS_FUNCTIONS.names())
def test_head_resolves_every_loss_type(name: str) -> None:
    head, _, _ = make_case()
    head = ACTLossHead(head.model, loss_type=name)
    assert head.loss_type == name and head.loss_fn is LOSS_FUNCTIONS.get(name)


def test_unknown_loss_type_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown loss function 'cross_entropy'") as err:
        ACTLossHead(nn.Linear(1, 1), loss_type="cross_entropy")
    assert "softmax_cross_entropy" in str(err.value)
    assert "stablemax_cross_entropy" in str(err.value)


def test_loss_head_names_and_upstream_alias() -> None:
    assert LOSS_HEADS.names() == sorted(LOSS_HEAD_ALIASES)
    for name, aliases in LOSS_HEAD_ALIASES.items():
        for key in (name, *aliases):
            assert LOSS_HEADS.get(key) is LOSS_HEADS.get(name)
    assert LOSS_HEADS.get("losses@ACTLossHead") is ACTLossHead


def test_state_dict_keeps_the_model_prefix() -> None:
    head, _, _ = make_case()
    assert sorted(head.state_dict()) == ["model.inner.bias", "model.inner.weight"]
