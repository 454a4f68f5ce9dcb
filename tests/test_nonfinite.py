"""Non-finite losses and gradients: caught before any update, never checkpointed, optionally
skipped (``nonfinite=skip``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import losses
from tests.test_training import make_config, metric_lines, train
from training import jd, step
from training.loop import NonFiniteLossError
from utils import checkpoint as ckpt


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model, EMA and optimizer files, by a readable name."""
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            found[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.TRAIN_FILE):
        if (folder / name).is_file():
            walk(name, torch.load(folder / name, weights_only=True))
    return found


def _nan_gradient_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """A finite loss whose gradient holds a NaN at the given steps (counted by calls)."""
    real = step.reduce_gradients
    calls = {"n": 0}

    def poisoned(params: list[torch.nn.Parameter]) -> None:
        calls["n"] += 1
        real(params)
        if calls["n"] in steps:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("nan")

    monkeypatch.setattr(step, "reduce_gradients", poisoned)


def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    real = losses.LossOutput.total
    calls = {"n": 0}

    def total(out: losses.LossOutput) -> torch.Tensor:
        calls["n"] += 1
        value = real(out)
        return value * float("nan") if calls["n"] in steps else value

    monkeypatch.setattr(losses.LossOutput, "total", total)


def _train_lines(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metric_lines(run_dir) if any(k.startswith("train/") for k in m)}


def test_a_non_finite_gradient_norm_stops_before_the_update(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss is finite, one gradient entry is NaN at step 3: the run stops there, naming
    step_2, and no checkpoint (nor step 3's metrics) holds a non-finite value."""
    _nan_gradient_at(monkeypatch, {3})
    config = make_config(arc_data, tmp_path, "max_steps=6", "checkpoint_every_steps=1", "ema=True")
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite gradient norm at step 3; last good checkpoint: .*step_2",
    ):
        train(config)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_1", "step_2"]
    for folder in ckpt.list_checkpoints(tmp_path):
        bad = [
            k
            for k, v in _tensors(folder).items()
            if v.is_floating_point() and not v.isfinite().all()
        ]
        assert bad == [], (folder.name, bad)
    assert [m["step"] for m in metric_lines(tmp_path) if "train/lm_loss" in m] == [1, 2]


def test_a_huge_learning_rate_never_checkpoints_non_finite_weights(
    arc_data: Path, tmp_path: Path
) -> None:
    """The report's case (a huge lr, a checkpoint every 2 steps): here the gradient of step 3
    is the first non-finite one; the run stops there, every checkpoint written is finite and
    the error names the newest (before the fix, the update was applied and checkpointed)."""
    config = make_config(arc_data, tmp_path, "lr=1e3", "puzzle_emb_lr=1e3", "max_steps=12",
                         "checkpoint_every_steps=2", "lr_warmup_steps=0")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"at step 3; last good checkpoint: .*step_2 "):
        train(config)
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "step_2"]
    tensors = _tensors(tmp_path / "step_2")
    assert all(v.isfinite().all() for v in tensors.values() if v.is_floating_point())


def test_skip_drops_the_update_and_goes_on(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nonfinite=skip: step 3's NaN loss leaves weights, EMA and optimizer moments as step 2
    left them; training then continues to max_steps with finite losses."""
    _nan_loss_at(monkeypatch, {3})
    config = make_config(arc_data, tmp_path, "max_steps=5", "checkpoint_every_steps=1",
                         "ema=True", "nonfinite=skip")  # fmt: skip
    outcome = train(config)
    assert outcome.steps == 5
    two, three = _tensors(tmp_path / "step_2"), _tensors(tmp_path / "step_3")
    unchanged = [k for k in two if k.startswith((ckpt.MODEL_FILE, ckpt.EMA_FILE))]
    unchanged += [k for k in two if k.startswith(ckpt.TRAIN_FILE) and "/state/" in k]
    assert len(unchanged) > 10
    for key in unchanged:
        assert torch.equal(two[key], three[key]), key
    four = _tensors(tmp_path / "step_4")
    assert any(not torch.equal(three[k], four[k]) for k in unchanged if k.startswith("model"))
    lines = _train_lines(tmp_path)
    assert lines[3].get("train/nonfinite_skipped") == 1.0 and "train/lm_loss" not in lines[3]
    for s in (4, 5):
        assert "train/nonfinite_skipped" not in lines[s]
        assert torch.isfinite(torch.tensor(lines[s]["train/lm_loss"]))


def test_skip_gives_up_after_the_limit_in_a_row(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_gradient_at(monkeypatch, {2, 4, 5, 6})
    config = make_config(arc_data, tmp_path, "max_steps=8", "nonfinite=skip",
                         "nonfinite_max_skips=3")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"at step 6: 3 steps in a row"):
        train(config)
    skipped = [m["step"] for m in metric_lines(tmp_path) if m.get("train/nonfinite_skipped")]
    assert skipped == [2, 4, 5]  # step 3 was fine and restarted the count


def test_jacobian_descent_skips_a_non_finite_objective(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under Jacobian descent the loss is checked before the Jacobian is formed; skipping
    there leaves the run able to go on."""
    real = jd.step_contributions
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        c = real(*args, **kwargs)
        return c * float("nan") if calls["n"] == 2 else c

    monkeypatch.setattr(jd, "step_contributions", poisoned)
    config = make_config(arc_data, tmp_path, "max_steps=4", "nonfinite=skip",
                         "objective=lm_loss_vs_q_halt_loss")  # fmt: skip
    assert train(config).steps == 4
    lines = _train_lines(tmp_path)
    assert lines[2].get("train/nonfinite_skipped") == 1.0
    assert all(torch.isfinite(torch.tensor(lines[s]["train/lm_loss"])) for s in (1, 3, 4))
