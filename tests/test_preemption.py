"""SIGTERM/SIGINT: the run finishes its step, writes a checkpoint, exits 128 + signal, and
``resume=auto`` continues bit-identically; under torchrun every rank stops at the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_training import FAST, REPO, metric_lines
from utils import checkpoint as ckpt

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*FAST, f"data_paths=[{data}]", "evaluators=[]", "epochs=8", "eval_interval=8",
            f"+checkpoint_path={run_dir}", *extra]  # fmt: skip


def _pretrain(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str]) -> int:
    """Block until metrics.jsonl has logged ``step``; the last step logged."""
    deadline = time.monotonic() + 240
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {path}")


def _train_lines(run_dir: Path) -> list[dict]:
    return [m for m in metric_lines(run_dir) if "train/lm_loss" in m]


def test_sigterm_checkpoints_and_resume_is_bit_identical(arc_data: Path, tmp_path: Path) -> None:
    straight = _pretrain(*_args(arc_data, tmp_path / "a"), cwd=tmp_path)
    # With a loader worker (data_workers=1), which must not die of the signal first.
    proc = _pretrain(*_args(arc_data, tmp_path / "b", "data_workers=1"), cwd=tmp_path)
    _wait_for_step(tmp_path / "b", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    stopped = ckpt.latest_checkpoint(tmp_path / "b")
    assert stopped is not None
    k = int(stopped.name.removeprefix("step_"))
    assert 3 <= k < 22  # 8 epochs of the tiny set are 22 steps
    assert last == (
        f"error: stopped by SIGTERM after step {k}; checkpoint {stopped}; continue with resume=auto"
    )
    assert [m["step"] for m in _train_lines(tmp_path / "b")] == list(range(1, k + 1))

    straight.communicate(timeout=300)
    assert straight.returncode == 0
    resumed = _pretrain(*_args(arc_data, tmp_path / "b", "data_workers=1", "resume=auto"),
                        cwd=tmp_path)  # fmt: skip
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from {stopped} at step {k}" in out
    assert _train_lines(tmp_path / "a") == _train_lines(tmp_path / "b")  # every metric, exactly
    wa = torch.load(tmp_path / "a/step_22/model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b/step_22/model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[key], wb[key]) for key in wa)


def test_a_second_signal_exits_at_once(arc_data: Path, tmp_path: Path) -> None:
    proc = _pretrain(*_args(arc_data, tmp_path / "r"), cwd=tmp_path)
    _wait_for_step(tmp_path / "r", 2, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # ended by the signal, no checkpoint written
    assert ckpt.latest_checkpoint(tmp_path / "r") is None


def _rank_pids(launcher: int) -> dict[int, int]:
    """RANK → pid of the workers torchrun started."""
    found = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
            env = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != launcher:
            continue
        for entry in env:
            if entry.startswith(b"RANK="):
                found[int(entry[5:])] = int(child.name)
    return found


@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(
    arc_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "two"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29541", str(REPO / "pretrain.py"), *_args(arc_data, run_dir)],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_step(run_dir, 2, launcher)
    pids = _rank_pids(launcher.pid)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    stopped = ckpt.latest_checkpoint(run_dir)
    assert stopped is not None
    k = int(stopped.name.removeprefix("step_"))
    assert (stopped / "rank_0.pt").is_file() and (stopped / "rank_1.pt").is_file()
    # Rank 0 (the one that reports) stops because rank 1 had the signal.
    assert f"stopped by a signal to another process after step {k}" in err
    assert [m["step"] for m in _train_lines(run_dir)] == list(range(1, k + 1))
