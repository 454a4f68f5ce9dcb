"""Loading model weights: ours or upstream's ``step_N`` state-dict files.

Upstream saved ``torch.save(model.state_dict())`` of the loss head, usually through
``torch.compile`` (keys ``_orig_mod.model.inner...``). Loading strips the compile (and DDP
``module.``) prefixes, matches keys strictly, and can resize the puzzle-embedding table to the
mean embedding as upstream does when fine-tuning on a dataset with other puzzles.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.atomic import swap_folder_into_place
from utils.schema import UserError

PUZZLE_EMB_KEY = "model.inner.puzzle_emb.weights"
_PREFIXES = ("_orig_mod.", "module.")


class CheckpointMismatchError(UserError, ValueError):
    """The weights do not fit the model; the message says which keys or shapes differ."""


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading ``_orig_mod.`` / ``module.`` (torch.compile, DDP) from every key."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a state-dict file, prefixes stripped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure gets the same one-line report
        raise CheckpointMismatchError(f"{path}: not a readable state dict ({e})") from None
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(state).__name__}")
    return strip_prefixes(state)


def _adapt_to_model(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """A TRM checkpoint into ``arch=trmjd`` (the fork's fine-tuning): drop the Q head the no-ACT
    model lacks, keep the model's own ``output_logits_init``."""
    adapted = dict(state)
    dropped = [k for k in state if ".q_head." in k and k not in expected]
    if dropped and not any(".q_head." in k for k in expected):
        for k in dropped:
            del adapted[k]
    for key, value in expected.items():
        if key.endswith("output_logits_init") and key not in adapted:
            adapted[key] = value
    if adapted.keys() != state.keys():
        print(f"{source}: adapted to the model (dropped {len(dropped)} Q-head keys, kept the "
              "model's output_logits_init)")  # fmt: skip
    return adapted


def load_model_weights(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    resize_puzzle_emb: bool = True,
    source: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module`` (the loss head) with strict key and shape matching.

    If the puzzle-embedding table differs in shape and ``resize_puzzle_emb`` is set, it is
    replaced by the mean embedding broadcast to the model's shape (upstream's rule for new
    puzzles); any other mismatch raises ``CheckpointMismatchError`` naming the keys.
    """
    state = strip_prefixes(state_dict)
    expected = module.state_dict()
    state = _adapt_to_model(state, expected, source)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source}: keys do not match the model ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); "
            "check arch=... and its options against the run that wrote it"
        )
    state = dict(state)
    for key, target in expected.items():
        value = state[key]
        if value.shape == target.shape:
            continue
        if key == PUZZLE_EMB_KEY and resize_puzzle_emb and value.shape[1:] == target.shape[1:]:
            state[key] = value.mean(dim=0, keepdim=True).expand_as(target).contiguous()
            continue
        hint = (
            "the vocabulary comes from data_paths: use the dataset the checkpoint was trained on"
            if "embed_tokens" in key or "lm_head" in key
            else "check the architecture options (hidden_size, num_heads, ...)"
        )
        raise CheckpointMismatchError(
            f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
            f"{tuple(target.shape)}; {hint}"
        )
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Complete, atomic training checkpoints
# ----------------------------------------------------------------------------------------------
# 2: optimizers keyed by group name and progress counters under "progress" in TRAIN_FILE.
# 1: optimizers as a list in build order; readable, migrated by ``training.checkpointing``.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
META_FILE = "meta.json"
MODEL_FILE = "model.pt"  # the loss head's state dict: model.inner.... (upstream's keys)
EMA_FILE = "ema.pt"  # the EMA shadow of the trainable parameters, when ema=True
TRAIN_FILE = "train_state.pt"  # optimizers by name, progress, strategy state, data position
RANK_FILE = "rank_{rank}.pt"  # per-process carry and RNG states


def step_dir(checkpoint_path: str | os.PathLike[str], step: int) -> Path:
    return Path(checkpoint_path) / f"step_{step}"


def is_complete(folder: Path) -> bool:
    """A checkpoint folder counts only once its meta.json (written last) exists."""
    return (folder / META_FILE).is_file()


def list_checkpoints(checkpoint_path: str | os.PathLike[str]) -> list[Path]:
    """Complete ``step_N`` folders, oldest first."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and is_complete(p):
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_path: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(checkpoint_path)
    return found[-1] if found else None


def save_checkpoint(
    folder: Path,
    *,
    rank: int,
    world_size: int,
    shared: dict[str, Any] | None,
    per_rank: dict[str, Any],
    meta: dict[str, Any],
    barrier: Any,
    keep_last: int | None = None,
) -> None:
    """Write one checkpoint atomically: a temporary folder renamed to ``folder`` at the end.

    Rank 0 writes ``shared`` (file name → object; model and optimizer state are identical on
    every rank), each rank its ``per_rank`` object, and rank 0 writes ``meta.json`` last, then
    renames. A run killed while writing leaves only the temporary folder, which loading ignores
    and the next save removes. ``barrier()`` synchronises the ranks (a no-op in one process).
    """
    tmp = folder.with_name(f".{folder.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if rank == 0:
        for name, obj in (shared or {}).items():
            torch.save(obj, tmp / name)
    torch.save(per_rank, tmp / RANK_FILE.format(rank=rank))
    barrier()
    if rank == 0:
        meta = {**meta, "format_version": FORMAT_VERSION, "world_size": world_size}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        # Saving the same step again keeps one complete checkpoint of it at every moment.
        swap_folder_into_place(tmp, folder)
        if keep_last is not None:
            for stale in list_checkpoints(folder.parent)[:-keep_last]:
                if stale != folder:  # never the checkpoint just written
                    shutil.rmtree(stale, ignore_errors=True)
    barrier()


def load_checkpoint_files(folder: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared objects by file name, this rank's object or None) of a complete checkpoint."""
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder}: not a complete checkpoint (no {META_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointMismatchError(
            f"{folder}: checkpoint format {meta.get('format_version')} is not one of "
            f"{READABLE_FORMAT_VERSIONS}; it was written by a newer version of this code"
        )
    shared: dict[str, Any] = {"meta": meta}
    for name in (MODEL_FILE, EMA_FILE, TRAIN_FILE):
        if (folder / name).is_file():
            shared[name] = torch.load(folder / name, map_location="cpu", weights_only=True)
    rank_file = folder / RANK_FILE.format(rank=rank)
    per_rank = (
        torch.load(rank_file, map_location="cpu", weights_only=True)
        if rank_file.is_file()
        else None
    )
    return shared, per_rank
