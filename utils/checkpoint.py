"""Checkpoint IO: model weights (ours or upstream's ``step_N`` state-dict files) and the
complete, atomic, verified ``step_N`` folders of a run.

Upstream saved ``torch.save(model.state_dict())`` of the loss head, usually through
``torch.compile`` (keys ``_orig_mod.model.inner...``). Loading strips the compile (and DDP
``module.``) prefixes, matches keys strictly, and can resize the puzzle-embedding table to the
mean embedding as upstream does when fine-tuning on a dataset with other puzzles.

Every file of a ``step_N`` folder is listed in its ``meta.json`` with its size and sha256, and
loading verifies them, so a truncated or altered file is one line naming it, never a torch
traceback; ``latest_good_checkpoint`` is the newest folder that verifies.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Mapping
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


class CorruptCheckpointError(CheckpointMismatchError):
    """A checkpoint file is truncated, altered or not a ``torch.save`` file; the message names
    the file and what is wrong with it. (A ``CheckpointMismatchError``, which unreadable files
    raised before, so that callers catching it keep working.)"""


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, no permission); nothing half-written is
    left, and the message names the path and the checkpoint that is kept."""


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


def load_file(path: str | os.PathLike[str], what: str = "PyTorch checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is one line naming the
    file as ``what``.

    Torch's own messages span lines and suggest ``weights_only=False``, which would run
    arbitrary code from the file; this never does.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # every unreadable file gets the same one-line report
        if zipfile.is_zipfile(path) and isinstance(e, pickle.UnpicklingError):
            raise CorruptCheckpointError(
                f"{path}: holds Python objects other than tensors and plain containers, which "
                f"are not loaded; save it again as a {what} of tensors"
            ) from None
        raise CorruptCheckpointError(
            f"{path}: not a readable {what} (truncated or not a torch.save file)"
        ) from None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a state-dict file, prefixes stripped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    state = load_file(path, what="state dict")
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
        if "embed_tokens" in key or "lm_head" in key:
            hint = (
                "the vocabulary comes from data_paths: use the dataset the checkpoint was "
                "trained on"
            )
        elif key == PUZZLE_EMB_KEY and value.shape[1:] == target.shape[1:]:
            hint = (
                f"the checkpoint was trained on another dataset ({value.shape[0]} puzzle "
                f"identifiers, this data has {target.shape[0]}): use the dataset it was trained "
                "on, or fine-tune with load_checkpoint=..., which resizes the table"
            )
        else:
            hint = "check the architecture options (hidden_size, num_heads, ...)"
        raise CheckpointMismatchError(
            f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
            f"{tuple(target.shape)}; {hint}"
        )
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Complete, atomic, verified training checkpoints
# ----------------------------------------------------------------------------------------------
# 2: optimizers keyed by group name and progress counters under "progress" in TRAIN_FILE.
#    meta.json also lists "files" (size and sha256 of every other file), "data" (the dataset
#    fingerprints of ``training.checkpointing``) and "provenance" (the record of
#    ``training.pretrained_decoder``); readers of format 2 that predate them ignore them, so
#    they need no new version. Format-2 folders without "files" (written before) get a
#    structural check only: every .pt file must be a complete zip archive.
# 1: optimizers as a list in build order; readable, migrated by ``training.checkpointing``.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
META_FILE = "meta.json"
MODEL_FILE = "model.pt"  # the loss head's state dict: model.inner.... (upstream's keys)
EMA_FILE = "ema.pt"  # the EMA shadow of the trainable parameters, when ema=True
TRAIN_FILE = "train_state.pt"  # optimizers by name, progress, strategy state, data position
RANK_FILE = "rank_{rank}.pt"  # per-process carry and RNG states
HASH = "sha256"  # ~1 GB/s with SHA-NI, as fast as zlib.crc32 there; `sha256sum` checks it too


def step_dir(checkpoint_path: str | os.PathLike[str], step: int) -> Path:
    return Path(checkpoint_path) / f"step_{step}"


def step_of(folder: Path) -> int | None:
    """N of a ``step_N`` folder, None for any other name."""
    digits = folder.name.removeprefix("step_")
    return int(digits) if folder.name.startswith("step_") and digits.isdigit() else None


def is_complete(folder: Path) -> bool:
    """A checkpoint folder counts only once its meta.json (written last) exists."""
    return (folder / META_FILE).is_file()


def read_meta(folder: Path) -> dict[str, Any]:
    """The folder's meta.json. ``FileNotFoundError`` without one, ``CorruptCheckpointError``
    when it is unreadable, ``CheckpointMismatchError`` for a format this code cannot read."""
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder}: not a complete checkpoint (no {META_FILE})")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{folder / META_FILE}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{folder / META_FILE}: not a JSON object")
    if meta.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointMismatchError(
            f"{folder}: checkpoint format {meta.get('format_version')} is not one of "
            f"{READABLE_FORMAT_VERSIONS}; it was written by a newer version of this code"
        )
    return meta


def is_ours(folder: Path) -> bool:
    """A ``step_N`` folder this project wrote: its meta.json is readable, in a known format,
    and records the folder's own step. ``keep_last`` deletes nothing else."""
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, UserError):
        return False
    return step_of(folder) is not None and meta.get("step") == step_of(folder)


def list_checkpoints(checkpoint_path: str | os.PathLike[str]) -> list[Path]:
    """Complete ``step_N`` folders, oldest first."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = step_of(p)
        if step is not None and p.is_dir() and is_complete(p):
            found.append((step, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_path: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``step_N`` folder, verified or not (``latest_good_checkpoint``)."""
    found = list_checkpoints(checkpoint_path)
    return found[-1] if found else None


def file_digest(path: Path) -> str:
    """The ``HASH`` hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"size": bytes, HASH: hex}}`` of every file in ``folder`` but meta.json."""
    return {
        p.name: {"size": p.stat().st_size, HASH: file_digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != META_FILE
    }


def _wanted(name: str, rank: int | None) -> bool:
    """Whether a file is checked for ``rank`` (None: every file)."""
    return rank is None or not name.startswith("rank_") or name == RANK_FILE.format(rank=rank)


def verify_checkpoint(
    folder: Path, rank: int | None = None, meta: dict[str, Any] | None = None
) -> str | None:
    """What is wrong with the checkpoint in ``folder``, in one phrase, or None if it verifies.

    Checks every file meta.json lists (``rank``: the shared files and that rank's only) for
    its size and hash; folders written before the list existed get each ``.pt`` file checked
    for being a complete zip archive (what a truncation breaks) and ``model.pt`` for existing.
    """
    if meta is None:
        try:
            meta = read_meta(folder)
        except (FileNotFoundError, UserError) as e:
            return str(e).removeprefix(f"{folder}: ")
    files = meta.get("files") if meta.get("format_version") == FORMAT_VERSION else None
    if files is None:
        for path in sorted(folder.glob("*.pt")):
            if _wanted(path.name, rank) and not zipfile.is_zipfile(path):
                return f"{path.name}: not a complete zip archive (truncated?)"
        return None if (folder / MODEL_FILE).is_file() else f"{MODEL_FILE}: missing"
    try:
        listed = {name: (int(e["size"]), str(e[HASH])) for name, e in files.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        return f"{META_FILE}: malformed file list"
    for name, (size, digest) in sorted(listed.items()):
        path = folder / name
        if not _wanted(name, rank):
            continue
        if not path.is_file():
            return f"{name}: missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name}: size {actual} != {size}"
        if file_digest(path) != digest:
            return f"{name}: {HASH} differs from the one in {META_FILE}"
    return None


def scan_checkpoints(checkpoint_path: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """The newest ``step_N`` that verifies, and one ``"step_N is corrupt (why)"`` phrase for
    each newer one that does not (newest first)."""
    corrupt = []
    for folder in reversed(list_checkpoints(checkpoint_path)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder, corrupt
        corrupt.append(f"{folder.name} is corrupt ({problem})")
    return None, corrupt


def latest_good_checkpoint(checkpoint_path: str | os.PathLike[str]) -> Path | None:
    """The newest ``step_N`` folder of ``checkpoint_path`` that verifies; None if none does.

    What error messages name as "the last good checkpoint" (it reads every file of the
    folders it checks, so it is for error paths and start-up, not for every step).
    """
    return scan_checkpoints(checkpoint_path)[0]


def _alone(problem: str | None) -> str | None:
    return problem


# What PyTorch's C++ zip writer (``torch.save`` to a path) raises when a write fails, e.g. on a
# full disk: "[enforce fail at inline_container.cc:...] unexpected pos ...", "basic_ios::clear:
# iostream error", "PytorchStreamWriter failed writing file ...".
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "iostream error")


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _attempt(path: Path, write: Callable[[], object]) -> str | None:
    """Run ``write``; a failure of the file system (not a bug) becomes a one-phrase problem."""
    try:
        write()
    except OSError as e:
        reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
        if e.errno == errno.ENOSPC:
            reason += f", {_mib(_free_bytes(path))} free"
        return f"{e.filename or path}: {reason}"
    except RuntimeError as e:
        if not any(text in str(e) for text in _TORCH_WRITE_FAILURES):
            raise
        return f"{path}: write failed (disk full? {_mib(_free_bytes(path))} free)"
    return None


def _nbytes(obj: Any, seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the tensor storages in a nest of dicts, lists and tuples (each storage once,
    as ``torch.save`` writes it)."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        key = (str(obj.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


def _check_space(tmp: Path, objects: list[Any]) -> None:
    """Refuse before writing when the disk has less room than the tensors need."""
    needed = _nbytes(objects)
    if needed > _free_bytes(tmp):
        message = f"{os.strerror(errno.ENOSPC)}: the checkpoint needs {_mib(needed)}"
        raise OSError(errno.ENOSPC, message)


def _fresh_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _finish(tmp: Path, folder: Path, meta: dict[str, Any]) -> None:
    """List the files with their hashes in meta.json, written last, then rename into place."""
    meta = {**meta, "files": describe_files(tmp)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    # Saving the same step again keeps one complete checkpoint of it at every moment.
    swap_folder_into_place(tmp, folder)


def _prune(folder: Path, keep_last: int) -> None:
    """Keep ``folder`` and the ``keep_last - 1`` newest older checkpoints of its run folder.

    Deletes only complete ``step_N`` folders this project wrote (``is_ours``) and older than
    ``folder``: a newer one (a corrupt step that ``resume=auto`` stepped back from) stays.
    """
    step = step_of(folder)
    assert step is not None
    older = [p for p in list_checkpoints(folder.parent) if (step_of(p) or 0) < step and is_ours(p)]
    for stale in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    folder: Path,
    *,
    rank: int,
    world_size: int,
    shared: dict[str, Any] | None,
    per_rank: dict[str, Any],
    meta: dict[str, Any],
    agree: Callable[[str | None], str | None] = _alone,
    keep_last: int | None = None,
) -> None:
    """Write one checkpoint atomically: a temporary folder renamed to ``folder`` at the end.

    Rank 0 writes ``shared`` (file name → object; model and optimizer state are identical on
    every rank), each rank its ``per_rank`` object, and rank 0 lists every file's size and hash
    in ``meta.json``, written last, then renames. ``agree(problem)`` is a barrier that returns
    the first problem any rank had (None: all fine; in one process it returns its argument).

    A run killed while writing leaves only the temporary folder, which loading ignores and the
    next save removes. A write that fails (disk full, no permission) removes it and raises
    ``CheckpointWriteError`` on every rank; the previous checkpoints stay as they were.
    """
    tmp = folder.with_name(f".{folder.name}.tmp")
    problem = None
    if rank == 0:
        objects = [*(shared or {}).values(), per_rank]
        problem = _attempt(tmp, lambda: (_fresh_dir(tmp), _check_space(tmp, objects)))
    problem = agree(problem)
    if problem is None:
        for name, obj in (shared or {}).items() if rank == 0 else ():
            problem = _attempt(tmp / name, lambda obj=obj, name=name: torch.save(obj, tmp / name))
            if problem is not None:
                break
        if problem is None:
            rank_file = tmp / RANK_FILE.format(rank=rank)
            problem = _attempt(rank_file, lambda: torch.save(per_rank, rank_file))
        problem = agree(problem)
    if problem is None:
        if rank == 0:
            full = {**meta, "format_version": FORMAT_VERSION, "world_size": world_size}
            problem = _attempt(tmp, lambda: _finish(tmp, folder, full))
            if problem is None and keep_last is not None:
                _prune(folder, keep_last)
        problem = agree(problem)
    if problem is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(folder.parent)
        kept_text = f"the newest checkpoint {kept} is kept" if kept else "no checkpoint exists yet"
        raise CheckpointWriteError(
            f"checkpoint {folder} not written ({problem}); {kept_text}; free disk space or fix "
            f"the permissions of {folder.parent}, then resume=auto"
        )


def weights_with_ema(shared: Mapping[str, Any], use_ema: bool) -> tuple[dict[str, Any], bool]:
    """(the model state of a checkpoint's ``shared`` files, whether the EMA shadow was used):
    ``ema.pt`` (parameter name → tensor) substituted when asked and present."""
    state = dict(shared[MODEL_FILE])
    if use_ema and EMA_FILE in shared:
        state.update(strip_prefixes(shared[EMA_FILE]))
        return state, True
    return state, False


def load_checkpoint_files(folder: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared objects by file name, this rank's object or None) of a complete checkpoint,
    verified first (``CorruptCheckpointError`` naming the file that does not)."""
    meta = read_meta(folder)
    problem = verify_checkpoint(folder, rank, meta)
    if problem is not None:
        raise CorruptCheckpointError(
            f"{folder}: corrupt checkpoint ({problem}); use another step_N folder"
        )
    shared: dict[str, Any] = {"meta": meta}
    for name in (MODEL_FILE, EMA_FILE, TRAIN_FILE):
        if (folder / name).is_file():
            shared[name] = load_file(folder / name)
    rank_file = folder / RANK_FILE.format(rank=rank)
    per_rank = load_file(rank_file) if rank_file.is_file() else None
    return shared, per_rank
