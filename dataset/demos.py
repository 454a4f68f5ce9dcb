"""The demonstration batch fields: each row's demo pairs, their mask and the row's task group.

Registered in ``dataset.collate.BATCH_FIELDS`` (the registry imports this module on its first
lookup), for models conditioned on demonstrations instead of a puzzle embedding (ETRM's batch
keys, ``dataset/fewshot_puzzle_dataset.py``, ``FewShotPuzzleDataset._collate_batch``):

* ``demo_inputs``, ``demo_labels``: int32 [b, K, seq_len], the demo pairs of each row in slot
  order, ``pad_id`` in empty slots. Labels keep their raw tokens (PAD stays ``pad_id``, it is not
  turned into -100), as ETRM: an encoder reads them, no loss does.
* ``demo_mask``: bool [b, K], True for the filled slots.
* ``group_ids``: int32 [b], the task group (index into the set's ``group_indices``) of each row,
  for the encoder's collapse diagnostics (augmented copies of one task share a group).

Which examples are a row's demos is the sampler's decision (``BatchRows.demo_rows``, K =
``max_demos``): the few-shot samplers of ``dataset.few_shot`` make it. Padding rows (a short test
window's tail, a rank's share past the real rows) have no demos, an all-False mask and group -1.
"""

from __future__ import annotations

import numpy as np

from dataset.collate import BATCH_FIELDS, BatchSource
from dataset.common import DataError

DEMO_FIELDS = ("demo_inputs", "demo_labels", "demo_mask", "group_ids")
PADDING_GROUP_ID = -1  # group 0 is a real task


def _demo_rows(source: BatchSource, field: str) -> np.ndarray:
    """This rank's int64 [n, K] demo rows (-1 empty); a one-line error when none were chosen."""
    if source.demo_rows is None:
        raise DataError(
            f"batch field '{field}' needs each row's demonstrations, which this sampler does "
            "not choose; use sampler few_shot (training) or few_shot_eval (evaluation)"
        )
    return source.demo_rows


def _gather_demos(source: BatchSource, field: str, token_field: str) -> np.ndarray:
    """Token field ``token_field`` of every demo slot: int32 [local_batch_size, K, seq_len]."""
    demo_rows = _demo_rows(source, field)
    n, k = demo_rows.shape
    meta = source.metadata
    out = np.full((source.local_batch_size, k, meta.seq_len), meta.pad_id, dtype=np.int32)
    filled = demo_rows >= 0
    if filled.any():
        # Queries of one puzzle share its demos: read each distinct row once, in file order.
        unique, inverse = np.unique(demo_rows[filled], return_inverse=True)
        values = source.reader.gather(source.set_data, token_field, unique)
        block = out[:n]
        block[filled] = values[inverse]
    return out


@BATCH_FIELDS.register("demo_inputs")
def build_demo_inputs(source: BatchSource) -> np.ndarray:
    """int32 [local_batch_size, K, seq_len]; empty slots and padding rows are ``pad_id``."""
    return _gather_demos(source, "demo_inputs", "inputs")


@BATCH_FIELDS.register("demo_labels")
def build_demo_labels(source: BatchSource) -> np.ndarray:
    """int32 [local_batch_size, K, seq_len], raw tokens (PAD is ``pad_id``, never -100)."""
    return _gather_demos(source, "demo_labels", "labels")


@BATCH_FIELDS.register("demo_mask")
def build_demo_mask(source: BatchSource) -> np.ndarray:
    """bool [local_batch_size, K]: True where a slot holds a demo; padding rows all False."""
    return source.pad(_demo_rows(source, "demo_mask") >= 0, False)


@BATCH_FIELDS.register("group_ids")
def build_group_ids(source: BatchSource) -> np.ndarray:
    """int32 [local_batch_size]: each row's task group in its set; padding rows are -1."""
    groups = np.searchsorted(source.set_data.group_indices, source.puzzles, side="right") - 1
    return source.pad(groups.astype(np.int32), PADDING_GROUP_ID)
