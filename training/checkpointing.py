"""Resumable checkpoints of a run: ``checkpoint_path/step_N`` written from and into a
``TrainState``, plus the weights-only reads of ``load_checkpoint`` and evaluation.

``utils.checkpoint`` writes the files atomically; this module decides what goes in them. Format
2 keys the optimizers by group name; format-1 checkpoints (optimizers as a list in build order,
counters at the top of ``train_state.pt``) are migrated when read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dataset.puzzle_dataset import PuzzleDataset
from training.config import PretrainConfig
from training.state import TrainState
from utils import checkpoint as ckpt
from utils.distributed import DistInfo, barrier

_PROGRESS = ("step", "iteration", "batches_in_iteration")


def save_train_state(
    config: PretrainConfig, state: TrainState, dist_info: DistInfo, data: PuzzleDataset
) -> Path:
    """Write ``checkpoint_path/step_N`` with everything needed to resume bit-exactly."""
    assert config.checkpoint_path is not None
    folder = ckpt.step_dir(config.checkpoint_path, state.step)
    shared = None
    if dist_info.is_main:
        components = state.state_dict()
        shared = {
            ckpt.MODEL_FILE: components["model"],
            ckpt.TRAIN_FILE: {
                "optimizers": components["optimizers"],
                "progress": components["progress"],
                "strategy": components["strategy"],
                "data": data.state_at(state.iteration, state.batches_in_iteration),
            },
        }
        if "ema" in components:
            shared[ckpt.EMA_FILE] = components["ema"]
    ckpt.save_checkpoint(
        folder,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        shared=shared,
        per_rank=state.rank_state_dict(dist_info.device),
        meta={"step": state.step, "config": config.model_dump(mode="json")},
        barrier=lambda: barrier(dist_info.cpu_group),
        keep_last=config.keep_last,
    )
    return folder


def migrate_train_file(
    train: dict[str, Any], format_version: int, optimizer_names: list[str]
) -> dict[str, Any]:
    """``train_state.pt`` in format 2. Format 1 listed the optimizers in the order the run
    built them, which is the family's group order (``puzzle_emb`` first, then ``weights``)."""
    if format_version >= 2:
        return train
    optimizers = train["optimizers"]
    if len(optimizers) != len(optimizer_names):
        raise ckpt.CheckpointMismatchError(
            f"{len(optimizers)} optimizers saved, the run has {len(optimizer_names)} "
            f"({optimizer_names}); freeze_weights or arch.puzzle_emb_ndim differ"
        )
    return {
        "optimizers": dict(zip(optimizer_names, optimizers, strict=True)),
        "progress": {key: train[key] for key in _PROGRESS},
        "strategy": {},
        "data": train["data"],
    }


def resolve_resume(config: PretrainConfig) -> Path | None:
    """The checkpoint ``resume`` points at; refuses to branch off an older one in place."""
    if config.resume == "auto":
        return ckpt.latest_checkpoint(config.checkpoint_path or "")
    folder = Path(str(config.resume))
    if not ckpt.is_complete(folder):
        raise FileNotFoundError(f"resume={folder}: not a complete checkpoint (no meta.json)")
    if config.checkpoint_path and folder.parent.resolve() == Path(config.checkpoint_path).resolve():
        newer = [
            p.name for p in ckpt.list_checkpoints(folder.parent) if _step_of(p) > _step_of(folder)
        ]
        if newer:
            raise ckpt.CheckpointMismatchError(
                f"resume={folder}: {folder.parent} also holds newer checkpoints {newer}, which "
                "keep_last and resume=auto would mix with this branch; move them away or give "
                "a new +checkpoint_path"
            )
    return folder


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def resume_train_state(
    folder: Path,
    state: TrainState,
    dist_info: DistInfo,
    data: PuzzleDataset,
    config: PretrainConfig,
) -> None:
    """Load a checkpoint written by ``save_train_state`` into ``state`` and the dataset."""
    shared, per_rank = ckpt.load_checkpoint_files(folder, dist_info.rank)
    meta = shared["meta"]
    try:
        train = migrate_train_file(
            shared[ckpt.TRAIN_FILE], meta["format_version"], list(state.optimizers)
        )
    except ckpt.CheckpointMismatchError as e:
        raise ckpt.CheckpointMismatchError(f"{folder}: {e}") from None
    components = {
        "model": shared[ckpt.MODEL_FILE],
        "optimizers": train["optimizers"],
        "progress": train["progress"],
        "strategy": train["strategy"],
    }
    if ckpt.EMA_FILE in shared:
        components["ema"] = shared[ckpt.EMA_FILE]
    state.load_state_dict(components, config, source=str(folder))
    data.load_state_dict(train["data"])
    if per_rank is not None and meta.get("world_size") == dist_info.world_size:
        state.load_rank_state_dict(per_rank, dist_info.device)
    elif dist_info.is_main:
        print(
            f"note: {folder} was written by {meta.get('world_size')} processes; "
            "the ACT carry and RNG states restart"
        )


def weights_for_loading(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from our checkpoint folder (EMA weights if it has them) or an upstream file."""
    if path.is_dir():
        shared, _ = ckpt.load_checkpoint_files(path, rank=0)
        return evaluation_weights(shared, use_ema=True)
    return ckpt.read_state_dict(path)


def evaluation_weights(shared: dict[str, Any], use_ema: bool) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint, with the EMA shadow substituted when asked and present."""
    state = dict(shared[ckpt.MODEL_FILE])
    if use_ema and ckpt.EMA_FILE in shared:
        for name, value in shared[ckpt.EMA_FILE]["shadow"].items():
            state[name] = value
    return state
