"""Pieces shared by every dataset builder and by the loader.

The on-disk layout is upstream's (written by its ``dataset/build_*_dataset.py``, read by its
``puzzle_dataset.py``)::

    <dir>/<split>/<set>__<field>.npy   split in {train, test}, set = "all"
    <dir>/<split>/dataset.json         PuzzleDatasetMetadata
    <dir>/identifiers.json             id -> puzzle name, index 0 = "<blank>"
    <dir>/test_puzzles.json            ARC only: raw evaluation tasks with solutions

Builders stream rows straight into ``.npy`` files (``NpyRowWriter``) inside a temporary folder
that is renamed into place only once everything is written (``atomic_output_dir``), so a failed
build never leaves a half-written dataset behind.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydantic import BaseModel, ConfigDict

from utils.atomic import swap_folder_into_place
from utils.schema import UserError

# Fields stored per split and set, in upstream's naming.
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
PUZZLE_ID_SEPARATOR = "|||"
BLANK_IDENTIFIER = "<blank>"
# Label value the loader writes for ignored and padded positions and the losses skip (upstream's
# ``models.losses.IGNORE_LABEL_ID``); a dataset's own ``ignore_label_id`` is mapped to it.
IGNORE_LABEL_ID = -100

# 0: identity, 1-3: rot90 k=1..3, 4: fliplr, 5: flipud, 6: transpose, 7: anti-diagonal reflection.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)
# Transforms 1, 3, 6 and 7 swap the two axes of a grid.
DIHEDRAL_SWAPS_AXES = (False, True, False, True, False, False, True, True)


class DatasetBuildError(UserError):
    """A problem with a builder's input; the message is one line naming the file and task."""


class DataError(UserError, ValueError):
    """A built dataset that cannot be read or does not fit the run; the message names the file
    and what to rebuild or change."""


class PuzzleDatasetMetadata(BaseModel):
    """``<split>/dataset.json``: upstream's fields, plus the optional ``split_policy``.

    ``ignore_label_id`` is the label value the loader turns into -100 (ARC and Maze: PAD 0).
    ``num_puzzle_identifiers`` counts ids including the blank id 0 (the embedding table size).
    """

    model_config = ConfigDict(extra="forbid")

    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int
    sets: list[str]
    split_policy: str | None = None


def dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Apply dihedral transform ``tid`` (0..7, upstream's numbering) to the last two axes."""
    axes = (-2, -1)
    if tid == 0:
        return arr
    if tid in (1, 2, 3):
        return np.rot90(arr, k=tid, axes=axes)
    if tid == 4:
        return np.flip(arr, axis=-1)
    if tid == 5:
        return np.flip(arr, axis=-2)
    if tid == 6:
        return np.swapaxes(arr, -2, -1)
    if tid == 7:
        return np.flip(np.rot90(arr, k=1, axes=axes), axis=-1)
    raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")


def inverse_dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Undo ``dihedral_transform(arr, tid)``."""
    return dihedral_transform(arr, DIHEDRAL_INVERSE[tid])


def augmented_name(base: str, trans_id: int, colour_map: np.ndarray) -> str:
    """Upstream's puzzle name for a variant: ``base|||t<trans_id>|||<colour map digits>``."""
    digits = "".join(str(int(c)) for c in colour_map)
    return f"{base}{PUZZLE_ID_SEPARATOR}t{trans_id}{PUZZLE_ID_SEPARATOR}{digits}"


def inverse_aug(name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Parse a puzzle name; return the base name and the map from variant grids to originals.

    The map undoes the dihedral transform and the colour permutation (colours 0..9, not tokens).
    Names without the separator are originals and map to themselves.
    """
    if PUZZLE_ID_SEPARATOR not in name:
        return name, lambda grid: grid
    base, trans, digits = name.split(PUZZLE_ID_SEPARATOR)[-3:]
    trans_id = int(trans[1:])
    inverse_colours = np.argsort(np.array([int(d) for d in digits])).astype(np.uint8)

    def undo(grid: np.ndarray) -> np.ndarray:
        return inverse_colours[inverse_dihedral_transform(grid, trans_id)]

    return base, undo


# ----------------------------------------------------------------------------------------------
# Streaming .npy writer
# ----------------------------------------------------------------------------------------------
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER_BYTES = 128  # magic + length + dict, padded; room for any shape this project writes


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    free = _NPY_HEADER_BYTES - len(_NPY_MAGIC) - 2 - len(text) - 1
    if free < 0:
        raise ValueError(f"npy header too long for shape {shape}")
    body = (text + " " * free + "\n").encode("latin1")
    return _NPY_MAGIC + struct.pack("<H", len(body)) + body


class NpyRowWriter:
    """Append rows to a ``.npy`` file without holding them in memory.

    The header is written with a fixed size and rewritten with the final row count on
    ``close()``, so the file is a standard ``.npy`` that ``np.load(..., mmap_mode="r")`` reads.
    """

    def __init__(self, path: str | os.PathLike[str], dtype: Any, row_shape: tuple[int, ...] = ()):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(_npy_header(self.dtype, (0, *self.row_shape)))

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` of shape ``[n, *row_shape]`` (cast to the writer's dtype)."""
        assert self._file is not None, "writer already closed"
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: row shape {rows.shape[1:]} != {self.row_shape}")
        self._file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        self._file.close()
        self._file = None

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Output folder handling
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``output_dir`` only if the block succeeds.

    On any exception the temporary folder is removed and ``output_dir`` is left as it was
    (absent, or the previous complete dataset).
    """
    final = Path(output_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_folder_into_place(tmp, final)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    # One dumps + write: json.dump's many small writes are several times slower on big objects.
    text = json.dumps(obj)
    with open(path, "w") as f:
        f.write(text)


def write_metadata(split_dir: Path, metadata: PuzzleDatasetMetadata) -> None:
    write_json(split_dir / "dataset.json", metadata.model_dump(exclude_none=True))


def write_identifiers(output_dir: Path, names_by_id: Sequence[str]) -> None:
    """Write ``identifiers.json``: a list indexed by puzzle identifier (index 0 is the blank)."""
    write_json(output_dir / "identifiers.json", list(names_by_id))


def write_single_example_split(
    split_dir: Path,
    inputs: np.ndarray,
    labels: np.ndarray,
    group_sizes: Sequence[int] | np.ndarray,
    *,
    vocab_size: int,
    pad_id: int,
    ignore_label_id: int | None,
    num_puzzle_identifiers: int = 1,
    set_name: str = "all",
) -> PuzzleDatasetMetadata:
    """Write a split where every puzzle has one example and all share puzzle identifier 0.

    This is the Sudoku and Maze layout: ``inputs``/``labels`` are ``[N, seq_len]`` uint8,
    consecutive rows are grouped into ``group_sizes`` (original + its augmentations).
    """
    split_dir.mkdir(parents=True, exist_ok=True)
    n, seq_len = inputs.shape
    group_sizes = np.asarray(group_sizes, dtype=np.int64)
    if int(group_sizes.sum()) != n:
        raise ValueError(f"group sizes sum to {int(group_sizes.sum())}, expected {n} rows")
    arrays = {
        "inputs": inputs.astype(np.uint8),
        "labels": labels.astype(np.uint8),
        "puzzle_identifiers": np.zeros(n, dtype=np.int32),
        "puzzle_indices": np.arange(n + 1, dtype=np.int32),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int32),
    }
    for field, arr in arrays.items():
        np.save(split_dir / f"{set_name}__{field}.npy", arr)
    metadata = PuzzleDatasetMetadata(
        pad_id=pad_id,
        ignore_label_id=ignore_label_id,
        blank_identifier_id=0,
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_puzzle_identifiers=num_puzzle_identifiers,
        total_groups=len(group_sizes),
        mean_puzzle_examples=1.0,
        total_puzzles=n,
        sets=[set_name],
    )
    write_metadata(split_dir, metadata)
    return metadata


# ----------------------------------------------------------------------------------------------
# Command-line plumbing
# ----------------------------------------------------------------------------------------------
def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a builder's ``main``; input problems print one ``error:`` line and exit with 2."""
    try:
        main(argv)
    except DatasetBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def flag_aliases(name: str) -> list[str]:
    """Accept both ``--num-aug`` and argdantic's ``--num_aug`` spellings of a flag."""
    dashed = "--" + name.replace("_", "-")
    under = "--" + name
    return [dashed] if dashed == under else [dashed, under]


def parse_literal_list(values: Sequence[str]) -> list[str]:
    """Accept ``--subsets a b c`` as well as ``--subsets "['a','b']"``."""
    if len(values) == 1 and values[0].startswith("["):
        return [str(v) for v in ast.literal_eval(values[0])]
    return list(values)
