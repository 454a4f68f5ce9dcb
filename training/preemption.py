"""Stopping cleanly on SIGTERM or SIGINT: finish the step, write a checkpoint, exit non-zero.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some seconds before they kill a
job; Ctrl-C sends SIGINT. ``StopSignals`` records the first one and lets the training loop
finish its current step; the loop shares the request with the other ranks in the step's
all-reduce, so every rank stops after the same step, writes its part of one checkpoint and
raises ``InterruptedRunError``. A second signal ends the process at once (the default action).

Under ``torchrun`` a signal to the launcher reaches every worker, which then have the
launcher's grace period (30 s in torch elastic) before it kills them; a signal to one worker
alone reaches the others through the all-reduce.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType, TracebackType

from utils.schema import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class InterruptedRunError(UserError):
    """The run stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + the
    signal number, as for a process the signal ended."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """While entered (in the main thread), SIGTERM and SIGINT set ``received`` instead of
    ending the process; a second one ends it at once. Forked children (DataLoader workers)
    ignore them: the main process shuts them down, and a worker that died first would make
    the main process fail in the middle of its checkpoint."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(
            f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
