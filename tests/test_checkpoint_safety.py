"""Checkpoints that are corrupt, written on other data or settings, or cannot be written: each
fault is one line naming it, and nothing good is lost or overwritten."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluate import EvaluateConfig
from evaluate import run as run_evaluate
from tests.test_training import REPO, make_config, train
from training.checkpointing import (
    RESUME_SAFE_KEYS,
    ChangedSettingsError,
    DataMismatchError,
    NonFiniteWeightsError,
    check_training_data,
    resolve_resume,
    resume_train_state,
    save_train_state,
    weights_for_loading,
)
from training.config import PretrainConfig
from training.data import create_dataloader
from training.state import TrainState, create_train_state
from utils import checkpoint as ckpt
from utils.distributed import DistInfo

NOT_READABLE = "not a readable {} (truncated or not a torch.save file)"


def settings(data: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    """The fixture run's settings (plus ``overrides``) on ``data``, saving into ``run_dir``."""
    base = ["ema=True", "evaluators=[]", "checkpoint_every_steps=1", "max_steps=2"]
    return make_config(data, run_dir, *base, *overrides)


@pytest.fixture(scope="module")
def trained(arc_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run with EMA and a checkpoint after each step (step_1, step_2)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(settings(arc_data, run_dir))
    return run_dir


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run folder."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def state_at_step(config: PretrainConfig, step: int) -> tuple[TrainState, object]:
    """A fresh train state (and its training data) with its counter at ``step``."""
    _, data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    state = create_train_state(config, data, DistInfo())
    state.step = step
    return state, data


def resume(config: PretrainConfig) -> TrainState:
    """What ``resume=...`` does at the start of a run, without training afterwards."""
    state, data = state_at_step(config, 0)
    folder = resolve_resume(config)
    assert folder is not None
    resume_train_state(folder, state, DistInfo(), data, config)  # type: ignore[arg-type]
    return state


def truncate(path: Path) -> tuple[int, int]:
    """Cut ``path`` to half its size; (new size, old size)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2, len(data)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_hashes(folder: Path) -> None:
    """Rewrite meta.json as checkpoints were written before it listed files and data."""
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    meta.pop("files"), meta.pop("data")
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))


def copy_data(arc_data: Path, dst: Path, *, swap_identifiers: bool = False) -> Path:
    """A copy of the dataset; ``swap_identifiers``: another build (two puzzles' ids swapped)."""
    shutil.copytree(arc_data, dst)
    if swap_identifiers:
        names = json.loads((dst / "identifiers.json").read_text())
        names[1], names[2] = names[2], names[1]
        (dst / "identifiers.json").write_text(json.dumps(names))
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text and "weights_only" not in text
    return text


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------
def test_meta_lists_every_file_with_its_size_and_sha256(arc_data: Path, trained: Path) -> None:
    folder = trained / "step_2"
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {ckpt.META_FILE}
    assert on_disk == {"model.pt", "ema.pt", "train_state.pt", "rank_0.pt"}
    assert meta["files"] == {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
        for name in on_disk
    }
    fingerprint = meta["data"][str(arc_data)]
    assert fingerprint["identifiers"] == sha256(arc_data / "identifiers.json")
    train_meta = json.loads((arc_data / "train" / "dataset.json").read_text())
    assert fingerprint["splits"]["train"]["metadata"] == train_meta
    assert set(fingerprint["splits"]) == {"train", "test"}


def test_a_truncated_checkpoint_is_stepped_over_by_resume_auto(
    arc_data: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size, full = truncate(run / "step_2" / ckpt.TRAIN_FILE)
    assert ckpt.latest_good_checkpoint(run) == run / "step_1"
    state = resume(settings(arc_data, run, "max_steps=3", "resume=auto"))
    assert state.step == 1
    assert (
        f"resume=auto: step_2 is corrupt (train_state.pt: size {size} != {full}); "
        "resuming from step_1"
    ) in capsys.readouterr().out.splitlines()


def test_a_corrupt_explicit_resume_is_one_line(arc_data: Path, run: Path) -> None:
    folder = run / "step_2"
    flip_a_byte(folder / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CorruptCheckpointError) as error:
        resolve_resume(settings(arc_data, run, f"resume={folder}"))
    assert one_line(error) == (
        f"resume={folder}: corrupt checkpoint (model.pt: sha256 differs from the one in "
        "meta.json); give another step_N, or resume=auto for the newest one that verifies"
    )
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"step_2: corrupt checkpoint \(model"):
        weights_for_loading(folder)  # load_checkpoint= and evaluation verify too


def test_checkpoints_without_hashes_still_load_and_truncation_is_still_caught(
    arc_data: Path, run: Path
) -> None:
    for folder in (run / "step_1", run / "step_2"):
        drop_hashes(folder)
        assert ckpt.verify_checkpoint(folder) is None
    shared, per_rank = ckpt.load_checkpoint_files(run / "step_2", rank=0)
    assert {ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.TRAIN_FILE} <= shared.keys() and per_rank
    truncate(run / "step_2" / ckpt.MODEL_FILE)
    assert ckpt.verify_checkpoint(run / "step_2") == (
        "model.pt: not a complete zip archive (truncated?)"
    )
    assert resolve_resume(settings(arc_data, run, "resume=auto")) == run / "step_1"
    with zipfile.ZipFile(run / "step_1" / ckpt.EMA_FILE, "w") as zf:  # a zip, not torch's
        zf.writestr("archive/data.pkl", b"garbage")
    with pytest.raises(ckpt.CorruptCheckpointError) as error:
        ckpt.load_checkpoint_files(run / "step_1", rank=0)
    expected = NOT_READABLE.format("PyTorch checkpoint")
    assert one_line(error) == f"{run / 'step_1' / ckpt.EMA_FILE}: {expected}"


def test_an_old_checkpoint_without_hashes_resumes(arc_data: Path, run: Path) -> None:
    shutil.rmtree(run / "step_2")
    drop_hashes(run / "step_1")
    assert resume(settings(arc_data, run, "resume=auto")).step == 1


class Opaque:
    """An object that weights-only loading refuses."""


def test_garbage_and_foreign_pt_files_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "x.pt"
    garbage.write_text("not a checkpoint")
    for read in (ckpt.read_state_dict, lambda p: weights_for_loading(Path(p))):
        with pytest.raises(ckpt.CorruptCheckpointError) as error:
            read(garbage)
        assert one_line(error) == f"{garbage}: {NOT_READABLE.format('state dict')}"
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.ones(2), "extra": Opaque()}, foreign)
    with pytest.raises(ckpt.CorruptCheckpointError) as error:
        ckpt.read_state_dict(foreign)
    assert one_line(error) == (
        f"{foreign}: holds Python objects other than tensors and plain containers, which are "
        "not loaded; save it again as a state dict of tensors"
    )


def test_a_corrupt_weights_file_of_an_old_checkpoint_is_one_line(run: Path) -> None:
    drop_hashes(run / "step_2")
    (run / "step_2" / ckpt.MODEL_FILE).write_bytes(os.urandom(4096))
    with pytest.raises(ckpt.CorruptCheckpointError) as error:
        ckpt.load_checkpoint_files(run / "step_2", rank=0)
    assert one_line(error) == (
        f"{run / 'step_2'}: corrupt checkpoint (model.pt: not a complete zip archive "
        "(truncated?)); use another step_N folder"
    )


def test_evaluate_errors_are_one_line(run: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "x.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ckpt.CorruptCheckpointError) as error:
        run_evaluate(EvaluateConfig(checkpoint=str(garbage)), DistInfo())
    assert one_line(error) == f"{garbage}: {NOT_READABLE.format('state dict')}"
    folder = run / "step_2"
    model_size = (folder / ckpt.MODEL_FILE).stat().st_size
    (folder / ckpt.MODEL_FILE).write_bytes(b"garbage")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "evaluate.py")]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    expected = {  # command-line arguments → the one line on stderr
        (): "error: checkpoint: required; give checkpoint=PATH (a step_N folder or an upstream "
        "state-dict file)",
        (f"checkpoint={folder}",): f"error: {folder}: corrupt checkpoint (model.pt: size 7 != "
        f"{model_size}); use another step_N folder",
    }
    procs = {
        args: subprocess.Popen([*command, *args], cwd=tmp_path, env=env, **pipes)
        for args in expected
    }
    for args, proc in procs.items():
        _, stderr = proc.communicate(timeout=240)
        assert (proc.returncode, stderr.strip().splitlines()) == (2, [expected[args]]), args


# ----------------------------------------------------------------------------------------------
# Another build of the data
# ----------------------------------------------------------------------------------------------
def test_resume_refuses_another_build_of_the_data(
    arc_data: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run / "step_2"
    meta = ckpt.read_meta(folder)
    moved = copy_data(arc_data, tmp_path / "moved")
    check_training_data(meta, settings(moved, run), folder, True)  # same build, another folder
    other = copy_data(arc_data, tmp_path / "other", swap_identifiers=True)
    new, old = sha256(other / "identifiers.json"), sha256(arc_data / "identifiers.json")
    problem = (
        f"{other}: puzzle identifiers differ from the build the checkpoint step_2 was trained "
        f"on (identifiers.json sha256 {new[:12]}, the checkpoint's sha256 {old[:12]})"
    )
    with pytest.raises(DataMismatchError) as error:
        resume(settings(other, run, "max_steps=3", "resume=auto"))
    assert one_line(error) == f"{problem}; pass allow_data_mismatch=True to use it anyway"
    assert ckpt.list_checkpoints(run) == [run / "step_1", folder]  # nothing written

    reseeded = copy_data(arc_data, tmp_path / "reseeded")  # same identifiers, other examples
    inputs = np.load(reseeded / "train" / "all__inputs.npy")
    inputs[[0, -1]] = inputs[[-1, 0]]
    np.save(reseeded / "train" / "all__inputs.npy", inputs)
    with pytest.raises(DataMismatchError, match=r"reseeded: train examples differ from the "):
        check_training_data(meta, settings(reseeded, run), folder, True)

    capsys.readouterr()
    state = resume(settings(other, run, "max_steps=3", "resume=auto", "allow_data_mismatch=True"))
    assert state.step == 2
    out = capsys.readouterr().out.splitlines()
    assert f"warning: {problem}; used anyway (allow_data_mismatch=True)" in out


def test_evaluate_refuses_another_build_of_the_data(
    arc_data: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run / "step_2"
    out = tmp_path / "eval"
    other = copy_data(arc_data, tmp_path / "other", swap_identifiers=True)
    ecfg = EvaluateConfig(checkpoint=str(folder), data_paths=[str(other)], output_dir=str(out))
    with pytest.raises(DataMismatchError) as error:
        run_evaluate(ecfg, DistInfo())
    assert one_line(error).startswith(
        f"{other}: puzzle identifiers differ from the build the checkpoint step_2 was trained on"
    )
    capsys.readouterr()
    allowed = ecfg.model_copy(update={"allow_data_mismatch": True})
    metrics = run_evaluate(allowed, DistInfo())  # with the EMA weights of the checkpoint
    assert "all/exact_accuracy" in metrics
    assert capsys.readouterr().out.startswith(f"warning: {other}: puzzle identifiers differ")


def test_fine_tuning_refuses_a_same_size_table_on_other_identifiers(
    arc_data: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run / "step_2"
    other = copy_data(arc_data, tmp_path / "other", swap_identifiers=True)
    with pytest.raises(DataMismatchError, match=r"other: puzzle identifiers differ from the b"):
        weights_for_loading(folder, settings(other, tmp_path / "ft"))
    weights_for_loading(folder, settings(other, tmp_path / "ft", "allow_data_mismatch=True"))
    assert capsys.readouterr().out.startswith(f"warning: {other}: puzzle identifiers differ")

    bigger = copy_data(arc_data, tmp_path / "bigger", swap_identifiers=True)
    rows = json.loads((arc_data / "train" / "dataset.json").read_text())["num_puzzle_identifiers"]
    for split in ("train", "test"):
        path = bigger / split / "dataset.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_puzzle_identifiers": 99}))
    weights = weights_for_loading(folder, settings(bigger, tmp_path / "ft"))
    assert weights[ckpt.PUZZLE_EMB_KEY].shape[0] == rows
    assert capsys.readouterr().out == (
        f"load_checkpoint={folder}: trained on {rows} puzzle identifiers, this data has 99; the "
        "puzzle-embedding table starts from its mean embedding\n"
    )


def test_a_table_size_mismatch_names_the_dataset(arc_data: Path, run: Path) -> None:
    state, _ = state_at_step(settings(arc_data, run), 0)
    weights = torch.load(run / "step_2" / ckpt.MODEL_FILE, weights_only=True)
    rows = weights[ckpt.PUZZLE_EMB_KEY].shape[0]
    weights[ckpt.PUZZLE_EMB_KEY] = weights[ckpt.PUZZLE_EMB_KEY][:-1]
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        ckpt.load_model_weights(state.raw_model, weights, resize_puzzle_emb=False, source="x")
    assert one_line(error).endswith(
        f"the checkpoint was trained on another dataset ({rows - 1} puzzle identifiers, this "
        f"data has {rows}): use the dataset it was trained on, or fine-tune with "
        "load_checkpoint=..., which resizes the table"
    )


# ----------------------------------------------------------------------------------------------
# Changed settings
# ----------------------------------------------------------------------------------------------
def test_resume_refuses_changed_architecture_and_logs_safe_changes(
    arc_data: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = settings(arc_data, run, "max_steps=3", "resume=auto", "arch.H_cycles=3", "seed=1")
    with pytest.raises(ChangedSettingsError) as error:
        resume(changed)
    assert one_line(error) == (
        f"{run / 'step_2'}: resuming with settings that change the model, its optimizers, the "
        "objective or the data order: arch.H_cycles 2 → 3, seed 0 → 1; change them back, or "
        f"start a new run from its weights with +load_checkpoint={run / 'step_2'} and another "
        "+checkpoint_path"
    )
    old_lr = ckpt.read_meta(run / "step_2")["config"]["lr"]
    capsys.readouterr()
    resume(settings(arc_data, run, "max_steps=3", "resume=auto", f"lr={old_lr * 3}"))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("resume: checkpoint_path ")  # the run folder was copied
    assert line.endswith(f", lr {old_lr} → {old_lr * 3}, max_steps 2 → 3")


def test_resume_safe_keys_are_config_fields_and_exclude_what_changes_the_run() -> None:
    assert set(RESUME_SAFE_KEYS) <= set(PretrainConfig.model_fields)
    for key in ("arch", "seed", "global_batch_size", "eval_interval", "ema", "freeze_weights",
                "sampler", "step_strategy", "objective", "aggregator"):  # fmt: skip
        assert key not in RESUME_SAFE_KEYS, key


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def test_no_checkpoint_is_written_with_non_finite_weights(arc_data: Path, run: Path) -> None:
    state, data = state_at_step(settings(arc_data, run, "max_steps=5"), 5)
    config = settings(arc_data, run, "max_steps=5")
    name, param = next(iter(state.raw_model.named_parameters()))
    saved = param.detach().clone()
    with torch.no_grad():
        param[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError) as error:
        save_train_state(config, state, DistInfo(), data)
    assert one_line(error) == (
        f"step 5: 1 tensors of the model weights are not finite (e.g. {name}), so step_5 is not "
        f"written; last good checkpoint: {run / 'step_2'}"
    )
    with torch.no_grad():
        param.copy_(saved)
    assert state.ema is not None
    state.ema.shadow[name] = torch.full_like(saved, float("inf"))
    truncate(run / "step_2" / ckpt.MODEL_FILE)
    with pytest.raises(NonFiniteWeightsError, match=r"of the EMA shadow .* checkpoint: .*step_1$"):
        save_train_state(config, state, DistInfo(), data)
    assert sorted(p.name for p in run.iterdir() if "step" in p.name) == ["step_1", "step_2"]


def _failing_save(kind: str, real_save: object) -> object:
    def save(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if kind == "disk full" and str(path).endswith(ckpt.MODEL_FILE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind == "no permission" and str(path).endswith(ckpt.RANK_FILE.format(rank=0)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        if kind == "real full device" and str(path).endswith(ckpt.TRAIN_FILE):
            path = "/dev/full"
        real_save(obj, path, *args, **kwargs)  # type: ignore[operator]

    return save


@pytest.mark.parametrize("kind", ["disk full", "no permission", "real full device"])
def test_a_failed_write_leaves_nothing_behind_and_keeps_the_last_checkpoint(
    kind: str, arc_data: Path, run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "real full device" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    config = settings(arc_data, run, "max_steps=5")
    state, data = state_at_step(config, 5)
    before = {p: p.read_bytes() for p in sorted(run.glob("step_*/*"))}
    monkeypatch.setattr(torch, "save", _failing_save(kind, torch.save))
    with pytest.raises(ckpt.CheckpointWriteError) as error:
        save_train_state(config, state, DistInfo(), data)
    tmp = run / ".step_5.tmp"
    reason = {
        "disk full": f"{tmp / ckpt.MODEL_FILE}: No space left on device, ",
        "real full device": f"{tmp / ckpt.TRAIN_FILE}: write failed (disk full? ",
        "no permission": f"{tmp / 'rank_0.pt'}: Permission denied)",
    }[kind]
    assert one_line(error).startswith(f"checkpoint {run / 'step_5'} not written ({reason}")
    assert str(error.value).endswith(
        f"the newest checkpoint {run / 'step_2'} is kept; free disk space or fix the "
        f"permissions of {run}, then resume=auto"
    )
    assert not tmp.exists() and not (run / "step_5").exists()
    assert {p: p.read_bytes() for p in sorted(run.glob("step_*/*"))} == before
    assert resolve_resume(settings(arc_data, run, "resume=auto")) == run / "step_2"


def test_too_little_free_space_is_refused_before_writing(
    arc_data: Path, run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(arc_data, run, "max_steps=5")
    state, data = state_at_step(config, 5)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1024))
    with pytest.raises(ckpt.CheckpointWriteError) as error:
        save_train_state(config, state, DistInfo(), data)
    assert re.match(
        rf"checkpoint {re.escape(str(run / 'step_5'))} not written \({re.escape(str(run))}/"
        r"\.step_5\.tmp: No space left on device: the checkpoint needs \d+\.\d MiB, 0\.0 MiB "
        r"free\); the newest checkpoint .*step_2 is kept",
        one_line(error),
    )
    assert not (run / ".step_5.tmp").exists() and not (run / "step_5").exists()


def test_a_failed_meta_write_leaves_nothing_behind(
    arc_data: Path, run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(arc_data, run, "max_steps=5")
    state, data = state_at_step(config, 5)
    real = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == ckpt.META_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"\.step_5\.tmp: No space left"):
        save_train_state(config, state, DistInfo(), data)
    assert not (run / ".step_5.tmp").exists() and not (run / "step_5").exists()


def test_keep_last_deletes_only_older_checkpoints_this_project_wrote(
    arc_data: Path, run: Path
) -> None:
    foreign = run / "step_0"
    foreign.mkdir()
    (foreign / ckpt.META_FILE).write_text('{"note": "another tool"}')
    (run / "step_x").mkdir()
    newer = Path(shutil.copytree(run / "step_2", run / "step_9"))  # e.g. a corrupt later step
    meta = json.loads((newer / ckpt.META_FILE).read_text())
    (newer / ckpt.META_FILE).write_text(json.dumps({**meta, "step": 9}))
    config = settings(arc_data, run, "max_steps=5", "keep_last=1")
    state, data = state_at_step(config, 5)
    save_train_state(config, state, DistInfo(), data)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == [
        "step_0", "step_5", "step_9", "step_x",
    ]  # fmt: skip


def test_latest_good_checkpoint_is_exported_for_error_messages(run: Path) -> None:
    assert ckpt.latest_good_checkpoint(run) == run / "step_2"
    flip_a_byte(run / "step_2" / "rank_0.pt")
    assert ckpt.latest_good_checkpoint(run) == run / "step_1"
    assert ckpt.latest_good_checkpoint(run / "nothing") is None
