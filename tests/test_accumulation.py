"""Gradient accumulation: k micro-batches of b per optimizer step train as one batch of k·b
(dense weights, the sparse puzzle embedding, metrics, the lr schedule), the EMA follows the
micro-batches or the updates, Jacobian descent aggregates each micro-batch, checkpoints fall
between updates and resume bit-identically, and bad settings are one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from models.ema import EMAHelper
from models.sparse_embedding import CastedSparseEmbedding, CastedSparseEmbeddingSignSGD_Distributed
from tests.test_training import (
    FAST,
    _assert_same_training,
    _run_one_and_two,
    make_config,
    metric_lines,
    train,
)
from training import step as step_module
from training.config import PretrainConfig
from training.data import create_dataloader
from training.state import TrainState, create_train_state, seed_everything
from training.step import train_batch
from utils import checkpoint as ckpt
from utils.distributed import DistInfo
from utils.schema import ConfigError

Batch = dict[str, torch.Tensor]
# One supervision step and no exploration: no ACT carry crosses batches, so an effective batch
# is the same computation however it is split.
NO_CARRY = ["arch.halt_max_steps=1", "arch.halt_exploration_prob=0", "evaluators=[]"]


def build(data: Path, run_dir: Path, *overrides: str) -> tuple[PretrainConfig, TrainState]:
    config = make_config(data, run_dir, *NO_CARRY, *overrides)
    seed_everything(config, 0)
    _, train_data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    state = create_train_state(config, train_data, DistInfo())
    state.model.train()
    return config, state


def batches(data: Path, run_dir: Path, size: int) -> Iterator[Batch]:
    """The training batches of ``size`` rows, in loader order."""
    config = make_config(data, run_dir, *NO_CARRY, f"global_batch_size={size}")
    _, train_data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    for _, batch, _ in train_data:
        yield batch


def split(batch: Batch, k: int) -> list[Batch]:
    return [{key: v.chunk(k)[j] for key, v in batch.items()} for j in range(k)]


class Grads:
    """Wraps ``training.step.step_optimizers``: the dense gradients each update applies."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, state: TrainState) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []
        inner = step_module.step_optimizers

        def recording(*args: Any) -> float:
            self.seen.append({n: p.grad.clone() for n, p in state.raw_model.named_parameters()
                              if p.grad is not None})  # fmt: skip
            return inner(*args)

        monkeypatch.setattr(step_module, "step_optimizers", recording)


def table(state: TrainState) -> torch.Tensor:
    return state.raw_model.model.inner.puzzle_emb.weights.detach().clone()


def weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in state.raw_model.named_parameters()}


# ----------------------------------------------------------------------------------------------
# k micro-batches of b == one batch of k·b
# ----------------------------------------------------------------------------------------------
def test_two_micro_batches_update_as_one_batch_of_twice_the_size(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = next(batches(arc_data, tmp_path / "data", 8))
    ids = whole["puzzle_identifiers"]
    assert set(ids[:4].tolist()) != set(ids[4:].tolist())  # other puzzles per micro-batch

    config_one, one = build(arc_data, tmp_path / "one", "global_batch_size=8")
    config_acc, acc = build(
        arc_data, tmp_path / "acc", "global_batch_size=4", "+grad_accum_steps=2"
    )
    assert acc.accumulation_steps == 2 and acc.total_steps == one.total_steps
    w_one, w_acc = weights(one), weights(acc)
    assert w_one.keys() == w_acc.keys() and all(torch.equal(w_one[n], w_acc[n]) for n in w_one)
    table_before = table(one)
    assert torch.equal(table_before, table(acc))

    with monkeypatch.context() as m:
        grads_one = Grads(m, one)
        result_one = train_batch(config_one, one, whole, DistInfo())
    with monkeypatch.context() as m:
        grads_acc = Grads(m, acc)
        first, second = split(whole, 2)
        micro = train_batch(config_acc, acc, first, DistInfo())
        assert not micro.update_done and micro.metrics is None and acc.step == 1
        assert grads_acc.seen == []  # no optimizer step before the window's end
        result_acc = train_batch(config_acc, acc, second, DistInfo())
    assert result_acc.update_done and acc.step == one.step == 1

    (g_one,), (g_acc,) = grads_one.seen, grads_acc.seen
    assert g_one.keys() == g_acc.keys() and len(g_one) > 5
    for name in g_one:
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-5, atol=1e-8)
    for name, w in weights(one).items():
        torch.testing.assert_close(weights(acc)[name], w, rtol=0, atol=1e-6)
    # Sign-SGD on the union of both micro-batches' rows, every row of the 8 puzzles moved.
    assert torch.equal(table(acc), table(one))
    moved = (table(one) != table_before).any(dim=1).nonzero().flatten()
    assert moved.tolist() == sorted(set(ids.tolist()))

    m_one, m_acc = result_one.metrics, result_acc.metrics
    assert m_one is not None and m_acc is not None
    assert m_acc["train/lr"] == m_one["train/lr"]
    assert m_acc["train/micro_batches"] == 2.0 and "train/micro_batches" not in m_one
    for key in ("train/lm_loss", "train/q_halt_loss", "train/accuracy", "train/count"):
        assert m_acc[key] == pytest.approx(m_one[key], rel=1e-5), key


def test_micro_batches_run_their_own_carry_slots(arc_data: Path, tmp_path: Path) -> None:
    """Slot j of a window continues slot j of the window before (arch.halt_max_steps=3: a
    slot that did not halt keeps its puzzle)."""
    config, state = build(arc_data, tmp_path, "global_batch_size=4", "+grad_accum_steps=2",
                          "arch.halt_max_steps=3")  # fmt: skip
    micro = [b for _, b in zip(range(4), batches(arc_data, tmp_path / "d", 4), strict=False)]
    for batch in micro[:2]:
        train_batch(config, state, batch, DistInfo())
    slot0, slot1 = state.slot_carries
    assert slot0 is not None and slot1 is not None
    assert torch.equal(slot0.current_data["inputs"], micro[0]["inputs"])
    assert torch.equal(slot1.current_data["inputs"], micro[1]["inputs"])
    going_on = ~slot0.halted.clone()  # the Q head starts far from halting
    assert going_on.any()
    train_batch(config, state, micro[2], DistInfo())
    carry = state.slot_carries[0]
    assert carry is not None
    assert torch.equal(carry.current_data["inputs"][going_on], micro[0]["inputs"][going_on])
    assert torch.equal(carry.current_data["inputs"][~going_on], micro[2]["inputs"][~going_on])
    assert carry.steps[going_on].tolist() == [2] * int(going_on.sum())
    assert state.slot_carries[1] is slot1  # slot 1 waits for the window's second micro-batch


# ----------------------------------------------------------------------------------------------
# The sparse puzzle embedding
# ----------------------------------------------------------------------------------------------
def test_sign_sgd_applies_the_summed_rows_of_every_micro_batch() -> None:
    emb = CastedSparseEmbedding(6, 2, batch_size=3, init_std=0.0, cast_to=torch.float32)
    with torch.no_grad():
        emb.weights.copy_(torch.arange(12.0).reshape(6, 2))
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=0.1,
                                                   weight_decay=0.5)  # fmt: skip
    emb.train()

    def micro(ids: list[int], grads: list[list[float]]) -> None:
        out = emb(torch.tensor(ids, dtype=torch.int32))
        (out * torch.tensor(grads)).sum().backward()

    micro([1, 2, 2], [[1.0, -1.0], [0.5, 2.0], [0.25, -0.5]])
    opt.keep_micro_batch()
    assert emb.local_weights.grad is None
    # id 2 again: its three rows sum to (-0.25, -1.5); the last micro-batch alone says (-1, -3)
    # and the first alone (0.75, 1.5), so neither "last ids" nor "first ids" gives the result.
    micro([2, 4, 5], [[-1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    before = emb.weights.clone()
    opt.step()
    decay = 1 - 0.1 * 0.5
    expected = before.clone()
    expected[1] = before[1] * decay - 0.1 * torch.tensor([1.0, -1.0])
    expected[2] = before[2] * decay - 0.1 * torch.tensor([-1.0, 1.0])
    expected[4] = before[4] * decay - 0.1 * torch.tensor([0.0, 1.0])
    expected[5] = before[5] * decay - 0.1 * torch.tensor([-1.0, 0.0])
    torch.testing.assert_close(emb.weights, expected, rtol=0, atol=1e-7)
    assert torch.equal(emb.weights[[0, 3]], before[[0, 3]])

    # zero_grad drops what was kept: a dropped window leaves no rows for the next step.
    micro([0, 0, 3], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    opt.keep_micro_batch()
    opt.zero_grad()
    after = emb.weights.clone()
    opt.step()
    assert torch.equal(emb.weights, after)


# ----------------------------------------------------------------------------------------------
# EMA per micro-batch or per update
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "per_micro"),
    [(["+grad_accum_steps=2"], False), (["+effective_batch_size=8"], True),
     (["+effective_batch_size=8", "ema_every=update"], False),
     (["+grad_accum_steps=2", "ema_every=micro"], True)],
)  # fmt: skip
def test_ema_follows_micro_batches_or_updates(
    overrides: list[str],
    per_micro: bool,
    arc_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, state = build(arc_data, tmp_path, "global_batch_size=4", "ema=True", "ema_rate=0.9",
                          *overrides)  # fmt: skip
    assert config.accumulation_steps == 2 and config.ema_per_micro_batch is per_micro
    assert state.ema is not None
    seen: list[dict[str, torch.Tensor]] = []  # the weights each EMA update was given
    inner = EMAHelper.update

    def counting(self: EMAHelper, module: torch.nn.Module) -> None:
        seen.append(weights(state))
        inner(self, module)

    monkeypatch.setattr(EMAHelper, "update", counting)
    p = [weights(state)]
    micro = [b for _, b in zip(range(4), batches(arc_data, tmp_path / "d", 4), strict=False)]
    for j, batch in enumerate(micro):
        train_batch(config, state, batch, DistInfo())
        if j % 2 == 1:
            p.append(weights(state))
    assert state.step == 2
    assert len(seen) == (4 if per_micro else 2)  # k or 1 per optimizer step
    given = [p[0], p[1], p[1], p[2]] if per_micro else [p[1], p[2]]
    for a, b in zip(seen, given, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for name in p[0]:
        s = p[0][name].double()  # the shadow starts as the weights
        for w in given:
            s = 0.9 * s + 0.1 * w[name].double()
        torch.testing.assert_close(state.ema.shadow[name].double(), s, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The schedule counts optimizer steps; iterations end on whole windows
# ----------------------------------------------------------------------------------------------
def test_schedule_and_warm_up_count_optimizer_steps(arc_data: Path, tmp_path: Path) -> None:
    _, plain = build(arc_data, tmp_path / "plain", "global_batch_size=4")
    config, state = build(arc_data, tmp_path / "acc", "global_batch_size=4", "+grad_accum_steps=3")
    assert state.total_steps == plain.total_steps // 3 > 0

    run = tmp_path / "run"
    config = make_config(arc_data, run, *NO_CARRY, "global_batch_size=4", "+grad_accum_steps=3",
                         "lr_warmup_steps=4", "lr_min_ratio=1.0", "epochs=4", "eval_interval=2",
                         "checkpoint_every_steps=1")  # fmt: skip
    _, data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    per_iteration = [data.num_batches(i) for i in range(config.iterations)]
    outcome = train(config)
    expected_steps = sum(n // 3 for n in per_iteration)  # each iteration's whole windows
    assert outcome.steps == expected_steps > 4
    lines = [m for m in metric_lines(run) if "train/lm_loss" in m]
    assert [m["step"] for m in lines] == list(range(1, expected_steps + 1))
    lrs = [m["train/lr"] for m in lines]
    assert lrs[:5] == pytest.approx([config.lr * s / 4 for s in (1, 2, 3, 4)] + [config.lr])
    # Every checkpoint falls between windows: its data position is a multiple of k batches.
    for folder in ckpt.list_checkpoints(run):
        progress = torch.load(folder / ckpt.TRAIN_FILE, weights_only=True)["progress"]
        assert progress["batches_in_iteration"] % 3 == 0, folder


# ----------------------------------------------------------------------------------------------
# Jacobian descent aggregates each micro-batch
# ----------------------------------------------------------------------------------------------
def test_jacobian_descent_sums_the_aggregation_of_each_micro_batch(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jd = ["objective=iwrm_with_q_halt_in"]
    whole = next(batches(arc_data, tmp_path / "data", 8))
    parts = split(whole, 2)
    config, acc = build(
        arc_data, tmp_path / "acc", *jd, "global_batch_size=4", "+grad_accum_steps=2"
    )
    with monkeypatch.context() as m:
        recorded = Grads(m, acc)
        for part in parts:
            train_batch(config, acc, part, DistInfo())
    (g_acc,) = recorded.seen

    # Each micro-batch aggregated on its own by a run without accumulation, from the same
    # weights: its update is the mean over its 4 rows, the window's over all 8.
    singles = []
    for j, part in enumerate(parts):
        config_j, single = build(arc_data, tmp_path / f"single{j}", *jd, "global_batch_size=4")
        with monkeypatch.context() as m:
            recorded = Grads(m, single)
            train_batch(config_j, single, part, DistInfo())
        singles.append(recorded.seen[0])
    config_w, joint = build(arc_data, tmp_path / "joint", *jd, "global_batch_size=8")
    with monkeypatch.context() as m:
        recorded = Grads(m, joint)
        train_batch(config_w, joint, whole, DistInfo())
    (g_joint,) = recorded.seen

    differs = False
    for name in g_acc:
        summed = (singles[0][name] + singles[1][name]) / 2
        torch.testing.assert_close(g_acc[name], summed, rtol=1e-5, atol=1e-8)
        differs |= not torch.allclose(g_joint[name], summed, rtol=1e-3, atol=1e-6)
    # UPGrad over the 8 objectives at once is another update: what is aggregated matters.
    assert differs


# ----------------------------------------------------------------------------------------------
# Resume and stop requests
# ----------------------------------------------------------------------------------------------
def test_resume_between_windows_is_bit_identical(arc_data: Path, tmp_path: Path) -> None:
    common = ["global_batch_size=4", "+grad_accum_steps=2", "ema=True", "evaluators=[]",
              "arch.halt_max_steps=2"]  # fmt: skip
    train(make_config(arc_data, tmp_path / "a", *common, "max_steps=4"))
    train(make_config(arc_data, tmp_path / "b", *common, "max_steps=2"))
    progress = torch.load(tmp_path / "b/step_2" / ckpt.TRAIN_FILE, weights_only=True)["progress"]
    assert progress["batches_in_iteration"] == 4  # two windows of two micro-batches
    rank = torch.load(tmp_path / "b/step_2/rank_0.pt", weights_only=True)
    assert len(rank["slot_carries"]) == 2 and all(c is not None for c in rank["slot_carries"])
    train(make_config(arc_data, tmp_path / "b", *common, "max_steps=4", "resume=auto"))
    a = [m for m in metric_lines(tmp_path / "a") if "train/lm_loss" in m]
    b = [m for m in metric_lines(tmp_path / "b") if "train/lm_loss" in m]
    assert [m["step"] for m in a] == [1, 2, 3, 4] and a == b
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE):
        wa = torch.load(tmp_path / "a/step_4" / name, weights_only=True)
        wb = torch.load(tmp_path / "b/step_4" / name, weights_only=True)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_stop_request_is_answered_at_the_window_end(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No collective before the window's last micro-batch: the stop request, the metric sums
    and the gradients are reduced there, once."""
    config, state = build(arc_data, tmp_path, "global_batch_size=4", "+grad_accum_steps=2")
    calls = {"reduce_gradients": 0, "all_reduce_sum_": 0}
    for name in calls:
        inner = getattr(step_module, name)

        def counting(*args: Any, _name: str = name, _inner: Any = inner) -> Any:
            calls[_name] += 1
            return _inner(*args)

        monkeypatch.setattr(step_module, name, counting)
    micro = [b for _, b in zip(range(2), batches(arc_data, tmp_path / "d", 4), strict=False)]
    first = train_batch(config, state, micro[0], DistInfo(), stop_requested=True)
    assert not first.update_done and not first.stop_requested
    assert calls == {"reduce_gradients": 0, "all_reduce_sum_": 0}
    with pytest.raises(RuntimeError, match="checkpoints fall between optimizer steps"):
        state.state_dict()
    last = train_batch(config, state, micro[1], DistInfo(), stop_requested=True)
    assert last.update_done and last.stop_requested and state.window.position == 0
    assert calls["reduce_gradients"] == 1 and calls["all_reduce_sum_"] >= 1
    assert state.state_dict()["progress"]["step"] == 1


@pytest.mark.distributed
@pytest.mark.slow  # about 50 s on 2 busy cores
def test_two_gloo_processes_accumulate_as_one(arc_data: Path, tmp_path: Path) -> None:
    """2 processes of 2 rows each, 2 micro-batches per step, train as 1 process of 4 rows: the
    gradients and the puzzle-embedding rows are reduced once per step, over both."""
    common = [*FAST, f"data_paths=[{arc_data}]", "max_steps=3", "evaluators=[]",
              "global_batch_size=4", "+grad_accum_steps=2", "arch.halt_exploration_prob=0",
              "checkpoint_every_steps=3"]  # fmt: skip
    one, two = _run_one_and_two(tmp_path, common)
    _assert_same_training(one, two, 3)
    rank = torch.load(two / "step_3/rank_1.pt", weights_only=True)
    assert len(rank["slot_carries"]) == 2


def test_a_non_finite_micro_batch_skips_the_whole_update(arc_data: Path, tmp_path: Path) -> None:
    """nonfinite=skip: a NaN loss in the window's first micro-batch is caught at its end; no
    weight, puzzle row or moment moves, and the next window starts clean."""
    config, state = build(arc_data, tmp_path, "global_batch_size=4", "+grad_accum_steps=2",
                          "nonfinite=skip")  # fmt: skip
    assert state.strategy is not None
    inner = state.strategy.compute_gradients
    poisoned = {"left": 1}

    def nan_once(*args: Any) -> Any:
        grads = inner(*args)
        if poisoned["left"]:
            poisoned["left"] -= 1
            grads.unchecked_non_finite = torch.ones(())
        return grads

    state.strategy.compute_gradients = nan_once  # type: ignore[method-assign]
    micro = [b for _, b in zip(range(4), batches(arc_data, tmp_path / "d", 4), strict=False)]
    before, table_before = weights(state), table(state)
    train_batch(config, state, micro[0], DistInfo())
    result = train_batch(config, state, micro[1], DistInfo())
    assert result.skipped == "loss" and result.metrics == {
        "train/nonfinite_skipped": 1.0, "train/nonfinite_streak": 1}  # fmt: skip
    assert all(torch.equal(w, before[n]) for n, w in weights(state).items())
    assert torch.equal(table(state), table_before)
    assert state.slot_carries == [None, None] and state.step == 1
    for batch in micro[2:]:
        result = train_batch(config, state, batch, DistInfo())
    assert result.skipped is None and state.nonfinite_streak == 0 and state.step == 2
    moved = (table(state) != table_before).any(dim=1).nonzero().flatten().tolist()
    fresh = torch.cat([b["puzzle_identifiers"] for b in micro[2:]]).tolist()
    assert moved == sorted(set(fresh))  # only the rows of the clean window


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+effective_batch_size=12"], r"effective_batch_size \(12\) must be a multiple of "
         r"global_batch_size \(8\)"),
        (["+effective_batch_size=16", "+grad_accum_steps=3"], r"grad_accum_steps \(3\) and "
         r"effective_batch_size \(16 = 2 x global_batch_size 8\) disagree"),
    ],
)  # fmt: skip
def test_inconsistent_accumulation_settings_are_refused(
    overrides: list[str], message: str, arc_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        make_config(arc_data, tmp_path, *overrides)
    assert "\n" not in str(error.value)


def test_agreeing_settings_are_accepted(arc_data: Path, tmp_path: Path) -> None:
    both = make_config(arc_data, tmp_path, "+effective_batch_size=24", "+grad_accum_steps=3")
    assert both.accumulation_steps == 3
    assert make_config(arc_data, tmp_path).accumulation_steps == 1


def test_fixed_computation_time_with_accumulation_is_refused(
    arc_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="fixed computation time takes 2 optimizer steps") as e:
        build(arc_data, tmp_path, "updates_per_batch=2", "+grad_accum_steps=2")
    assert "\n" not in str(e.value)
