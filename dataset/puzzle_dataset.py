"""Upstream's ``PuzzleDataset``: group-based sampling of puzzle examples, validated and resumable.

Layout (spec §5), per dataset path and split, whichever exists (the folder is preferred)::

    <path>/<split>/<set>__<field>.npy  + <path>/<split>/dataset.json   upstream layout, mmap-ed
    <path>/<split>.npz                 + <path>/<split>.json            packed, read into memory

``<field>`` is one of ``FIELDS``; the npz holds the same arrays under the keys ``<set>__<field>``
and ``<path>/<split>.json`` is that split's ``dataset.json``. Use the folder layout for large
datasets: only it is memory-mapped.

Sampling (spec §5) is upstream's, with these deliberate differences:

* Only explicitly seeded generators. The group order and the augmented variant picked per group
  come from ``Generator(Philox(seed + counter))`` exactly as upstream, so they equal upstream's
  for the same seed. The order of a picked puzzle's examples (upstream permutes them) and the
  random subset kept when fewer slots remain come from a second generator seeded by
  ``SeedSequence(seed + counter, spawn_key=(batch_index,))`` instead of the global
  ``np.random.choice``; drawing them from the first generator would shift every later variant
  pick away from upstream's, and keying them by batch lets a resumed run skip batches for free.
* Several ``dataset_paths`` get disjoint puzzle identifiers: path k's ids are offset by the sum of
  ``num_puzzle_identifiers`` of the paths before it (upstream's ids collide). Path k > 0 yields
  its sets as ``<set><k>`` (upstream's naming) and the merged ``metadata.sets`` lists every name
  actually yielded (upstream listed only the first path's).
* Inputs are validated when the dataset is built; see ``PuzzleDataset``.

Position: ``state_dict()`` records the iteration counter and how many batches of the current
iteration this object has yielded, so a new dataset given ``load_state_dict(state)`` continues
with exactly the batches the original iterator would have produced next.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch.utils.data import IterableDataset, get_worker_info

from dataset.common import FIELDS, PuzzleDatasetMetadata

# Label value the losses skip (upstream's models.losses.IGNORE_LABEL_ID).
IGNORE_LABEL_ID = -100
STATE_VERSION = 1

# Arrays up to this size get a full token-range check when the dataset is built; larger ones get
# evenly spaced row blocks of this total size there, and every batch is checked when gathered.
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
# State-dict fields that must match the loading dataset for a position to mean the same batches.
_STATE_CONFIG_FIELDS = ("seed", "global_batch_size", "epochs_per_iter", "test_set_mode")


class PuzzleDatasetConfig(BaseModel):
    """Upstream's loader config; ``epochs_per_iter`` epochs are batched into one iteration."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(ge=0)
    dataset_paths: list[str] = Field(min_length=1)
    global_batch_size: int = Field(gt=0)
    test_set_mode: bool
    epochs_per_iter: int = Field(gt=0)
    rank: int = Field(default=0, ge=0)
    num_replicas: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _check_replicas(self) -> PuzzleDatasetConfig:
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank {self.rank} must be < num_replicas {self.num_replicas}")
        if self.global_batch_size % self.num_replicas != 0:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a multiple of num_replicas "
                f"{self.num_replicas} (the world size); change global_batch_size"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Reading the two layouts
# ----------------------------------------------------------------------------------------------
def _read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if fortran_order and len(shape) > 1:
        raise ValueError("Fortran-ordered arrays are not supported")
    return tuple(shape), dtype


@dataclass(frozen=True)
class _SplitSource:
    """Where one dataset path's split lives: a folder of ``.npy`` files or one packed ``.npz``."""

    kind: Literal["npy", "npz"]
    location: Path  # the split folder, or the .npz file
    metadata_file: Path

    def describe(self, set_name: str, field: str) -> str:
        """The file (and for npz the key) named in error messages."""
        if self.kind == "npy":
            return str(self.location / f"{set_name}__{field}.npy")
        return f"{self.location}[{set_name}__{field}]"

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
            raise ValueError(
                f"{self.describe(set_name, field)}: unreadable array ({e}); rebuild the dataset"
            ) from e
        raise ValueError(
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
            raise ValueError(f"{desc}: unreadable array ({e}); rebuild the dataset") from e


def _find_source(dataset_path: str, split: str) -> _SplitSource:
    folder = Path(dataset_path) / split
    folder_metadata = folder / "dataset.json"
    packed = Path(dataset_path) / f"{split}.npz"
    if folder_metadata.is_file():
        return _SplitSource("npy", folder, folder_metadata)
    if packed.is_file():
        packed_metadata = Path(dataset_path) / f"{split}.json"
        if not packed_metadata.is_file():
            raise FileNotFoundError(
                f"{packed_metadata} is missing: the packed {packed} needs its split's "
                "dataset.json saved under that name"
            )
        return _SplitSource("npz", packed, packed_metadata)
    if folder.is_dir():
        raise FileNotFoundError(
            f"{folder_metadata} is missing; rebuild the dataset (the builder writes it last)"
        )
    raise FileNotFoundError(
        f"no '{split}' split in {dataset_path}: neither {folder_metadata} (.npy layout) nor "
        f"{packed} (packed) exists; build the dataset first or fix dataset_paths"
    )


def _load_metadata(source: _SplitSource) -> PuzzleDatasetMetadata:
    name = source.metadata_file
    try:
        raw = json.loads(name.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: unreadable dataset.json ({e}); rebuild the dataset") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: dataset.json must hold an object; rebuild the dataset")
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
        raise ValueError(f"{name}: invalid dataset.json ({problems}); rebuild the dataset") from e
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
            raise ValueError(f"{name}: invalid dataset.json ({problem}); rebuild the dataset")
    return metadata


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
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
    """Row ranges checked when a dataset is built: all rows, or evenly spaced blocks."""
    if rows * row_bytes <= FULL_TOKEN_CHECK_BYTES:
        return [(0, rows)]
    block_rows = max(1, FULL_TOKEN_CHECK_BYTES // (_TOKEN_CHECK_BLOCKS * row_bytes))
    starts = np.linspace(0, rows - block_rows, _TOKEN_CHECK_BLOCKS).astype(np.int64)
    return [(int(s), int(s) + block_rows) for s in np.unique(starts)]


def _check_indices(
    source: _SplitSource, set_name: str, field: str, arr: np.ndarray, end: int, end_what: str
) -> None:
    desc = source.describe(set_name, field)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{desc}: expected a non-empty 1-D integer array, got {arr.dtype} {arr.shape}; "
            "rebuild the dataset"
        )
    if int(arr[0]) != 0:
        raise ValueError(f"{desc}: must start at 0, starts at {int(arr[0])}; rebuild the dataset")
    steps = np.diff(arr.astype(np.int64))
    # A group without puzzles cannot be sampled (upstream's rng.integers(lo, lo) would fail).
    strict = field == "group_indices"
    wrong = np.flatnonzero(steps <= 0 if strict else steps < 0)
    if wrong.size:
        order = "strictly increasing" if strict else "non-decreasing"
        raise ValueError(
            f"{desc}: must be {order}, entry {int(wrong[0]) + 1} is {int(arr[wrong[0] + 1])} "
            f"after {int(arr[wrong[0]])}; rebuild the dataset"
        )
    if int(arr[-1]) != end:
        raise ValueError(
            f"{desc}: last value {int(arr[-1])} != {end} ({end_what}); the arrays come from "
            "different builds, rebuild the dataset"
        )


@dataclass
class _SetData:
    """One yielded set: index arrays in memory (identifiers already offset), tokens lazily."""

    name: str  # the yielded name: "<set>" for the first path, "<set><k>" for path k
    stored_name: str  # the name in the files
    source: _SplitSource
    puzzle_identifiers: np.ndarray  # int32 [P]
    puzzle_indices: np.ndarray  # int64 [P+1], example offsets per puzzle
    group_indices: np.ndarray  # int64 [G+1], puzzle offsets per group
    num_examples: int

    @property
    def num_groups(self) -> int:
        return self.group_indices.size - 1


@dataclass
class _TrainPlan:
    """One set's sampling for one iteration: the variant picked per visited group, packed."""

    counter: int  # upstream's _iters for this set: seeds the generators
    picks: np.ndarray  # int64 [V], puzzle index per visited group, in group order
    cum: np.ndarray  # int64 [V+1], examples of the visits before each visit
    bounds: np.ndarray  # int64 [B+1], batch b holds visits bounds[b] .. bounds[b+1]-1

    @property
    def num_batches(self) -> int:
        return self.bounds.size - 1


@dataclass(frozen=True)
class _Position:
    """Where the next batch comes from.

    ``iters`` is the counter before the iteration started; set ``set_index`` of that iteration
    uses counter ``iters + set_index + 1`` and ``batches_done`` of its batches are already out.
    """

    iters: int
    set_index: int
    batches_done: int


class PuzzleDataset(IterableDataset):
    """Iterable over ``(set_name, batch, global_effective_batch_size)``.

    ``batch`` maps ``"inputs"`` and ``"labels"`` to int32 ``[local_batch_size, seq_len]`` and
    ``"puzzle_identifiers"`` to int32 ``[local_batch_size]`` tensors, where
    ``local_batch_size = global_batch_size // num_replicas``. Labels equal to
    ``ignore_label_id`` are -100; rows past the real ones are padding (``pad_id`` inputs, -100
    labels, ``blank_identifier_id``).

    Train mode: each ``__iter__`` is one iteration of ``epochs_per_iter`` epochs; an epoch visits
    every group once (random order) and adds all examples of one random puzzle of the group.
    Every batch is full (``global_effective_batch_size == global_batch_size``); the last short
    one is dropped. Test mode: every example once, in order, in windows of ``global_batch_size``
    (``global_effective_batch_size`` = the window's size).

    Built datasets are validated: missing files, unreadable metadata, inconsistent shapes and
    index arrays, puzzle identifiers outside ``[0, num_puzzle_identifiers)``, token ids outside
    ``[0, vocab_size)`` and metadata that differs between ``dataset_paths`` raise one
    ``FileNotFoundError``/``ValueError`` naming the file. Token ids are fully checked for arrays
    up to ``FULL_TOKEN_CHECK_BYTES`` and sampled in evenly spaced blocks beyond that (ARC's
    3.2 GB would cost seconds to minutes on every start); every gathered batch is checked too,
    so a bad id never reaches the model.

    The position in ``state_dict()`` counts batches yielded by this object. A training loop
    that prefetches through DataLoader workers iterates a copy in the worker, so it must count
    the batches it consumed itself and store ``state_at(iterations, batches)``. A fresh ``__iter__``
    starts a new iteration (train) or the first batch (test), as upstream; only the first
    ``__iter__`` after ``load_state_dict`` resumes mid-iteration. Use one iterator at a time.
    """

    def __init__(self, config: PuzzleDatasetConfig, split: str = "train") -> None:
        super().__init__()
        # Re-validate: a config mutated after construction must not slip through.
        self.config = PuzzleDatasetConfig.model_validate(config.model_dump())
        self.split = split
        self.local_batch_size = self.config.global_batch_size // self.config.num_replicas
        self._token_arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        sources = [_find_source(p, split) for p in self.config.dataset_paths]
        metadatas = [_load_metadata(s) for s in sources]
        first = metadatas[0]
        for source, metadata in zip(sources[1:], metadatas[1:], strict=True):
            for field in _SHARED_METADATA_FIELDS:
                if getattr(metadata, field) != getattr(first, field):
                    raise ValueError(
                        f"{source.metadata_file}: {field} {getattr(metadata, field)!r} differs "
                        f"from {getattr(first, field)!r} in {sources[0].metadata_file}; "
                        "dataset_paths must be built with the same tokenizer and seq_len"
                    )
        self.metadata_per_path = metadatas
        # Path k's identifiers follow those of the paths before it (upstream's collide).
        self.identifier_offsets = [
            int(x) for x in np.cumsum([0] + [m.num_puzzle_identifiers for m in metadatas[:-1]])
        ]

        # Upstream's order: sets outer, paths inner; path k > 0 names its sets "<set><k>".
        set_order = list(dict.fromkeys(s for m in metadatas for s in m.sets))
        layout = [
            (stored_name, k, stored_name if k == 0 else f"{stored_name}{k}")
            for stored_name in set_order
            for k, metadata in enumerate(metadatas)
            if stored_name in metadata.sets
        ]
        names = [name for _, _, name in layout]
        if len(set(names)) != len(names):
            raise ValueError(
                f"set names {names} collide after renaming path k's sets to '<set><k>'; "
                "rename the sets in the dataset.json files"
            )
        self._sets = [
            self._load_set(sources[k], metadatas[k], stored_name, name, k)
            for stored_name, k, name in layout
        ]

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

        self._iters = 0  # upstream's counter: +1 per set per train iteration
        self._position = _Position(0, 0, 0)
        self._pending: _Position | None = None

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    def _load_set(
        self,
        source: _SplitSource,
        metadata: PuzzleDatasetMetadata,
        stored_name: str,
        name: str,
        path_index: int,
    ) -> _SetData:
        shapes = {f: source.header(stored_name, f) for f in FIELDS}
        inputs_shape, inputs_dtype = shapes["inputs"]
        labels_shape, labels_dtype = shapes["labels"]
        inputs_desc = source.describe(stored_name, "inputs")
        labels_desc = source.describe(stored_name, "labels")
        if len(inputs_shape) != 2 or inputs_shape[1] != metadata.seq_len:
            raise ValueError(
                f"{inputs_desc}: shape {inputs_shape} is not [N, seq_len={metadata.seq_len}] "
                f"of {source.metadata_file}; rebuild the dataset"
            )
        if labels_shape != inputs_shape:
            raise ValueError(
                f"{labels_desc}: shape {labels_shape} differs from inputs {inputs_shape}; "
                "rebuild the dataset"
            )
        for desc, dtype in ((inputs_desc, inputs_dtype), (labels_desc, labels_dtype)):
            if not np.issubdtype(dtype, np.integer):
                raise ValueError(f"{desc}: dtype {dtype} is not an integer type; rebuild it")

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
            raise ValueError(
                f"{ids_desc}: shape {identifiers.shape} != ({puzzle_indices.size - 1},), one id "
                "per puzzle in puzzle_indices; rebuild the dataset"
            )
        if not np.issubdtype(identifiers.dtype, np.integer):
            raise ValueError(f"{ids_desc}: dtype {identifiers.dtype} is not an integer type")
        bad = _bad_token(identifiers, metadata.num_puzzle_identifiers, None)
        if bad is not None:
            raise ValueError(
                f"{ids_desc}: puzzle {bad} has identifier {int(identifiers[bad])} outside "
                f"[0, num_puzzle_identifiers={metadata.num_puzzle_identifiers}) of "
                f"{source.metadata_file}; rebuild the dataset or fix num_puzzle_identifiers"
            )
        offset = self.identifier_offsets[path_index]
        set_data = _SetData(
            name=name,
            stored_name=stored_name,
            source=source,
            puzzle_identifiers=(identifiers.astype(np.int64) + offset).astype(np.int32),
            puzzle_indices=puzzle_indices.astype(np.int64),
            group_indices=group_indices.astype(np.int64),
            num_examples=num_examples,
        )
        for field, arr in zip(("inputs", "labels"), self._tokens(set_data), strict=True):
            row_bytes = max(1, arr.shape[1] * arr.itemsize)
            for lo, hi in _token_check_blocks(arr.shape[0], row_bytes):
                step = max(1, _TOKEN_CHECK_CHUNK_BYTES // row_bytes)
                for start in range(lo, hi, step):
                    rows = np.arange(start, min(hi, start + step))
                    self._check_tokens(set_data, field, arr[start : start + rows.size], rows)
        return set_data

    def _tokens(self, set_data: _SetData) -> tuple[np.ndarray, np.ndarray]:
        """``inputs`` [N, seq_len] and ``labels`` of one set; reopened after unpickling."""
        if set_data.name not in self._token_arrays:
            self._token_arrays[set_data.name] = (
                set_data.source.load(set_data.stored_name, "inputs", mmap=True),
                set_data.source.load(set_data.stored_name, "labels", mmap=True),
            )
        return self._token_arrays[set_data.name]

    def __getstate__(self) -> dict[str, Any]:
        # Opened arrays stay behind: pickling a memmap would copy the whole file to the worker.
        state = self.__dict__.copy()
        state["_token_arrays"] = {}
        return state

    def _check_tokens(
        self, set_data: _SetData, field: str, values: np.ndarray, rows: np.ndarray
    ) -> None:
        """Raise if ``values`` (rows ``rows`` of ``field``) hold an id outside the vocabulary."""
        metadata = self.metadata_per_path[0]
        allowed = metadata.ignore_label_id if field == "labels" else None
        bad = _bad_token(values, metadata.vocab_size, allowed)
        if bad is not None:
            row = int(rows[bad // values.shape[1]])
            value = int(values.ravel()[bad])
            raise ValueError(
                f"{set_data.source.describe(set_data.stored_name, field)}: row {row} holds token "
                f"{value} outside [0, vocab_size={metadata.vocab_size}) of "
                f"{set_data.source.metadata_file}; rebuild the dataset or fix vocab_size"
            )

    # ------------------------------------------------------------------------------------------
    # Batches
    # ------------------------------------------------------------------------------------------
    def _collate(
        self, set_data: _SetData, rows: np.ndarray, puzzles: np.ndarray, contiguous: bool
    ) -> dict[str, torch.Tensor]:
        """Gather examples ``rows`` [n] of puzzles ``puzzles`` [n] into a padded local batch."""
        inputs_all, labels_all = self._tokens(set_data)
        if contiguous and rows.size:
            window = slice(int(rows[0]), int(rows[-1]) + 1)
            inputs, labels = np.asarray(inputs_all[window]), np.asarray(labels_all[window])
        else:
            inputs, labels = np.asarray(inputs_all[rows]), np.asarray(labels_all[rows])
        self._check_tokens(set_data, "inputs", inputs, rows)
        self._check_tokens(set_data, "labels", labels, rows)

        inputs = inputs.astype(np.int32)
        labels = labels.astype(np.int32)
        identifiers = set_data.puzzle_identifiers[puzzles].astype(np.int32)
        if self.metadata.ignore_label_id is not None:
            labels[labels == self.metadata.ignore_label_id] = IGNORE_LABEL_ID

        pad = self.local_batch_size - rows.size
        if pad > 0:
            inputs = np.pad(inputs, ((0, pad), (0, 0)), constant_values=self.metadata.pad_id)
            labels = np.pad(labels, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL_ID)
            identifiers = np.pad(
                identifiers, (0, pad), constant_values=self.metadata.blank_identifier_id
            )
        return {
            "inputs": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "puzzle_identifiers": torch.from_numpy(identifiers),
        }

    def _train_plan(self, set_data: _SetData, counter: int) -> _TrainPlan:
        """Upstream's group order, variant picks and greedy packing for one set and counter."""
        rng = np.random.Generator(np.random.Philox(seed=self.config.seed + counter))
        group_order = np.concatenate(
            [rng.permutation(set_data.num_groups) for _ in range(self.config.epochs_per_iter)]
        )
        groups = set_data.group_indices
        # One bounded draw per visit in order: the same stream as upstream's per-group calls.
        picks = rng.integers(groups[group_order], groups[group_order + 1]).astype(np.int64)
        sizes = set_data.puzzle_indices[picks + 1] - set_data.puzzle_indices[picks]
        cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        # A batch takes whole visits until full; the visit that fills it is trimmed, and the next
        # batch starts at the following visit. A short final batch is dropped.
        gbs = self.config.global_batch_size
        bounds = [0]
        while int(cum[-1]) - int(cum[bounds[-1]]) >= gbs:
            bounds.append(int(np.searchsorted(cum, cum[bounds[-1]] + gbs, side="left")))
        return _TrainPlan(counter, picks, cum, np.asarray(bounds, dtype=np.int64))

    def _train_batch(
        self, set_data: _SetData, plan: _TrainPlan, batch_index: int
    ) -> dict[str, torch.Tensor]:
        lo, hi = int(plan.bounds[batch_index]), int(plan.bounds[batch_index + 1])
        picks = plan.picks[lo:hi]
        sizes = np.diff(plan.cum[lo : hi + 1])
        total = int(plan.cum[hi] - plan.cum[lo])
        visit = np.repeat(np.arange(hi - lo), sizes)
        first_example = np.repeat(set_data.puzzle_indices[picks], sizes)
        offset_in_visit = np.arange(total) - np.repeat(plan.cum[lo:hi] - plan.cum[lo], sizes)

        # Upstream adds a random permutation of each puzzle's examples (a random subset for the
        # visit that fills the batch): sort random keys within each visit, keep the first gbs.
        seed = np.random.SeedSequence(self.config.seed + plan.counter, spawn_key=(batch_index,))
        keys = np.random.Generator(np.random.Philox(seed)).random(total)
        order = np.lexsort((keys, visit))
        gbs = self.config.global_batch_size
        rows = (first_example + offset_in_visit)[order][:gbs]
        puzzles = np.repeat(picks, sizes)[:gbs]

        local = slice(
            self.config.rank * self.local_batch_size, (self.config.rank + 1) * self.local_batch_size
        )
        return self._collate(set_data, rows[local], puzzles[local], contiguous=False)

    def _iter_train(
        self, resume: _Position | None
    ) -> Iterator[tuple[str, dict[str, torch.Tensor], int]]:
        base = resume.iters if resume is not None else self._iters
        first_set = resume.set_index if resume is not None else 0
        skip = resume.batches_done if resume is not None else 0
        n_sets = len(self._sets)
        self._position = _Position(base, first_set, skip)
        plans: dict[int, _TrainPlan] = {}

        def plan(s: int) -> _TrainPlan:
            if s not in plans:
                plans[s] = self._train_plan(self._sets[s], base + s + 1)
            return plans[s]

        for s in range(first_set, n_sets):
            self._iters = base + s + 1  # upstream: _iters += 1 for every set
            set_plan = plan(s)
            for b in range(skip if s == first_set else 0, set_plan.num_batches):
                batch = self._train_batch(self._sets[s], set_plan, b)
                # Record the position after this batch before handing it out: a checkpoint may be
                # taken while the generator waits at the yield.
                self._position = self._position_after(base, s, b + 1, lambda t: plan(t).num_batches)
                yield self._sets[s].name, batch, self.config.global_batch_size
            plans.pop(s, None)
        self._iters = base + n_sets
        self._position = _Position(base + n_sets, 0, 0)

    def _position_after(
        self, iters: int, set_index: int, batches_done: int, num_batches: Callable[[int], int]
    ) -> _Position:
        """The position once ``batches_done`` batches of set ``set_index`` are out.

        ``num_batches(t)`` counts set t's batches in this iteration. A finished set moves on to
        the next set with batches; when none is left the iteration counts as finished, so that a
        resumed loop's next ``__iter__`` starts a whole new iteration instead of an empty one.
        """
        if batches_done < num_batches(set_index):
            return _Position(iters, set_index, batches_done)
        for t in range(set_index + 1, len(self._sets)):
            if num_batches(t):
                return _Position(iters, t, 0)
        if self.config.test_set_mode:
            return _Position(iters, 0, 0)
        return _Position(iters + len(self._sets), 0, 0)

    def _num_test_windows(self, s: int) -> int:
        return math.ceil(self._sets[s].num_examples / self.config.global_batch_size)

    def _iter_test(
        self, resume: _Position | None
    ) -> Iterator[tuple[str, dict[str, torch.Tensor], int]]:
        first_set = resume.set_index if resume is not None else 0
        skip = resume.batches_done if resume is not None else 0
        n_sets = len(self._sets)
        gbs, lbs, rank = self.config.global_batch_size, self.local_batch_size, self.config.rank
        self._position = _Position(self._iters, first_set, skip)
        for s in range(first_set, n_sets):
            set_data = self._sets[s]
            n_windows = self._num_test_windows(s)
            for w in range(skip if s == first_set else 0, n_windows):
                start = w * gbs
                end = min(set_data.num_examples, start + gbs)
                local_start = start + rank * lbs
                local_end = max(local_start, min(start + (rank + 1) * lbs, end))
                rows = np.arange(local_start, local_end)
                puzzles = np.searchsorted(set_data.puzzle_indices, rows, side="right") - 1
                batch = self._collate(set_data, rows, puzzles, contiguous=True)
                self._position = self._position_after(self._iters, s, w + 1, self._num_test_windows)
                yield set_data.name, batch, end - start
        self._position = _Position(self._iters, 0, 0)

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor], int]]:
        worker_info = get_worker_info()
        if worker_info is not None and worker_info.num_workers > 1:
            raise RuntimeError(
                f"PuzzleDataset supports at most one DataLoader worker, got "
                f"{worker_info.num_workers}; set num_workers to 0 or 1"
            )
        resume, self._pending = self._pending, None
        if self.config.test_set_mode:
            return self._iter_test(resume)
        return self._iter_train(resume)

    # ------------------------------------------------------------------------------------------
    # Position
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch this object yielded (plain ints, strs and lists)."""
        return self._state(self._pending if self._pending is not None else self._position)

    def _state(self, position: _Position) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **{field: getattr(self.config, field) for field in _STATE_CONFIG_FIELDS},
            "sets": [s.name for s in self._sets],
            "iters": position.iters,
            "set_index": position.set_index,
            "batches_done": position.batches_done,
        }

    def _batch_counter(self, iteration: int) -> tuple[int, Callable[[int], int]]:
        """Counter before ``iteration`` (0-based, from a fresh dataset) and batches per set."""
        if self.config.test_set_mode:
            return self._iters, self._num_test_windows
        base = iteration * len(self._sets)
        counts: dict[int, int] = {}

        def count(t: int) -> int:
            if t not in counts:
                counts[t] = self._train_plan(self._sets[t], base + t + 1).num_batches
            return counts[t]

        return base, count

    def num_batches(self, iteration: int = 0) -> int:
        """Batches (per rank, the same on every rank) of iteration ``iteration`` (0-based).

        Train mode: random, because the picked variants differ in size; test mode: the same
        for every iteration. Costs one sampling plan per set.
        """
        _, count = self._batch_counter(iteration)
        return sum(count(t) for t in range(len(self._sets)))

    def state_at(self, iterations: int, batches: int) -> dict[str, Any]:
        """The ``state_dict()`` of a fresh dataset with this configuration after ``iterations``
        whole iterations and ``batches`` batches of the next one.

        For training loops that iterate a copy in a DataLoader worker and count consumed batches
        themselves (``iterations`` is ignored in test mode).
        """
        if iterations < 0 or batches < 0:
            raise ValueError(f"iterations {iterations} and batches {batches} must be >= 0")
        base, count = self._batch_counter(iterations)
        position = _Position(base, 0, 0)
        remaining = batches
        for t in range(len(self._sets)):
            if remaining <= count(t):
                if remaining > 0:
                    position = self._position_after(base, t, remaining, count)
                remaining = 0
                break
            remaining -= count(t)
        if remaining > 0:
            raise ValueError(
                f"iteration {iterations} has only {batches - remaining} batches, not {batches}"
            )
        return self._state(position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``__iter__`` continue where the dataset that saved ``state`` stood.

        ``rank`` and ``num_replicas`` may differ: the global batches stay the same.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"dataset state version {state.get('version')!r} is not {STATE_VERSION}; "
                "it was saved by an incompatible PuzzleDataset"
            )
        expected = {field: getattr(self.config, field) for field in _STATE_CONFIG_FIELDS}
        expected["sets"] = [s.name for s in self._sets]
        for field, value in expected.items():
            if state.get(field) != value:
                raise ValueError(
                    f"dataset state has {field}={state.get(field)!r} but this dataset has "
                    f"{value!r}; resume with the configuration the state was saved with"
                )
        position = _Position(
            int(state["iters"]), int(state["set_index"]), int(state["batches_done"])
        )
        if position.iters < 0 or not 0 <= position.set_index <= len(self._sets):
            raise ValueError(f"dataset state position {position} is out of range")
        if position.batches_done < 0:
            raise ValueError(f"dataset state position {position} is out of range")
        self._iters = position.iters
        self._position = position
        self._pending = position
