"""Process groups and cross-rank helpers; every helper is a no-op in a single process.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), ``init_distributed``
creates the default group (NCCL on CUDA, gloo otherwise) through torchrun's rendezvous, so
several nodes work the same as one, plus a gloo group for Python-object collectives (the
evaluators' gathers), which NCCL cannot carry. Launched as plain ``python``, nothing is
initialised and the helpers act on the single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from utils.schema import ConfigError


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


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Initialise torch.distributed if launched by torchrun; return this process's place."""
    if not launched_by_torchrun():
        return DistInfo(device=select_device(device_preference))
    local_rank = int(os.environ["LOCAL_RANK"])
    if int(os.environ["WORLD_SIZE"]) > 1 and ":" in device_preference:
        raise ConfigError(
            f"device={device_preference} names one device for every process; use device=auto "
            "or device=cuda under torchrun (each process takes its LOCAL_RANK's GPU)"
        )
    device = select_device(device_preference, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        cpu_group=cpu_group,
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's tensors with rank ``src``'s, in place."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)


def gather_objects(obj: Any, dst: int = 0, group: Any = None) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (as a list in rank order), None elsewhere."""
    if not is_distributed():
        return [obj]
    world = dist.get_world_size(group) if group is not None else dist.get_world_size()
    rank = dist.get_rank()
    out: list[Any] | None = [None] * world if rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def barrier(group: Any = None) -> None:
    if is_distributed():
        dist.barrier(group=group)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
