"""Process groups and cross-rank helpers; every helper is a no-op in a single process.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), ``init_distributed``
creates the default group (NCCL on CUDA, gloo otherwise) through torchrun's rendezvous, so
several nodes work the same as one, plus a gloo group for Python-object collectives (the
evaluators' gathers, the config broadcast), which NCCL cannot carry. Launched as plain
``python``, nothing is initialised and the helpers act on the single process.

Every collective here is bounded in time. ``configure_timeouts(normal_s, slow_s)`` sets the two
limits and ``collective_phase(label, slow=...)`` says which applies and names the place for
the message; a collective that waits longer (a process frozen, killed or stuck in other work)
raises ``CollectiveTimeoutError`` with one line naming the collective, the phase and the rank.
Tensor collectives are issued with ``async_op=True`` and waited for with that timeout, which
on NCCL blocks this CPU thread until the GPU operation is done (a training step reads its
metrics on the host anyway). Each group's own timeout is set too, as the backstop: it bounds
gloo's object collectives exactly, and NCCL's watchdog, set a margin later so that the wait
reports first, aborts the process (its own log, SIGABRT) should anything else hang. After a
failed collective the group cannot be torn down (``destroy_process_group`` may wait for the
peer forever), so ``cleanup`` skips it and the entry point ends the process with ``exit_now``.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from utils.schema import ConfigError, UserError

T = TypeVar("T")

# Used until configure_timeouts is called (evaluation, tests): torch's own default for gloo.
DEFAULT_TIMEOUT_S = 1800.0
# NCCL's watchdog kills the process with its own multi-line log when an operation passes the
# group's timeout; it is set this much later than the wait so that the one-line error comes
# first.
NCCL_WATCHDOG_MARGIN_S = 60.0


class CollectiveError(UserError):
    """A collective failed because another process is stuck or gone; the message is one line
    naming the collective, the phase (``collective_phase``) and this rank."""


class CollectiveTimeoutError(CollectiveError):
    """A collective waited longer than its timeout for the other processes."""


class MainRankError(UserError):
    """Rank 0's user error, raised on the other ranks by ``decide_on_main`` (rank 0 reports
    it; the entry points keep the others silent)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, its device and the CPU (gloo) group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpu_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class _Phase:
    label: str = ""
    slow: bool = False


@dataclass
class _Settings:
    normal_s: float = DEFAULT_TIMEOUT_S
    slow_s: float = DEFAULT_TIMEOUT_S
    object_group: Any = None  # gloo group for Python objects when the default group is NCCL
    applied: dict[int, float] = field(default_factory=dict)  # id(group) -> seconds set on it
    failed: bool = False


_SETTINGS = _Settings()
_NO_PHASE = _Phase()
_PHASE: contextvars.ContextVar[_Phase] = contextvars.ContextVar("phase", default=_NO_PHASE)


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA (this process's local GPU) → MPS → CPU; or an explicit device string."""
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and device.index is None:
            device = torch.device(device.type, local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank as the launcher set it (0 without torchrun), before any group."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def env_world_size() -> int:
    """The number of processes as the launcher set it (1 without torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def init_distributed(device_preference: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed if launched by torchrun; return this process's place.

    ``timeout_s`` is the groups' initial timeout (torch's default when None); the helpers
    below replace it per phase once ``configure_timeouts`` has run.
    """
    if not launched_by_torchrun():
        return DistInfo(device=select_device(device_preference))
    local_rank = int(os.environ["LOCAL_RANK"])
    if int(os.environ["WORLD_SIZE"]) > 1 and ":" in device_preference:
        raise ConfigError(
            f"device={device_preference} names one device for every process; use device=auto "
            "or device=cuda under torchrun (each process takes its LOCAL_RANK's GPU)"
        )
    device = select_device(device_preference, local_rank)
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timeout)
    cpu_group = None
    if dist.get_backend() != "gloo":
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    _SETTINGS.object_group = cpu_group
    _SETTINGS.applied.clear()
    _SETTINGS.failed = False
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        cpu_group=cpu_group,
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------------------------
# Timeouts
# ----------------------------------------------------------------------------------------------
def configure_timeouts(normal_s: float, slow_s: float) -> None:
    """How long a collective may wait for the other processes: ``normal_s`` in general,
    ``slow_s`` inside ``collective_phase(..., slow=True)`` (a first step that compiles, an
    evaluation, a checkpoint write). Takes effect at the next collective."""
    if not (normal_s > 0 and slow_s > 0):
        raise ConfigError(f"collective timeouts must be positive (got {normal_s}, {slow_s})")
    _SETTINGS.normal_s, _SETTINGS.slow_s = float(normal_s), float(slow_s)


@contextmanager
def collective_phase(label: str, *, slow: bool = False) -> Iterator[None]:
    """Collectives inside use the slow timeout if ``slow``, else the normal one, and a
    timeout names ``label`` (e.g. ``"step 17"``, ``"evaluation at step 40"``); phases nest, the
    innermost one counts."""
    token = _PHASE.set(_Phase(label, slow))
    try:
        yield
    finally:
        _PHASE.reset(token)


def collective_timeout_s() -> float:
    """The timeout, in seconds, of a collective issued now (by the current phase)."""
    return _SETTINGS.slow_s if _PHASE.get().slow else _SETTINGS.normal_s


def _apply_group_timeout(group: Any, seconds: float) -> None:
    """Set ``group``'s own timeout (NCCL: a margin later, see the module docstring)."""
    pg = group if group is not None else dist.group.WORLD
    if dist.get_backend(pg) == "nccl":
        seconds += NCCL_WATCHDOG_MARGIN_S
    # A private torch function (2.3+); without it the waits still bound tensor collectives.
    set_pg_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_pg_timeout is not None and _SETTINGS.applied.get(id(pg)) != seconds:
        set_pg_timeout(timedelta(seconds=seconds), pg)
        _SETTINGS.applied[id(pg)] = seconds


def _wait(work: Any, seconds: float) -> None:
    if work is not None and work.wait(timedelta(seconds=seconds)) is False:
        raise RuntimeError("the operation timed out")


# Words in the errors gloo and NCCL raise when the other end of a connection went away.
_PEER_LOST = ("peer", "connection", "remote", "socket", "broken pipe")


def _failure(
    op: str, seconds: float, elapsed: float, error: RuntimeError
) -> CollectiveError | None:
    """The one-line error for a collective that timed out or lost a peer; None for anything
    else (a bug, which keeps its traceback)."""
    label = _PHASE.get().label
    where = f"{f' at {label}' if label else ''} on rank {dist.get_rank()}"
    text = str(error).strip()
    if elapsed >= 0.9 * seconds or "timed out" in text.lower():
        return CollectiveTimeoutError(
            f"{op} timed out after {seconds:g} s{where}; another process is stuck or gone"
        )
    if not any(word in text.lower() for word in _PEER_LOST):
        return None
    # gloo: "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:7577. This is typically ..."
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0][:200]
    return CollectiveError(f"{op} failed{where}: another process is gone ({detail})")


def _collective(op: str, group: Any, run: Callable[[float], T]) -> T:
    """``run(timeout_s)`` with the phase's timeout set on ``group``; a failure → one line."""
    seconds = collective_timeout_s()
    _apply_group_timeout(group, seconds)
    started = time.monotonic()
    try:
        return run(seconds)
    except RuntimeError as e:  # what gloo and NCCL raise (DistBackendError included)
        failure = _failure(op, seconds, time.monotonic() - started, e)
        if failure is None:
            raise
        _SETTINGS.failed = True
        raise failure from None


# ----------------------------------------------------------------------------------------------
# Collectives (no gradient flows through any of them)
# ----------------------------------------------------------------------------------------------
def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); returns ``tensor``."""
    if is_distributed():

        def run(seconds: float) -> None:
            with torch.no_grad():
                _wait(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True), seconds)

        _collective("all_reduce", None, run)
    return tensor


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` [B, ...] stacked in rank order along dim 0 into ``output``
    [world_size·B, ...] (in one process: a copy); returns ``output``."""
    if not is_distributed():
        return output.copy_(tensor)

    def run(seconds: float) -> None:
        with torch.no_grad():
            work = dist.all_gather_into_tensor(output, tensor.contiguous(), async_op=True)
        _wait(work, seconds)

    _collective("all_gather", None, run)
    return output


def decide_on_main(decide: Callable[[], T], is_main: bool) -> T:
    """``decide()`` run on rank 0 alone (one view of shared files), its result on every rank.

    A ``UserError`` or ``FileNotFoundError`` it raises is raised on every rank (as itself on
    rank 0, as ``MainRankError`` elsewhere) instead of leaving the others waiting for a
    broadcast that never comes.
    """
    if not is_distributed():
        return decide()
    result: Any = None
    error: Exception | None = None
    if is_main:
        try:
            result = decide()
        except (UserError, FileNotFoundError) as e:
            error = e
    result, message = broadcast_object((result, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise MainRankError(message)
    return result


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (through the gloo group under NCCL)."""
    if not is_distributed():
        return obj
    box = [obj]
    group = _SETTINGS.object_group
    _collective("broadcast_object", group, lambda _: dist.broadcast_object_list(box, src, group))
    return box[0]


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's tensors with rank ``src``'s, in place (parameters included:
    the copy is not part of any autograd graph)."""
    if not is_distributed():
        return

    def run(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with torch.no_grad():
            works = [dist.broadcast(t, src=src, async_op=True) for t in tensors]
        for work in works:
            _wait(work, max(deadline - time.monotonic(), 0.001))

    _collective("broadcast", None, run)


def gather_objects(obj: Any, dst: int = 0, group: Any = None) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (as a list in rank order), None elsewhere."""
    if not is_distributed():
        return [obj]
    world = dist.get_world_size(group) if group is not None else dist.get_world_size()
    out: list[Any] | None = [None] * world if dist.get_rank() == dst else None
    _collective("gather_object", group, lambda _: dist.gather_object(obj, out, dst, group))
    return out


def barrier(group: Any = None) -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        _collective("barrier", group, lambda s: _wait(dist.barrier(group, async_op=True), s))


# ----------------------------------------------------------------------------------------------
# Teardown
# ----------------------------------------------------------------------------------------------
def cleanup() -> None:
    """Destroy the process groups, unless a collective failed: then the peer may never answer
    the teardown, and the process should end with ``exit_now`` instead."""
    if dist.is_available() and dist.is_initialized() and not _SETTINGS.failed:
        dist.destroy_process_group()


def exit_now(code: int) -> NoReturn:
    """Flush stdout and stderr and end the process at once with ``code``, skipping interpreter
    teardown (the process groups' destructors can wait for a stuck peer)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
