"""Launching one trial: its ``pretrain.py`` command, its process group, its ``metrics.jsonl``.

A trial is ``pretrain.py`` (under ``torchrun`` when it has several processes) in a process group
of its own, so that stopping it stops every rank. While it runs, the metric it is scored by is
read from ``<run dir>/metrics.jsonl`` as the lines arrive; a callback sees each evaluation and
may stop the trial (pruning). Nothing here knows about Optuna or W&B.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sweeps.space import override_key

REPO_ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = REPO_ROOT / "pretrain.py"
POLL_S = 0.25

Status = Literal["complete", "stopped", "failed"]


def uses_torchrun(launcher: str, nproc_per_node: int) -> bool:
    """Whether a trial runs under torchrun: ``auto`` chooses it for more than one process."""
    return launcher == "torchrun" or (launcher == "auto" and nproc_per_node > 1)


def launch_prefix(launcher: str, nproc_per_node: int, python: str = sys.executable) -> list[str]:
    """The command up to ``pretrain.py``'s path: ``python`` alone, or torchrun (run as
    ``python -m torch.distributed.run``, so no ``torchrun`` on the PATH is needed) with
    ``--standalone``, which finds a free port and lets trials share a machine."""
    if not uses_torchrun(launcher, nproc_per_node):
        if nproc_per_node > 1:
            raise ValueError(f"launcher=python runs one process, not {nproc_per_node}")
        return [python]
    return [python, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc_per_node)]  # fmt: skip


def trial_overrides(base: list[str], sampled: list[str], run_name: str, run_dir: Path) -> list[str]:
    """Every override of a trial: the base ones, the sampled ones, then its name and folder
    (``logger=none`` first unless the base chooses a logger: the sweep reads metrics.jsonl)."""
    chooses_logger = any(override_key(o) == "logger" for o in base)
    return [
        *([] if chooses_logger else ["logger=none"]),
        *base,
        *sampled,
        f"+run_name={run_name}",
        f"+checkpoint_path={run_dir}",
    ]


def trial_command(
    launcher: str, nproc_per_node: int, overrides: list[str], python: str = sys.executable
) -> list[str]:
    """The whole argv of a trial."""
    return [*launch_prefix(launcher, nproc_per_node, python), str(PRETRAIN), *overrides]


class MetricFollower:
    """Reads the new complete lines of a ``metrics.jsonl`` that another process appends to, and
    returns ``(step, value)`` for each line holding ``metric``. A missing file reads as empty;
    non-finite values (written as ``"NaN"``/``"Infinity"``) come back as floats."""

    def __init__(self, path: Path, metric: str) -> None:
        self.path = path
        self.metric = metric
        self._offset = 0

    def read(self) -> list[tuple[int, float]]:
        """The evaluations logged since the last call, in file order."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line being written is read at the next call
        self._offset += end
        found = []
        for line in chunk[:end].splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if self.metric in record:
                found.append((int(record["step"]), float(record[self.metric])))
        return found


@dataclass
class TrialResult:
    """How a trial ended: ``complete`` (exit 0 with at least one evaluation), ``stopped`` (by the
    callback), or ``failed`` (launch error, non-zero exit, timeout, no evaluation: ``reason``).
    ``values`` are the ``(step, value)`` evaluations in order; ``value`` the last one."""

    status: Status
    values: list[tuple[int, float]] = field(default_factory=list)
    returncode: int | None = None
    reason: str = ""

    @property
    def value(self) -> float | None:
        """The last evaluation's value (the trial's score), or None without one."""
        return self.values[-1][1] if self.values else None


def stop_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group (``pretrain.py`` checkpoints and exits), SIGKILL after
    ``grace_s``; returns once the leader has exited."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):  # the group has already exited
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_trial(
    command: list[str],
    run_dir: Path,
    log_path: Path,
    metric: str,
    on_eval: Callable[[int, float], bool],
    *,
    timeout_s: float | None = None,
    kill_grace_s: float = 30.0,
) -> TrialResult:
    """Run ``command`` with stdout and stderr in ``log_path``, following
    ``run_dir/metrics.jsonl``: ``on_eval(step, value)`` is called for every evaluation of
    ``metric`` in order, also those read after the process exited, and returning True stops
    the trial's process group. The caller's interrupt (KeyboardInterrupt) stops it too."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    follower = MetricFollower(run_dir / "metrics.jsonl", metric)
    values: list[tuple[int, float]] = []
    start = time.monotonic()
    with log_path.open("wb") as log:
        try:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            return TrialResult("failed", reason=f"could not start {command[0]}: {e}")
        try:
            while True:
                returncode = process.poll()
                for step, value in follower.read():
                    values.append((step, value))
                    if on_eval(step, value):
                        stop_group(process, kill_grace_s)
                        return TrialResult("stopped", values, process.returncode)
                if returncode is not None:
                    break
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    stop_group(process, kill_grace_s)
                    reason = f"timed out after {timeout_s:g} s; log {log_path}"
                    return TrialResult("failed", values, process.returncode, reason)
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:
                stop_group(process, kill_grace_s)
    if returncode != 0:
        return TrialResult("failed", values, returncode, f"exit code {returncode}; log {log_path}")
    if not values:
        reason = f"no '{metric}' evaluation in {run_dir / 'metrics.jsonl'}; log {log_path}"
        return TrialResult("failed", values, returncode, reason)
    if not math.isfinite(values[-1][1]):
        return TrialResult("failed", values, returncode, f"final {metric} is not finite")
    return TrialResult("complete", values, returncode)
