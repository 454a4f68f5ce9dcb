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
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dataset.common import FIELDS
from dataset.reader import SplitSource, find_source

IDENTIFIERS_FILE = "identifiers.json"
SPLITS = ("train", "test")
_SAMPLE_BYTES = 64 << 10
# Fingerprints by path, valid while the stat signature of the files they read is unchanged (a
# run saves many checkpoints; a test session rebuilds data under the same path).
_CACHE: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}


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
