"""Reading and validating built puzzle datasets (upstream ``puzzle_dataset.py``'s loading).

Layout, per dataset path and split, whichever exists (the folder is preferred)::

    <path>/<split>/<set>__<field>.npy  + <path>/<split>/dataset.json   upstream layout, mmap-ed
    <path>/<split>.npz                 + <path>/<split>.json            packed, read into memory

``<field>`` is one of ``dataset.common.FIELDS``; the npz holds the same arrays under the keys
``<set>__<field>`` and ``<path>/<split>.json`` is that split's ``dataset.json``. Use the folder
layout for large datasets: only it is memory-mapped.

The optional ``<set>__num_demos`` array (ARC builds: this repository's and ETRM's encoder
builder) says how many of each puzzle's examples, at its start, are demonstration pairs; it is
read into ``SetData.num_demos`` when present. ETRM's builder writes no ``split_policy``: a split
whose every puzzle starts with at least one demonstration is read as ``strict``, the only policy
that builder has (its test split holds the evaluation tasks' demos).

One module past 400 lines on purpose: the two layouts share every validation step, and the
checks read best next to the reads they guard.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from pydantic import ValidationError

from dataset.common import FIELDS, DataError, PuzzleDatasetMetadata

# The per-example fields, gathered row by row; the other FIELDS are index arrays held in memory.
TOKEN_FIELDS = ("inputs", "labels")
# Arrays up to this size get a full token-range check when the dataset is read; larger ones get
# evenly spaced row blocks of this total size there, and every gathered batch is checked too.
FULL_TOKEN_CHECK_BYTES = 64 << 20
_TOKEN_CHECK_BLOCKS = 16
_TOKEN_CHECK_CHUNK_BYTES = 16 << 20
# Metadata fields that must agree between several dataset_paths.
_SHARED_METADATA_FIELDS = (
    "seq_len",
    "vocab_size",
    "pad_id",
    "ignore_label_id",
    "blank_identifier_id",
)


def _read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DataError(f"unsupported .npy format version {version}")
    if fortran_order and len(shape) > 1:
        raise DataError("Fortran-ordered arrays are not supported")
    return tuple(shape), dtype


@dataclass(frozen=True)
class SplitSource:
    """Where one dataset path's split lives: a folder of ``.npy`` files or one packed ``.npz``."""

    kind: Literal["npy", "npz"]
    location: Path  # the split folder, or the .npz file
    metadata_file: Path

    def describe(self, set_name: str, field: str) -> str:
        """The file (and for npz the key) named in error messages."""
        if self.kind == "npy":
            return str(self.location / f"{set_name}__{field}.npy")
        return f"{self.location}[{set_name}__{field}]"

    def has(self, set_name: str, field: str) -> bool:
        """Whether the split stores the array ``<set_name>__<field>``."""
        member = f"{set_name}__{field}.npy"
        if self.kind == "npy":
            return (self.location / member).is_file()
        try:
            with zipfile.ZipFile(self.location) as zf:
                return member in zf.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(
                f"{self.location}: unreadable archive ({e}); rebuild the dataset"
            ) from e

    def header(self, set_name: str, field: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one array, read from its header only."""
        member = f"{set_name}__{field}.npy"
        if self.kind == "npy" and not (self.location / member).is_file():
            raise FileNotFoundError(
                f"{self.location / member} is missing; rebuild the dataset (every set listed in "
                f"{self.metadata_file.name} needs all of {', '.join(FIELDS)})"
            )
        try:
            if self.kind == "npy":
                with open(self.location / member, "rb") as f:
                    return _read_npy_header(f)
            with zipfile.ZipFile(self.location) as zf:
                if member in zf.namelist():
                    with zf.open(member) as f:
                        return _read_npy_header(f)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(
                f"{self.describe(set_name, field)}: unreadable array ({e}); rebuild the dataset"
            ) from e
        raise DataError(
            f"{self.location} has no array '{set_name}__{field}'; repack it with all of "
            f"{', '.join(FIELDS)} for every set in {self.metadata_file.name}"
        )

    def load(self, set_name: str, field: str, mmap: bool) -> np.ndarray:
        """The array; ``mmap`` memory-maps ``.npy`` files (npz members are always read)."""
        try:
            if self.kind == "npy":
                path = self.location / f"{set_name}__{field}.npy"
                return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            with np.load(self.location, allow_pickle=False) as npz:
                return npz[f"{set_name}__{field}"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            desc = self.describe(set_name, field)
            raise DataError(f"{desc}: unreadable array ({e}); rebuild the dataset") from e


def find_source(dataset_path: str, split: str) -> SplitSource:
    """The split's layout under ``dataset_path``; ``FileNotFoundError`` saying what is missing."""
    folder = Path(dataset_path) / split
    folder_metadata = folder / "dataset.json"
    packed = Path(dataset_path) / f"{split}.npz"
    if folder_metadata.is_file():
        return SplitSource("npy", folder, folder_metadata)
    if packed.is_file():
        packed_metadata = Path(dataset_path) / f"{split}.json"
        if not packed_metadata.is_file():
            raise FileNotFoundError(
                f"{packed_metadata} is missing: the packed {packed} needs its split's "
                "dataset.json saved under that name"
            )
        return SplitSource("npz", packed, packed_metadata)
    if folder.is_dir():
        raise FileNotFoundError(
            f"{folder_metadata} is missing; rebuild the dataset (the builder writes it last)"
        )
    raise FileNotFoundError(
        f"no '{split}' split in {dataset_path}: neither {folder_metadata} (.npy layout) nor "
        f"{packed} (packed) exists; build the dataset first or fix data_paths "
        "(data_paths_test for the evaluation data)"
    )


def load_metadata(source: SplitSource) -> PuzzleDatasetMetadata:
    """The split's validated ``dataset.json``; ``ValueError`` naming the file and the problem."""
    name = source.metadata_file
    try:
        raw = json.loads(name.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{name}: unreadable dataset.json ({e}); rebuild the dataset") from e
    if not isinstance(raw, dict):
        raise DataError(f"{name}: dataset.json must hold an object; rebuild the dataset")
    if "total_puzzles" not in raw and isinstance(raw.get("sets"), list):
        # Upstream fills this field in for datasets built before it existed (HRM's builders).
        raw["total_puzzles"] = sum(
            source.header(str(s), "puzzle_identifiers")[0][0] for s in raw["sets"]
        )
    try:
        metadata = PuzzleDatasetMetadata.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'dataset.json'}: {err['msg']}"
            for err in e.errors()
        )
        raise DataError(f"{name}: invalid dataset.json ({problems}); rebuild the dataset") from e
    checks = [
        (metadata.seq_len > 0, "seq_len must be > 0"),
        (metadata.vocab_size > 0, "vocab_size must be > 0"),
        (0 <= metadata.pad_id < metadata.vocab_size, "pad_id must be in [0, vocab_size)"),
        (metadata.num_puzzle_identifiers > 0, "num_puzzle_identifiers must be > 0"),
        (
            0 <= metadata.blank_identifier_id < metadata.num_puzzle_identifiers,
            "blank_identifier_id must be in [0, num_puzzle_identifiers)",
        ),
        (len(metadata.sets) > 0, "sets must not be empty"),
        (len(set(metadata.sets)) == len(metadata.sets), "sets must not repeat a name"),
    ]
    for ok, problem in checks:
        if not ok:
            raise DataError(f"{name}: invalid dataset.json ({problem}); rebuild the dataset")
    return metadata


def _bad_token(values: np.ndarray, vocab_size: int, allowed: int | None) -> int | None:
    """Index (into ``values.ravel()``) of the first id outside ``[0, vocab_size)``, else None.

    ``allowed`` is one more accepted value (the ignore label), which may lie outside the range.
    """
    if values.size == 0:
        return None
    if int(values.min()) >= 0 and int(values.max()) < vocab_size:
        return None
    flat = values.ravel()
    bad = (flat < 0) | (flat >= vocab_size)
    if allowed is not None:
        bad &= flat != allowed
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def _token_check_blocks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """Row ranges checked when a dataset is read: all rows, or evenly spaced blocks."""
    if rows * row_bytes <= FULL_TOKEN_CHECK_BYTES:
        return [(0, rows)]
    block_rows = max(1, FULL_TOKEN_CHECK_BYTES // (_TOKEN_CHECK_BLOCKS * row_bytes))
    starts = np.linspace(0, rows - block_rows, _TOKEN_CHECK_BLOCKS).astype(np.int64)
    return [(int(s), int(s) + block_rows) for s in np.unique(starts)]


def _check_indices(
    source: SplitSource, set_name: str, field: str, arr: np.ndarray, end: int, end_what: str
) -> None:
    desc = source.describe(set_name, field)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"{desc}: expected a non-empty 1-D integer array, got {arr.dtype} {arr.shape}; "
            "rebuild the dataset"
        )
    if int(arr[0]) != 0:
        raise DataError(f"{desc}: must start at 0, starts at {int(arr[0])}; rebuild the dataset")
    steps = np.diff(arr.astype(np.int64))
    # A group without puzzles cannot be sampled (upstream's rng.integers(lo, lo) would fail).
    strict = field == "group_indices"
    wrong = np.flatnonzero(steps <= 0 if strict else steps < 0)
    if wrong.size:
        order = "strictly increasing" if strict else "non-decreasing"
        raise DataError(
            f"{desc}: must be {order}, entry {int(wrong[0]) + 1} is {int(arr[wrong[0] + 1])} "
            f"after {int(arr[wrong[0]])}; rebuild the dataset"
        )
    if int(arr[-1]) != end:
        raise DataError(
            f"{desc}: last value {int(arr[-1])} != {end} ({end_what}); the arrays come from "
            "different builds, rebuild the dataset"
        )


def _load_num_demos(
    source: SplitSource, set_name: str, puzzle_indices: np.ndarray
) -> np.ndarray | None:
    """``<set>__num_demos`` as int64 [P], checked against the puzzles; None when not stored."""
    if not source.has(set_name, "num_demos"):
        return None
    desc = source.describe(set_name, "num_demos")
    arr = source.load(set_name, "num_demos", mmap=False)
    puzzles = puzzle_indices.size - 1
    if arr.shape != (puzzles,) or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"{desc}: expected {puzzles} integers, one per puzzle in puzzle_indices, got "
            f"{arr.dtype} {arr.shape}; rebuild the dataset"
        )
    num_demos = arr.astype(np.int64)
    examples = np.diff(puzzle_indices.astype(np.int64))
    bad = np.flatnonzero((num_demos < 0) | (num_demos > examples))
    if bad.size:
        p = int(bad[0])
        raise DataError(
            f"{desc}: puzzle {p} has num_demos {int(num_demos[p])} outside [0, {int(examples[p])}] "
            "(its examples); the arrays come from different builds, rebuild the dataset"
        )
    return num_demos


@dataclass
class SetData:
    """One yielded set: index arrays in memory (identifiers already offset), tokens in files."""

    name: str  # the yielded name: "<set>" for the first path, "<set><k>" for path k
    stored_name: str  # the name in the files
    source: SplitSource
    puzzle_identifiers: np.ndarray  # int32 [P]
    puzzle_indices: np.ndarray  # int64 [P+1], example offsets per puzzle
    group_indices: np.ndarray  # int64 [G+1], puzzle offsets per group
    num_examples: int
    # int64 [P]: demonstration pairs at the start of each puzzle; None when not stored
    num_demos: np.ndarray | None = None

    @property
    def num_groups(self) -> int:
        return self.group_indices.size - 1


class PuzzleReader:
    """The validated sets of one split of ``dataset_paths``, merged.

    ``sets`` lists the yielded sets in upstream's order (sets outer, paths inner); path k > 0
    yields its sets as ``<set><k>`` (upstream ``PuzzleDataset._lazy_load_dataset``). Path k's
    puzzle identifiers are offset by ``identifier_offsets[k]``, the sum of
    ``num_puzzle_identifiers`` of the paths before it (upstream's ids collide).
    ``metadata_per_path`` holds each path's ``dataset.json`` and ``metadata`` their merge
    (identifiers, groups and puzzles summed, ``mean_puzzle_examples`` weighted by puzzles,
    ``sets`` every yielded name; upstream listed only the first path's).

    Missing files, unreadable metadata, inconsistent shapes and index arrays, puzzle
    identifiers outside ``[0, num_puzzle_identifiers)``, token ids outside ``[0, vocab_size)``
    and metadata that differs between paths raise one ``FileNotFoundError``/``ValueError``
    naming the file. Token ids are fully checked for arrays up to ``FULL_TOKEN_CHECK_BYTES`` and
    sampled in evenly spaced blocks beyond that (ARC's 3.2 GB would cost seconds to minutes on
    every start); ``gather`` checks every row it returns, so a bad id never reaches the model.

    Pickling leaves the opened token arrays behind; a copy reopens them on first use.
    """

    def __init__(self, dataset_paths: Sequence[str], split: str) -> None:
        self._token_arrays: dict[tuple[str, str], np.ndarray] = {}
        sources = [find_source(p, split) for p in dataset_paths]
        metadatas = [load_metadata(s) for s in sources]
        first = metadatas[0]
        for source, metadata in zip(sources[1:], metadatas[1:], strict=True):
            for field in _SHARED_METADATA_FIELDS:
                if getattr(metadata, field) != getattr(first, field):
                    raise DataError(
                        f"{source.metadata_file}: {field} {getattr(metadata, field)!r} differs "
                        f"from {getattr(first, field)!r} in {sources[0].metadata_file}; "
                        "dataset_paths must be built with the same tokenizer and seq_len"
                    )
        self.metadata_per_path = metadatas
        self.identifier_offsets = [
            int(x) for x in np.cumsum([0] + [m.num_puzzle_identifiers for m in metadatas[:-1]])
        ]

        set_order = list(dict.fromkeys(s for m in metadatas for s in m.sets))
        layout = [
            (stored_name, k, stored_name if k == 0 else f"{stored_name}{k}")
            for stored_name in set_order
            for k, metadata in enumerate(metadatas)
            if stored_name in metadata.sets
        ]
        names = [name for _, _, name in layout]
        if len(set(names)) != len(names):
            raise DataError(
                f"set names {names} collide after renaming path k's sets to '<set><k>'; "
                "rename the sets in the dataset.json files"
            )
        self.sets = [
            self._load_set(sources[k], metadatas[k], stored_name, name, k)
            for stored_name, k, name in layout
        ]
        for k, metadata in enumerate(metadatas):
            demos = [s.num_demos for (_, j, _), s in zip(layout, self.sets, strict=True) if j == k]
            if metadata.split_policy is None and all(
                n is not None and n.size > 0 and int(n.min()) > 0 for n in demos
            ):
                metadatas[k] = metadata.model_copy(update={"split_policy": "strict"})

        total_puzzles = sum(m.total_puzzles for m in metadatas)
        weighted = sum(m.mean_puzzle_examples * m.total_puzzles for m in metadatas)
        policies = {m.split_policy for m in metadatas}
        self.metadata = PuzzleDatasetMetadata(
            pad_id=first.pad_id,
            ignore_label_id=first.ignore_label_id,
            blank_identifier_id=first.blank_identifier_id,
            vocab_size=first.vocab_size,
            seq_len=first.seq_len,
            num_puzzle_identifiers=sum(m.num_puzzle_identifiers for m in metadatas),
            total_groups=sum(m.total_groups for m in metadatas),
            mean_puzzle_examples=weighted / total_puzzles if total_puzzles else 0.0,
            total_puzzles=total_puzzles,
            sets=names,
            split_policy=policies.pop() if len(policies) == 1 else None,
        )

    def _load_set(
        self,
        source: SplitSource,
        metadata: PuzzleDatasetMetadata,
        stored_name: str,
        name: str,
        path_index: int,
    ) -> SetData:
        shapes = {f: source.header(stored_name, f) for f in FIELDS}
        inputs_shape, inputs_dtype = shapes["inputs"]
        labels_shape, labels_dtype = shapes["labels"]
        inputs_desc = source.describe(stored_name, "inputs")
        labels_desc = source.describe(stored_name, "labels")
        if len(inputs_shape) != 2 or inputs_shape[1] != metadata.seq_len:
            raise DataError(
                f"{inputs_desc}: shape {inputs_shape} is not [N, seq_len={metadata.seq_len}] "
                f"of {source.metadata_file}; rebuild the dataset"
            )
        if labels_shape != inputs_shape:
            raise DataError(
                f"{labels_desc}: shape {labels_shape} differs from inputs {inputs_shape}; "
                "rebuild the dataset"
            )
        for desc, dtype in ((inputs_desc, inputs_dtype), (labels_desc, labels_dtype)):
            if not np.issubdtype(dtype, np.integer):
                raise DataError(f"{desc}: dtype {dtype} is not an integer type; rebuild it")

        identifiers = source.load(stored_name, "puzzle_identifiers", mmap=False)
        puzzle_indices = source.load(stored_name, "puzzle_indices", mmap=False)
        group_indices = source.load(stored_name, "group_indices", mmap=False)
        num_examples = inputs_shape[0]
        _check_indices(
            source, stored_name, "puzzle_indices", puzzle_indices, num_examples, "rows in inputs"
        )
        _check_indices(
            source,
            stored_name,
            "group_indices",
            group_indices,
            puzzle_indices.size - 1,
            "puzzles in puzzle_indices",
        )
        ids_desc = source.describe(stored_name, "puzzle_identifiers")
        if identifiers.shape != (puzzle_indices.size - 1,):
            raise DataError(
                f"{ids_desc}: shape {identifiers.shape} != ({puzzle_indices.size - 1},), one id "
                "per puzzle in puzzle_indices; rebuild the dataset"
            )
        if not np.issubdtype(identifiers.dtype, np.integer):
            raise DataError(f"{ids_desc}: dtype {identifiers.dtype} is not an integer type")
        bad = _bad_token(identifiers, metadata.num_puzzle_identifiers, None)
        if bad is not None:
            raise DataError(
                f"{ids_desc}: puzzle {bad} has identifier {int(identifiers[bad])} outside "
                f"[0, num_puzzle_identifiers={metadata.num_puzzle_identifiers}) of "
                f"{source.metadata_file}; rebuild the dataset or fix num_puzzle_identifiers"
            )
        offset = self.identifier_offsets[path_index]
        set_data = SetData(
            name=name,
            stored_name=stored_name,
            source=source,
            puzzle_identifiers=(identifiers.astype(np.int64) + offset).astype(np.int32),
            puzzle_indices=puzzle_indices.astype(np.int64),
            group_indices=group_indices.astype(np.int64),
            num_examples=num_examples,
            num_demos=_load_num_demos(source, stored_name, puzzle_indices),
        )
        for field in TOKEN_FIELDS:
            arr = self._tokens(set_data, field)
            row_bytes = max(1, arr.shape[1] * arr.itemsize)
            for lo, hi in _token_check_blocks(arr.shape[0], row_bytes):
                step = max(1, _TOKEN_CHECK_CHUNK_BYTES // row_bytes)
                for start in range(lo, hi, step):
                    rows = np.arange(start, min(hi, start + step))
                    self._check_tokens(set_data, field, arr[start : start + rows.size], rows)
        return set_data

    def _tokens(self, set_data: SetData, field: str) -> np.ndarray:
        """``field`` [N, seq_len] of one set, memory-mapped where the layout allows."""
        key = (set_data.name, field)
        if key not in self._token_arrays:
            self._token_arrays[key] = set_data.source.load(set_data.stored_name, field, mmap=True)
        return self._token_arrays[key]

    def __getstate__(self) -> dict[str, Any]:
        # Opened arrays stay behind: pickling a memmap would copy the whole file to the worker.
        state = self.__dict__.copy()
        state["_token_arrays"] = {}
        return state

    def _check_tokens(
        self, set_data: SetData, field: str, values: np.ndarray, rows: np.ndarray
    ) -> None:
        """Raise if ``values`` (rows ``rows`` of ``field``) hold an id outside the vocabulary."""
        metadata = self.metadata_per_path[0]
        allowed = metadata.ignore_label_id if field == "labels" else None
        bad = _bad_token(values, metadata.vocab_size, allowed)
        if bad is not None:
            row = int(rows[bad // values.shape[1]])
            value = int(values.ravel()[bad])
            raise DataError(
                f"{set_data.source.describe(set_data.stored_name, field)}: row {row} holds token "
                f"{value} outside [0, vocab_size={metadata.vocab_size}) of "
                f"{set_data.source.metadata_file}; rebuild the dataset or fix vocab_size"
            )

    def gather(
        self, set_data: SetData, field: str, rows: np.ndarray, *, contiguous: bool = False
    ) -> np.ndarray:
        """Rows ``rows`` (int [n]) of token field ``field`` of ``set_data``: [n, seq_len].

        The stored dtype, checked against the vocabulary (labels may also hold the dataset's
        ``ignore_label_id``). ``contiguous`` promises consecutive rows, read as one slice.
        """
        if field not in TOKEN_FIELDS:
            raise DataError(f"'{field}' is not a token field; choose one of {TOKEN_FIELDS}")
        arr = self._tokens(set_data, field)
        if contiguous and rows.size:
            values = np.asarray(arr[int(rows[0]) : int(rows[-1]) + 1])
        else:
            values = np.asarray(arr[rows])
        self._check_tokens(set_data, field, values, rows)
        return values
