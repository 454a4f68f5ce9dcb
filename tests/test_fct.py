"""Fixed computation time (ETRM-FCT): N optimizer steps per batch, the carry reset per batch,
the learning rate per optimizer step, exact schedule length and resume between a batch's steps;
the encoder/decoder gradient-norm split and ``freeze_decoder_steps``.

The strategy is model-agnostic, so these tests run it on a tiny TRM (``updates_per_batch=N``)
over the hand-written dataset of ``tests/conftest.py`` (25 examples of 4 tokens);
``sampler=sequential`` emits exactly the batches it counts, so the schedule length can be
compared with the steps taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models.recursive_reasoning.family import RecursiveFamily
from tests.test_training import make_config, metric_lines, train
from training import loop, step
from training.config import PretrainConfig
from training.strategies import strategy_name
from utils.optim import cosine_schedule_with_warmup_lr_lambda
from utils.schema import UserError

N = 3
# 25 training examples: 4 batches of 8 per epoch.
FCT = ["step_strategy=fixed_computation_time", f"updates_per_batch={N}", "sampler=sequential",
       "evaluators=[]", "arch.halt_exploration_prob=0"]  # fmt: skip


class Recorder:
    """Wraps ``training.loop.train_batch``: per call, the batch, the carry's step counts and
    the weights after the step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        inner = loop.train_batch

        def weights(state: Any) -> dict[str, torch.Tensor]:
            return {n: p.detach().clone() for n, p in state.raw_model.named_parameters()}

        def recording(config: PretrainConfig, state: Any, batch: dict, *a: Any, **k: Any) -> Any:
            position, before = state.strategy.position, weights(state)
            result = inner(config, state, batch, *a, **k)
            self.calls.append({
                "inputs": batch["inputs"].clone(), "position": position,
                "steps": state.carry.steps.clone(), "before": before, "weights": weights(state),
                "batch_done": result.batch_done, "step": state.step,
                "total_steps": state.total_steps,
            })  # fmt: skip
            return result

        monkeypatch.setattr(loop, "train_batch", recording)


class LearningRates:
    """Wraps ``training.step.step_optimizers``: the (step, lr) of every optimizer step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[tuple[int, float]] = []
        inner = step.step_optimizers

        def recording(optimizers: Any, at: int, total: int, config: PretrainConfig) -> float:
            lr = inner(optimizers, at, total, config)
            self.steps.append((at, lr))
            return lr

        monkeypatch.setattr(step, "step_optimizers", recording)


def test_n_optimizer_steps_per_batch_reset_per_batch_lr_per_step(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Recorder(monkeypatch).calls
    lrs = LearningRates(monkeypatch).steps
    config = make_config(data, tmp_path, *FCT, "epochs=1", "eval_interval=1",
                         "lr=0.01", "lr_warmup_steps=1000")  # fmt: skip
    outcome = train(config)

    batches = len(calls) // N
    assert len(calls) == N * batches and batches == 4
    # The schedule is exactly the optimizer steps taken: N per batch the sampler emits.
    assert outcome.steps == len(calls) == calls[0]["total_steps"] == N * batches
    assert [s for s, _ in lrs] == list(range(1, N * batches + 1))
    for b in range(batches):
        group = calls[b * N : (b + 1) * N]
        assert [c["position"] for c in group] == list(range(N))
        assert [c["batch_done"] for c in group] == [False] * (N - 1) + [True]
        assert all(torch.equal(c["inputs"], group[0]["inputs"]) for c in group)
        # Every row restarts at the batch's first step and never halts within it: after the
        # k-th step each row has taken exactly k steps on its item.
        for k, c in enumerate(group, start=1):
            assert bool((c["steps"] == k).all()), (b, k, c["steps"])
    assert not torch.equal(calls[0]["inputs"], calls[N]["inputs"])
    # Every optimizer step changes the weights.
    for c in calls:
        assert any(not torch.equal(c["before"][n], c["weights"][n]) for n in c["weights"])
    # The learning rate is the schedule's at each optimizer step (linear warm-up: lr·t/1000),
    # so the N steps of a batch have N different learning rates.
    assert [lr for _, lr in lrs] == pytest.approx([0.01 * t / 1000 for t in range(1, len(lrs) + 1)])
    # Metrics are logged from the last of a batch's N steps.
    logged = [m for m in metric_lines(tmp_path) if "train/lm_loss" in m]
    assert [m["step"] for m in logged] == [N * (b + 1) for b in range(batches)]
    assert [m["train/lr"] for m in logged] == pytest.approx(
        [0.01 * N * (b + 1) / 1000 for b in range(batches)]
    )


def test_the_schedule_is_indexed_by_optimizer_step(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cosine decay over the whole run: the last optimizer step reaches the floor, the first
    steps of the run follow warm-up, each at its own index."""
    lrs = LearningRates(monkeypatch).steps
    config = make_config(data, tmp_path, *FCT, "epochs=1", "eval_interval=1", "lr=0.02",
                         "lr_warmup_steps=2", "lr_min_ratio=0.1")  # fmt: skip
    train(config)
    total = len(lrs)
    assert total == 4 * N
    expected = [
        cosine_schedule_with_warmup_lr_lambda(
            t, base_lr=0.02, num_warmup_steps=2, num_training_steps=total, min_ratio=0.1
        )
        for t in range(1, total + 1)
    ]
    assert [lr for _, lr in lrs] == pytest.approx(expected)
    assert lrs[-1][1] == pytest.approx(0.002)


@pytest.mark.parametrize("stop_at", [4, 6])  # between two steps of a batch, and at its end
def test_resume_between_the_steps_of_a_batch_is_bit_identical(
    data: Path, tmp_path: Path, stop_at: int
) -> None:
    """8 steps straight == ``stop_at`` steps, stop, resume=auto, the rest == resuming from the
    straight run's own ``checkpoint_every_steps`` checkpoint at ``stop_at``."""
    common = [*FCT, "epochs=2", "eval_interval=1", "ema=True", "lr=0.01", "lr_warmup_steps=2"]
    train(make_config(data, tmp_path / "a", *common, "max_steps=8",
                      f"checkpoint_every_steps={stop_at}"))  # fmt: skip
    assert train(make_config(data, tmp_path / "b", *common, f"max_steps={stop_at}")).steps == (
        stop_at
    )
    saved = torch.load(tmp_path / f"b/step_{stop_at}/train_state.pt", weights_only=True)
    assert saved["strategy"] == {"position": stop_at % N}
    assert train(make_config(data, tmp_path / "b", *common, "max_steps=8",
                             "resume=auto")).steps == 8  # fmt: skip
    mid = tmp_path / "a" / f"step_{stop_at}"
    assert train(make_config(data, tmp_path / "c", *common, "max_steps=8",
                             f"resume={mid}")).steps == 8  # fmt: skip
    a = [m for m in metric_lines(tmp_path / "a") if "train/lm_loss" in m]
    b = [m for m in metric_lines(tmp_path / "b") if "train/lm_loss" in m]
    c = [m for m in metric_lines(tmp_path / "c") if "train/lm_loss" in m]
    assert [m["step"] for m in a] == [3, 6] and a == b
    assert c == [m for m in a if m["step"] > stop_at]
    for run in ("b", "c"):
        for name in ("model.pt", "ema.pt"):
            wa = torch.load(tmp_path / "a/step_8" / name, weights_only=True)
            wb = torch.load(tmp_path / run / "step_8" / name, weights_only=True)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        oa = torch.load(tmp_path / "a/step_8/train_state.pt", weights_only=True)["optimizers"]
        ob = torch.load(tmp_path / run / "step_8/train_state.pt", weights_only=True)["optimizers"]
        ma, mb = oa["weights"]["state"], ob["weights"]["state"]
        assert ma.keys() == mb.keys()
        assert all(torch.equal(ma[i]["exp_avg_sq"], mb[i]["exp_avg_sq"]) for i in ma)


def test_strategy_choice_and_refusals(data: Path, tmp_path: Path) -> None:
    assert strategy_name(make_config(data, tmp_path, "updates_per_batch=2")) == (
        "fixed_computation_time"
    )
    assert strategy_name(make_config(data, tmp_path)) == "gradient_descent"
    with pytest.raises(UserError, match="fixed_computation_time needs the optimizer steps"):
        strategy_name(make_config(data, tmp_path, "step_strategy=fixed_computation_time"))
    with pytest.raises(UserError, match="only fixed_computation_time takes; use step_strategy"):
        strategy_name(make_config(data, tmp_path, "updates_per_batch=2",
                                  "step_strategy=gradient_descent"))  # fmt: skip
    with pytest.raises(UserError, match=r"ignore objective 'lm_loss_vs_q_halt_loss'; use "
                                        r"objective=sum$"):  # fmt: skip
        strategy_name(make_config(data, tmp_path, "updates_per_batch=2",
                                  "objective=lm_loss_vs_q_halt_loss"))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Gradient-norm groups and freeze_decoder_steps, on TRM with two stand-in groups
# ----------------------------------------------------------------------------------------------
def split_groups(head: nn.Module) -> dict[str, list[nn.Parameter]]:
    """TRM's recursion block as the "encoder", the rest (embeddings, heads) as the decoder."""
    named = dict(head.named_parameters())
    encoder = [p for n, p in named.items() if ".L_level." in n]
    decoder = [p for n, p in named.items() if ".L_level." not in n]
    return {"encoder": encoder, "decoder": decoder}


@pytest.fixture
def two_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RecursiveFamily, "norm_groups", lambda self, head: split_groups(head),
                        raising=False)  # fmt: skip


def test_group_norms_are_taken_before_clipping(
    data: Path, tmp_path: Path, two_groups: None
) -> None:
    runs = {}
    for clip in ("null", "1e-6"):
        run = tmp_path / clip
        train(make_config(data, run, "max_steps=1", "evaluators=[]",
                          f"grad_clip_norm={clip}"))  # fmt: skip
        runs[clip] = next(m for m in metric_lines(run) if "train/lm_loss" in m)
    free, clipped = runs["null"], runs["1e-6"]
    for key in ("train/grad_norm", "train/grad_norm/encoder", "train/grad_norm/decoder"):
        assert clipped[key] == free[key] > 1e-3  # the same step-1 gradients, not the clip
    # The groups split the parameters with a gradient: their squares add up to the total's.
    total = free["train/grad_norm"]
    parts = free["train/grad_norm/encoder"] ** 2 + free["train/grad_norm/decoder"] ** 2
    assert parts == pytest.approx(total**2, rel=1e-5)


def test_without_groups_there_are_no_group_norms(data: Path, tmp_path: Path) -> None:
    train(make_config(data, tmp_path, "max_steps=1", "evaluators=[]"))
    line = next(m for m in metric_lines(tmp_path) if "train/lm_loss" in m)
    assert "train/grad_norm" in line
    assert not [k for k in line if k.startswith("train/grad_norm/")]
    assert "train/decoder_frozen" not in line


def test_freeze_decoder_steps_trains_only_the_encoder(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_groups: None
) -> None:
    calls = Recorder(monkeypatch).calls
    config = make_config(data, tmp_path, "max_steps=4", "evaluators=[]", "ema=True",
                         "freeze_decoder_steps=2", "weight_decay=0.5", "lr=0.01",
                         "lr_warmup_steps=1")  # fmt: skip
    train(config)
    names = list(calls[0]["weights"])
    decoder = [n for n in names if ".L_level." not in n]
    encoder = [n for n in names if ".L_level." in n]
    assert decoder and encoder

    def changed(names: list[str], step: int) -> bool:
        c = calls[step - 1]
        return any(not torch.equal(c["before"][n], c["weights"][n]) for n in names)

    # Steps 1 and 2: the decoder stays exactly as it was (no update, no weight decay) while the
    # encoder trains; from step 3 on, both train.
    assert [changed(decoder, s) for s in (1, 2, 3, 4)] == [False, False, True, True]
    assert [changed(encoder, s) for s in (1, 2, 3, 4)] == [True, True, True, True]
    lines = [m for m in metric_lines(tmp_path) if "train/lm_loss" in m]
    assert [m["train/decoder_frozen"] for m in lines] == [1.0, 1.0, 0.0, 0.0]
    assert lines[0]["train/grad_norm/decoder"] == 0.0 < lines[0]["train/grad_norm/encoder"]
    assert lines[2]["train/grad_norm/decoder"] > 0.0


def test_freeze_decoder_keeps_moments_and_ema(data: Path, tmp_path: Path, two_groups: None) -> None:
    train(make_config(data, tmp_path, "max_steps=2", "evaluators=[]", "ema=True",
                      "freeze_decoder_steps=2", "checkpoint_every_steps=2"))  # fmt: skip
    model = torch.load(tmp_path / "step_2/model.pt", weights_only=True)
    ema = torch.load(tmp_path / "step_2/ema.pt", weights_only=True)
    state = torch.load(tmp_path / "step_2/train_state.pt", weights_only=True)
    names = [n for n in ema if ".L_level." not in n]
    assert names and all(torch.equal(ema[n], model[n]) for n in names)  # shadow never moved
    # AdamATan2's moments exist only for the parameters it updated: the encoder's.
    moments = state["optimizers"]["weights"]["state"]
    encoder_count = sum(1 for n in ema if ".L_level." in n)
    assert len(moments) == encoder_count


def test_freeze_decoder_needs_a_decoder(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="freeze_decoder_steps: arch=trm has no encoder"):
        train(make_config(data, tmp_path, "max_steps=1", "evaluators=[]",
                          "freeze_decoder_steps=2"))  # fmt: skip
    with pytest.raises(UserError, match="freeze_decoder_steps trains with the summed loss"):
        make_config(data, tmp_path, "freeze_decoder_steps=2",
                    "objective=lm_loss_vs_q_halt_loss")  # fmt: skip
