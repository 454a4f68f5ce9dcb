"""Turning a sampler's global batch into this rank's tensors: field builders in ``BATCH_FIELDS``.

Upstream's loader (upstream ``puzzle_dataset.py``, ``PuzzleDataset._collate_batch``) always builds
the same three fields. Here a model family asks for the fields it needs by name; each name is a
builder that reads one rank's rows and returns one padded array. A new field is one function::

    @BATCH_FIELDS.register("my_field")
    def build_my_field(source: BatchSource) -> np.ndarray: ...

in a module the registry imports on its first lookup (``dataset.demos`` holds the
demonstration fields ``demo_inputs``, ``demo_labels``, ``demo_mask`` and ``group_ids``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dataset.common import IGNORE_LABEL_ID, DataError, PuzzleDatasetMetadata
from dataset.reader import PuzzleReader, SetData
from dataset.sampling import BatchRows
from utils.registry import Registry

DEFAULT_FIELDS = ("inputs", "labels", "puzzle_identifiers")


@dataclass(frozen=True)
class BatchSource:
    """What a field builder reads: this rank's share of one global batch of one set.

    ``rows`` and ``puzzles`` are int64 [n], n <= local_batch_size (fewer in a short test
    window): example rows of ``set_data`` and the puzzle each belongs to. ``demo_rows`` is the
    sampler's int64 [n, K] choice of each row's demonstrations (-1: empty slot), or None when the
    sampler chooses none. A builder returns an array with ``local_batch_size`` rows, the rows past
    n being padding.
    """

    reader: PuzzleReader
    set_data: SetData
    rows: np.ndarray
    puzzles: np.ndarray
    contiguous: bool
    local_batch_size: int
    demo_rows: np.ndarray | None = None

    @property
    def metadata(self) -> PuzzleDatasetMetadata:
        return self.reader.metadata

    def gather(self, field: str) -> np.ndarray:
        """Token field ``field`` of ``rows``: [n, seq_len], stored dtype, range-checked."""
        return self.reader.gather(self.set_data, field, self.rows, contiguous=self.contiguous)

    def pad(self, values: np.ndarray, value: int) -> np.ndarray:
        """``values`` [n, ...] padded with ``value`` to [local_batch_size, ...]."""
        missing = self.local_batch_size - values.shape[0]
        if missing <= 0:
            return values
        widths = [(0, missing)] + [(0, 0)] * (values.ndim - 1)
        return np.pad(values, widths, constant_values=value)


FieldBuilder = Callable[[BatchSource], np.ndarray]
BATCH_FIELDS: Registry[FieldBuilder] = Registry(
    "batch field", modules=["dataset.demos", "dataset.hard_examples"]
)


@BATCH_FIELDS.register("inputs")
def build_inputs(source: BatchSource) -> np.ndarray:
    """int32 [local_batch_size, seq_len]; padding rows are ``pad_id``."""
    return source.pad(source.gather("inputs").astype(np.int32), source.metadata.pad_id)


@BATCH_FIELDS.register("labels")
def build_labels(source: BatchSource) -> np.ndarray:
    """int32 [local_batch_size, seq_len]; the dataset's ``ignore_label_id`` and padding are -100."""
    labels = source.gather("labels").astype(np.int32)
    ignore = source.metadata.ignore_label_id
    if ignore is not None:
        labels[labels == ignore] = IGNORE_LABEL_ID
    return source.pad(labels, IGNORE_LABEL_ID)


@BATCH_FIELDS.register("puzzle_identifiers")
def build_puzzle_identifiers(source: BatchSource) -> np.ndarray:
    """int32 [local_batch_size]; identifiers already offset per path, padding is the blank id."""
    identifiers = source.set_data.puzzle_identifiers[source.puzzles].astype(np.int32)
    return source.pad(identifiers, source.metadata.blank_identifier_id)


def resolve_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """Canonical names of ``fields``; a one-line ``ValueError`` for an unknown or repeated one."""
    names = tuple(BATCH_FIELDS.canonical(name) for name in fields)
    if len(set(names)) != len(names):
        raise DataError(f"batch fields {list(fields)} name a field twice")
    return names


class Collator:
    """Builds ``fields`` for rank ``rank``'s slice of each global batch.

    Rank r takes rows ``[r * local_batch_size, (r + 1) * local_batch_size)`` of the global batch
    (their demo rows too), so the ranks' batches concatenated are the single-process batch.
    Unknown or repeated field names raise a one-line ``ValueError`` here, before any batch is
    built.
    """

    def __init__(
        self,
        reader: PuzzleReader,
        *,
        local_batch_size: int,
        rank: int,
        fields: Sequence[str] = DEFAULT_FIELDS,
    ) -> None:
        self.fields = resolve_fields(fields)
        self.reader = reader
        self.local_batch_size = local_batch_size
        self.rank = rank

    def __call__(self, set_data: SetData, batch: BatchRows) -> dict[str, torch.Tensor]:
        """The fields of this rank's share of ``batch``, in the order of ``fields``."""
        local = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        source = BatchSource(
            self.reader,
            set_data,
            batch.rows[local],
            batch.puzzles[local],
            batch.contiguous,
            self.local_batch_size,
            None if batch.demo_rows is None else batch.demo_rows[local],
        )
        return {name: torch.from_numpy(BATCH_FIELDS.get(name)(source)) for name in self.fields}
