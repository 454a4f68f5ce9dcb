"""Two gloo processes under torchrun: a frozen rank ends the run on the others within the
collective timeout, with one line; start-up needs no c10d autograd warning; a configuration
error is one line from rank 0 only."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_training import FAST, REPO
from utils import distributed
from utils.distributed import collective_phase, collective_timeout_s, configure_timeouts
from utils.schema import ConfigError

pytestmark = pytest.mark.distributed

TIMEOUT_S = 4


def _torchrun(tmp_path: Path, *overrides: str) -> subprocess.Popen[str]:
    """``torchrun --standalone`` of pretrain.py with 2 processes, each rank's output in
    ``tmp_path/logs``, run from the empty ``tmp_path/cwd``."""
    (tmp_path / "cwd").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(tmp_path / "logs"), "--redirects", "3",
           str(REPO / "pretrain.py"), *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=tmp_path / "cwd", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _rank_stderr(tmp_path: Path, rank: int) -> str:
    (path,) = (tmp_path / "logs").rglob(f"attempt_0/{rank}/stderr.log")
    return path.read_text()


def _workers(launcher: int) -> dict[int, int]:
    """rank → pid of the launcher's worker processes."""
    workers = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            env = dict(
                item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if item
            )
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            workers[int(env["RANK"])] = int(proc.name)
    return workers


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_phases_choose_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "_SETTINGS", distributed._Settings())
    assert collective_timeout_s() == distributed.DEFAULT_TIMEOUT_S
    configure_timeouts(5, 50)
    assert collective_timeout_s() == 5
    with collective_phase("evaluation at step 4", slow=True):
        assert collective_timeout_s() == 50
        with collective_phase("step 5"):
            assert collective_timeout_s() == 5
        assert collective_timeout_s() == 50
    assert collective_timeout_s() == 5
    with pytest.raises(ConfigError, match="must be positive"):
        configure_timeouts(0, 50)


def test_a_frozen_rank_ends_the_run_with_one_line(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    launcher = _torchrun(
        tmp_path, *FAST, f"data_paths=[{data}]", "global_batch_size=4", "evaluators=[]",
        "epochs=1000", "eval_interval=1000", f"+checkpoint_path={run}",
        f"dist_timeout_s={TIMEOUT_S}", "dist_timeout_slow_s=60",
    )  # fmt: skip
    try:
        training = _wait_for(
            lambda: (
                (run / "metrics.jsonl").is_file()
                and "train/lm_loss" in (run / "metrics.jsonl").read_text()
            ),
            90,
        )
        assert training, launcher.communicate(timeout=30)
        workers = _workers(launcher.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        gone = _wait_for(lambda: not _running(workers[0]), TIMEOUT_S + 15)
        elapsed = time.monotonic() - stopped
        assert gone, f"rank 0 still waits {elapsed:.0f} s after rank 1 froze"
        assert elapsed >= TIMEOUT_S - 0.5
        os.kill(workers[1], signal.SIGKILL)
        _, launcher_err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    assert re.search(r"exitcode\W+3\W+local_rank\W+0", launcher_err), launcher_err[-2000:]
    rank0 = _rank_stderr(tmp_path, 0)
    (line,) = _error_lines(rank0)
    assert re.fullmatch(
        rf"error: (all_reduce|broadcast|barrier) timed out after {TIMEOUT_S} s( at [^;]+)? on "
        r"rank 0; another process is stuck or gone",
        line,
    ), line
    assert "Traceback" not in rank0
    # Broadcasting the parameters at start-up no longer warns on every rank.
    for text in (rank0, _rank_stderr(tmp_path, 1), launcher_err):
        assert "c10d::" not in text and "silently incorrect" not in text


@pytest.mark.parametrize("problem", ["batch_size", "unreadable_weights"])
def test_a_user_error_is_one_line_from_rank_0(data: Path, tmp_path: Path, problem: str) -> None:
    """A configuration error every rank finds, and a file only rank 0 reads
    (``load_checkpoint``): one line from rank 0, rank 1 silent, no wait for a timeout."""
    if problem == "batch_size":
        overrides = ["global_batch_size=3"]
        expected = (
            "error: global_batch_size (3) must be divisible by the number of processes (2); "
            "change global_batch_size or --nproc-per-node"
        )
    else:
        garbage = tmp_path / "weights.pt"
        garbage.write_bytes(b"not a checkpoint")
        overrides = [f"+load_checkpoint={garbage}", "evaluators=[]", "dist_timeout_slow_s=300"]
        expected = (
            f"error: {garbage}: not a readable state dict (truncated or not a torch.save file)"
        )
    started = time.monotonic()
    launcher = _torchrun(tmp_path, *FAST, f"data_paths=[{data}]", *overrides)
    try:
        _, launcher_err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert time.monotonic() - started < 100  # not the 300 s collective timeout
    assert launcher.returncode != 0
    assert re.search(r"exitcode\W+2\W+local_rank\W+0", launcher_err), launcher_err[-2000:]
    assert _rank_stderr(tmp_path, 0).splitlines() == [expected]
    assert _rank_stderr(tmp_path, 1) == ""
    assert list((tmp_path / "cwd").iterdir()) == []
