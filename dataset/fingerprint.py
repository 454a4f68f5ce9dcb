"""Fingerprints of built datasets: what a checkpoint records of the data it was trained on.

A fingerprint is small, JSON-serialisable and cheap (no pass over the token arrays):

* ``identifiers``: the sha256 of ``<path>/identifiers.json``, the id → puzzle-name list of the
  whole build (train and test ids alike) whose order indexes the puzzle-embedding table; ``None``
  for a folder without one (hand-written data).
* per split that exists (``train``, ``test``): ``metadata``, the split's ``dataset.json`` as
  read, and ``content``, a sha256 of each array's size and its first and last 64 KiB (``.npy``
  layout) or of the members' sizes and CRCs (packed ``.npz``). The content tells another seed
  apart where the identifiers cannot: Sudoku and Maze builds have only ``<blank>``.

``differences`` compares two fingerprints of one dataset path and says what differs.

``data_provenance`` is what a checkpoint records of where its weights' tasks came from, beside
the fingerprint: the build's split policy and the base names of the tasks with examples in a
split (``split_tasks``; ``identifiers.json`` names without the ``|||...`` augmentation suffix).
The policy is ``dataset.json``'s ``split_policy`` when it has one; a build without it is
``strict`` when its test split stores demonstrations (``num_demos`` > 0, as ETRM's builder
writes), otherwise ``trm``, the split of upstream's builder, which puts every evaluation
task's demonstration pairs in the train split.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataset.common import BLANK_IDENTIFIER, FIELDS, PUZZLE_ID_SEPARATOR
from dataset.reader import SplitSource, find_source

IDENTIFIERS_FILE = "identifiers.json"
SPLITS = ("train", "test")
_SAMPLE_BYTES = 64 << 10
# Fingerprints by path, valid while the stat signature of the files they read is unchanged (a
# run saves many checkpoints; a test session rebuilds data under the same path).
_CACHE: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
_TASKS_CACHE: dict[tuple[str, str], tuple[tuple[Any, ...], list[str] | None]] = {}
SPLIT_POLICIES = ("trm", "strict")
NUM_DEMOS_FIELD = "num_demos"  # beside FIELDS in builds that tell demos from queries


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sources(dataset_path: str) -> dict[str, SplitSource]:
    found = {}
    for split in SPLITS:
        try:
            found[split] = find_source(dataset_path, split)
        except FileNotFoundError:
            continue
    return found


def _content_files(source: SplitSource, sets: Sequence[str]) -> list[Path]:
    if source.kind == "npz":
        return [source.location]
    return [source.location / f"{s}__{field}.npy" for s in sets for field in FIELDS]


def _sets(source: SplitSource) -> list[str]:
    try:
        raw = json.loads(source.metadata_file.read_text())
        return [str(s) for s in raw.get("sets", [])]
    except (OSError, ValueError, AttributeError):
        return []


def _signature(dataset_path: str, sources: dict[str, SplitSource]) -> tuple[Any, ...]:
    files = [Path(dataset_path) / IDENTIFIERS_FILE]
    for source in sources.values():
        files += [source.metadata_file, *_content_files(source, _sets(source))]
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((str(f), st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stats.append((str(f), None))
    return tuple(stats)


def _content_digest(source: SplitSource, sets: Sequence[str]) -> str:
    digest = hashlib.sha256()
    if source.kind == "npz":
        try:
            with zipfile.ZipFile(source.location) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    digest.update(f"{info.filename}:{info.file_size}:{info.CRC};".encode())
        except (OSError, zipfile.BadZipFile):
            digest.update(b"unreadable")
        return digest.hexdigest()
    for path in _content_files(source, sets):
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                digest.update(f"{path.name}:{size};".encode())
                digest.update(f.read(_SAMPLE_BYTES))
                f.seek(max(size - _SAMPLE_BYTES, 0))
                digest.update(f.read(_SAMPLE_BYTES))
        except OSError:
            digest.update(f"{path.name}:missing;".encode())
    return digest.hexdigest()


def dataset_fingerprint(dataset_path: str) -> dict[str, Any]:
    """The fingerprint of one built dataset folder (see the module docstring).

    ``{"identifiers": str | None, "splits": {split: {"metadata": dict, "content": str}}}``.
    """
    sources = _sources(dataset_path)
    signature = _signature(dataset_path, sources)
    cached = _CACHE.get(dataset_path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    identifiers_file = Path(dataset_path) / IDENTIFIERS_FILE
    splits: dict[str, Any] = {}
    for split, source in sources.items():
        try:
            metadata = json.loads(source.metadata_file.read_text())
        except (OSError, ValueError):
            metadata = None
        splits[split] = {"metadata": metadata, "content": _content_digest(source, _sets(source))}
    fingerprint = {
        "identifiers": _sha256_file(identifiers_file) if identifiers_file.is_file() else None,
        "splits": splits,
    }
    _CACHE[dataset_path] = (signature, fingerprint)
    return fingerprint


def _short(digest: str | None) -> str:
    return f"sha256 {digest[:12]}" if digest else "absent"


def differences(
    saved: dict[str, Any], now: dict[str, Any], splits: Sequence[str]
) -> list[tuple[str, str]]:
    """What differs between the fingerprint a checkpoint ``saved`` and the data ``now``.

    Compares the identifiers and, for each of ``splits``, the metadata and the content. Returns
    (what, detail) pairs such as ``("puzzle identifiers", "identifiers.json sha256 5e6f…, the
    checkpoint's 1a2b…")``; empty when they agree. A split the checkpoint did not record is not
    compared.
    """
    found: list[tuple[str, str]] = []
    if saved.get("identifiers") != now.get("identifiers"):
        found.append((
            "puzzle identifiers",
            f"{IDENTIFIERS_FILE} {_short(now.get('identifiers'))}, the checkpoint's "
            f"{_short(saved.get('identifiers'))}",
        ))  # fmt: skip
    for split in splits:
        before = saved.get("splits", {}).get(split)
        if before is None:
            continue
        after = now.get("splits", {}).get(split)
        if after is None:
            found.append((f"{split} split", f"no {split} split now"))
            continue
        old_meta, new_meta = before.get("metadata") or {}, after.get("metadata") or {}
        changed = [k for k in sorted({*old_meta, *new_meta}) if old_meta.get(k) != new_meta.get(k)]
        if changed:
            detail = ", ".join(
                f"{k} {new_meta.get(k)!r}, the checkpoint's {old_meta.get(k)!r}"
                for k in changed[:3]
            )
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            found.append((f"{split} metadata", f"{split}/dataset.json {detail}{more}"))
        elif before.get("content") != after.get("content"):
            found.append((f"{split} examples", f"sampled bytes of the {split} arrays"))
    return found


# ----------------------------------------------------------------------------------------------
# Provenance: the split policy and the tasks of a build
# ----------------------------------------------------------------------------------------------
def _has_array(source: SplitSource, set_name: str, field: str) -> bool:
    member = f"{set_name}__{field}.npy"
    if source.kind == "npy":
        return (source.location / member).is_file()
    try:
        with zipfile.ZipFile(source.location) as zf:
            return member in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _stat(files: Sequence[Path]) -> tuple[Any, ...]:
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((str(f), st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stats.append((str(f), None))
    return tuple(stats)


def _metadata(source: SplitSource) -> dict[str, Any]:
    try:
        raw = json.loads(source.metadata_file.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def split_policy(dataset_path: str) -> tuple[str, str]:
    """(policy, how it was found) of a built dataset: ``trm`` or ``strict`` (see the module
    docstring); the second item names the evidence, for messages and the record."""
    sources = _sources(dataset_path)
    for split in ("test", "train"):
        if split in sources:
            recorded = _metadata(sources[split]).get("split_policy")
            if isinstance(recorded, str) and recorded:
                return recorded, f"{split}/dataset.json"
    test = sources.get("test")
    if test is not None:
        for set_name in _sets(test):
            if _has_array(test, set_name, NUM_DEMOS_FIELD):
                demos = test.load(set_name, NUM_DEMOS_FIELD, mmap=True)
                if demos.size and int(np.max(demos)) > 0:
                    return "strict", "its test split stores demonstrations (num_demos > 0)"
    return "trm", "no split_policy recorded and no demonstrations in its test split"


def split_tasks(dataset_path: str, split: str) -> list[str] | None:
    """Sorted base task names of the puzzles with at least one example in ``split``; [] when
    the split does not exist, None when the build has no ``identifiers.json`` to name them."""
    try:
        source = find_source(dataset_path, split)
    except FileNotFoundError:
        return []
    identifiers_file = Path(dataset_path) / IDENTIFIERS_FILE
    sets = _sets(source)
    arrays = [
        source.location / f"{s}__{f}.npy" if source.kind == "npy" else source.location
        for s in sets
        for f in ("puzzle_identifiers", "puzzle_indices")
    ]
    signature = _stat([identifiers_file, source.metadata_file, *arrays])
    key = (dataset_path, split)
    cached = _TASKS_CACHE.get(key)
    if cached is not None and cached[0] == signature:
        return cached[1]
    tasks: list[str] | None = None
    if identifiers_file.is_file():
        try:
            names = json.loads(identifiers_file.read_text())
        except (OSError, ValueError):
            names = None
        if isinstance(names, list):
            seen: set[str] = set()
            for set_name in sets:
                ids = np.asarray(source.load(set_name, "puzzle_identifiers", mmap=True))
                bounds = np.asarray(source.load(set_name, "puzzle_indices", mmap=True))
                with_examples = ids[np.diff(bounds)[: len(ids)] > 0]
                for i in np.unique(with_examples).tolist():
                    name = names[i] if 0 <= i < len(names) else None
                    if isinstance(name, str) and name != BLANK_IDENTIFIER:
                        seen.add(name.split(PUZZLE_ID_SEPARATOR, 1)[0])
            tasks = sorted(seen)
    _TASKS_CACHE[key] = (signature, tasks)
    return tasks


def data_provenance(dataset_path: str, split: str = "train") -> dict[str, Any]:
    """What a checkpoint records of one training dataset: ``{"split_policy": str,
    "split_policy_from": str, "tasks": list[str] | None}`` (``tasks``: ``split_tasks``)."""
    policy, found = split_policy(dataset_path)
    return {
        "split_policy": policy,
        "split_policy_from": found,
        "tasks": split_tasks(dataset_path, split),
    }
