"""The JD fork's step-level loop knobs on short CPU runs: ``lr_first_step`` (the schedule read
before or after the step is counted), ``cap_total_steps`` (training past the schedule's
estimate), ``start_step``, ``run_evaluator_only_at_end`` and ``log_param_grad_norms_every``.

The runs train a tiny TRM on the hand-written dataset of ``tests/conftest.py`` (25 examples of
4 tokens; ``sampler=sequential`` yields exactly ⌈25 / batch⌉ batches per epoch) or on a
dataset written here whose schedule estimate falls short of the batches it yields.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluators.base import build_evaluators
from tests.test_puzzle_dataset import write_split
from tests.test_training import make_config, metric_lines
from training import loop
from training import step as step_module
from training.config import PretrainConfig
from training.loop import RunOutcome, run_training
from utils.distributed import DistInfo
from utils.logging import build_logger
from utils.optim import cosine_schedule_with_warmup_lr_lambda

BASE_LR = 0.01
WARMUP = 2
MIN_RATIO = 0.1
# Weights and puzzle embedding at the same base lr, so the logged lr (the last optimizer's)
# is the schedule's whichever optimizer comes last; a floor of 0.1 shows the cosine's shape.
SCHEDULE = [f"lr={BASE_LR}", f"puzzle_emb_lr={BASE_LR}", f"lr_warmup_steps={WARMUP}",
            f"lr_min_ratio={MIN_RATIO}"]  # fmt: skip
SEQUENTIAL = ["sampler=sequential", "evaluators=[]", "arch.halt_exploration_prob=0"]
PARAM_PREFIX = "train/grad_norm_"


def hand_lr(t: int, total: int, base: float = BASE_LR) -> float:
    """Linear warm-up from 0 over ``WARMUP`` steps, then half a cosine from ``base`` to
    ``base·MIN_RATIO`` at ``total``, continued unclamped past it."""
    if t < WARMUP:
        return base * t / WARMUP
    progress = (t - WARMUP) / max(1, total - WARMUP)
    return base * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)) / 2)


class Progress:
    """Records what the loop announces: the schedule's length and the first step."""

    def __init__(self) -> None:
        self.total = self.initial = -1

    def start(self, total: int, initial: int) -> None:
        self.total, self.initial = total, initial

    def update(self, **postfix: float) -> None:
        pass

    def close(self) -> None:
        pass


def run(config: PretrainConfig) -> tuple[RunOutcome, Progress]:
    logger = build_logger(
        "none", project="p", run_name="r", config={}, run_dir=config.checkpoint_path, is_main=True
    )
    progress = Progress()
    outcome = run_training(
        config,
        DistInfo(),
        logger=logger,
        progress=progress,
        evaluators_factory=lambda data: build_evaluators(
            config.evaluators, data.config.dataset_paths, data.identifier_offsets
        ),
    )
    return outcome, progress


def train_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [m for m in metric_lines(run_dir) if "train/lm_loss" in m]


# ----------------------------------------------------------------------------------------------
# lr_first_step
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lr_first_step", "strategy"),
    [(0, "plain"), (1, "plain"), (0, "accumulation"), (0, "fixed_computation_time")],
)
def test_logged_lr_is_the_schedule_at_the_step_before_or_at_the_step(
    data: Path, tmp_path: Path, lr_first_step: int, strategy: str
) -> None:
    """The n-th optimizer step's lr is the schedule's at n − 1 (the JD fork) or n (upstream),
    the schedule counted in optimizer steps with accumulation and fixed computation time."""
    extra = {
        "plain": [],  # 4 batches of 8: 4 steps
        "accumulation": ["global_batch_size=4", "+grad_accum_steps=2"],  # 7 batches of 4 → 3
        "fixed_computation_time": ["step_strategy=fixed_computation_time", "updates_per_batch=2"],
    }[strategy]
    config = make_config(data, tmp_path, *SEQUENTIAL, *SCHEDULE, "epochs=1", "eval_interval=1",
                         f"+lr_first_step={lr_first_step}", *extra)  # fmt: skip
    outcome, progress = run(config)
    total = {"plain": 4, "accumulation": 7 // 2, "fixed_computation_time": 2 * 4}[strategy]
    assert progress.total == outcome.steps == total
    lines = train_lines(tmp_path)
    # Fixed computation time logs the last of each batch's 2 steps.
    every = 2 if strategy == "fixed_computation_time" else 1
    assert [m["step"] for m in lines] == list(range(every, total + 1, every))
    expected = [hand_lr(m["step"] - 1 + lr_first_step, total) for m in lines]
    assert [m["train/lr"] for m in lines] == pytest.approx(expected, rel=1e-12)
    if lr_first_step == 0 and every == 1:
        assert lines[0]["train/lr"] == 0.0  # the fork's first update is warm-up's lr 0
    if lr_first_step == 1:
        assert lines[-1]["train/lr"] == pytest.approx(BASE_LR * MIN_RATIO)


# ----------------------------------------------------------------------------------------------
# cap_total_steps
# ----------------------------------------------------------------------------------------------
def test_the_cosine_continues_unclamped_past_the_schedule() -> None:
    """Past ``total`` the cosine goes on: back to the floor's mirror image and up to the full
    lr at progress 2, as the fork's formula gives."""
    total, base = 12, 1e-3
    for t in range(total, 3 * total):
        got = cosine_schedule_with_warmup_lr_lambda(
            t, base_lr=base, num_warmup_steps=WARMUP, num_training_steps=total,
            min_ratio=MIN_RATIO,
        )  # fmt: skip
        assert got == pytest.approx(hand_lr(t, total, base), rel=1e-12, abs=1e-18)
    at = {p: hand_lr(WARMUP + p * (total - WARMUP), total, base) for p in (1, 1.5, 2)}
    assert at == pytest.approx({1: base * MIN_RATIO, 1.5: base * (1 + MIN_RATIO) / 2, 2: base})


@pytest.fixture
def short_estimate(tmp_path: Path) -> Path:
    """Eight groups: one of thirty one-example variants, seven of one two-example puzzle.
    Upstream's estimate, groups × mean puzzle size = 8 × 44/37 ≈ 9.5 examples per epoch, is
    below the 15 that one visit of every group yields (7 batches of 2)."""
    root = tmp_path / "short"
    write_split(root, "train", [[1] * 30] + [[2]] * 7)
    return root


def test_without_the_cap_every_batch_trains_and_the_cosine_goes_on(
    short_estimate: Path, tmp_path: Path
) -> None:
    common = [*SCHEDULE, "global_batch_size=2", "epochs=2", "eval_interval=1", "evaluators=[]",
              "lr_warmup_steps=1"]  # fmt: skip
    capped, capped_progress = run(make_config(short_estimate, tmp_path / "cap", *common))
    free, free_progress = run(
        make_config(short_estimate, tmp_path / "free", *common, "+cap_total_steps=False")
    )
    total = int(2 * 8 * (44 / 37) / 2)  # upstream's estimate: 9 optimizer steps
    assert capped_progress.total == free_progress.total == total == 9
    # Both runs see the same 2 × 7 batches (same seed and sampler); the counter counts them all.
    assert capped.steps == free.steps == 14
    capped_lines, free_lines = train_lines(tmp_path / "cap"), train_lines(tmp_path / "free")
    assert [m["step"] for m in capped_lines] == list(range(1, total + 1))
    assert [m["step"] for m in free_lines] == list(range(1, 15))
    # The cosine goes on with warm-up 1: progress (t − 1)/(total − 1), 13/8 at the last step,
    # where the lr has risen from the floor again.
    for m in free_lines:
        progress = (m["step"] - 1) / (total - 1)
        floor_and_cosine = MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)) / 2
        assert m["train/lr"] == pytest.approx(BASE_LR * floor_and_cosine, rel=1e-12)
    assert free_lines[total - 1]["train/lr"] == pytest.approx(BASE_LR * MIN_RATIO)
    assert free_lines[-1]["train/lr"] > 3 * BASE_LR * MIN_RATIO
    for a, b in zip(capped_lines, free_lines, strict=False):  # the same run up to the cap
        assert a["train/lm_loss"] == b["train/lm_loss"] and a["train/lr"] == b["train/lr"]


# ----------------------------------------------------------------------------------------------
# start_step
# ----------------------------------------------------------------------------------------------
def test_start_step_offsets_a_fresh_run_and_is_ignored_on_resume(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh run counts from start_step: its logged steps, the lr, the checkpoints' names;
    with the cap the schedule's last 3 steps (past total_steps = 8) train on nothing. A resume
    continues from the checkpoint's step and says start_step is ignored."""
    common = [*SEQUENTIAL, *SCHEDULE, "epochs=2", "eval_interval=1"]  # 2 × 4 batches: total 8
    first, progress = run(make_config(data, tmp_path, *common, "+start_step=3", "max_steps=5"))
    assert (progress.initial, progress.total) == (3, 8)
    assert first.steps == 5 and first.last_checkpoint == tmp_path / "step_5"
    lines = train_lines(tmp_path)
    assert [m["step"] for m in lines] == [4, 5]
    assert [m["train/lr"] for m in lines] == pytest.approx([hand_lr(4, 8), hand_lr(5, 8)])

    capsys.readouterr()
    second, progress = run(make_config(data, tmp_path, *common, "+start_step=9", "resume=auto"))
    out = capsys.readouterr().out
    assert "start_step=9 is ignored: the run continues from the checkpoint's step 5" in out
    assert progress.initial == 5
    # Steps 6–8 train; the 3 batches left (steps 9–11) are past the schedule.
    assert second.steps == 11 and second.last_checkpoint == tmp_path / "step_11"
    assert [m["step"] for m in train_lines(tmp_path)] == [4, 5, 6, 7, 8]


# ----------------------------------------------------------------------------------------------
# run_evaluator_only_at_end
# ----------------------------------------------------------------------------------------------
def test_evaluation_only_at_the_end_keeps_every_checkpoint(data: Path, tmp_path: Path) -> None:
    config = make_config(data, tmp_path, *SEQUENTIAL, "epochs=2", "eval_interval=1",
                         "checkpoint_every_eval=True",
                         "+run_evaluator_only_at_end=True")  # fmt: skip
    outcome = run(config)[0]
    assert outcome.steps == 8
    evaluations = [m for m in metric_lines(tmp_path) if "all/lm_loss" in m]
    assert [m["step"] for m in evaluations] == [8]
    assert outcome.eval_metrics["all/lm_loss"] == evaluations[0]["all/lm_loss"]
    assert (tmp_path / "step_4").is_dir() and (tmp_path / "step_8").is_dir()


# ----------------------------------------------------------------------------------------------
# log_param_grad_norms_every
# ----------------------------------------------------------------------------------------------
def test_param_grad_norms_are_the_reduced_unclipped_gradients_every_n_steps(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 2nd step logs ‖g‖ of each parameter's gradient as the step reduced it, before
    clipping (clip_norm 1e-3 changes every gradient here); the other steps compute none."""
    reduced: dict[int, dict[str, torch.Tensor]] = {}
    computed: list[int] = []
    inner_reduce, inner_norms = step_module.reduce_gradients, step_module.param_grad_norms
    states: list[Any] = []
    original_train_batch = step_module.train_batch

    def recording_train_batch(config: PretrainConfig, state: Any, *a: Any, **k: Any) -> Any:
        states[:] = [state]
        return original_train_batch(config, state, *a, **k)

    def recording_reduce(params: list[torch.nn.Parameter]) -> None:
        inner_reduce(params)
        state = states[0]
        reduced[state.step] = {n: p.grad.clone() for n, p in state.raw_model.named_parameters()
                               if p.grad is not None}  # fmt: skip

    def recording_norms(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        computed.append(states[0].step)
        return inner_norms(module)

    monkeypatch.setattr(loop, "train_batch", recording_train_batch)
    monkeypatch.setattr(step_module, "reduce_gradients", recording_reduce)
    monkeypatch.setattr(step_module, "param_grad_norms", recording_norms)
    config = make_config(data, tmp_path, *SEQUENTIAL, "epochs=1", "eval_interval=1",
                         "grad_clip_norm=0.001", "+log_param_grad_norms_every=2")  # fmt: skip
    assert run(config)[0].steps == 4
    assert computed == [2, 4] and sorted(reduced) == [1, 2, 3, 4]

    lines = {m["step"]: m for m in train_lines(tmp_path)}
    for step in (1, 3):
        assert not any(k.startswith(PARAM_PREFIX) for k in lines[step])
    for step in (2, 4):
        logged = {k[len(PARAM_PREFIX) :]: v for k, v in lines[step].items()
                  if k.startswith(PARAM_PREFIX)}  # fmt: skip
        grads = reduced[step]
        assert set(logged) == set(grads) and len(grads) > 5
        assert all(name.startswith("model.inner.") for name in logged)
        assert not any("puzzle_emb" in name for name in logged)  # a buffer, not a parameter
        for name, grad in grads.items():
            assert logged[name] == pytest.approx(torch.linalg.vector_norm(grad).item(), rel=1e-5)
        # The per-parameter norms make up the global one, and that one was clipped afterwards.
        whole = math.sqrt(sum(v * v for v in logged.values()))
        assert lines[step]["train/grad_norm"] == pytest.approx(whole, rel=1e-5)
        assert whole > 100 * 0.001
