"""Collator: the requested batch fields only, refused names, and a field added by registration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.collate import BATCH_FIELDS, DEFAULT_FIELDS, BatchSource, Collator
from dataset.common import IGNORE_LABEL_ID
from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from dataset.reader import PuzzleReader
from dataset.sampling import BatchRows
from tests.test_puzzle_dataset import PAD, SEQ_LEN


def dataset(path: Path, test: bool = False, **changes: object) -> PuzzleDataset:
    config = PuzzleDatasetConfig(
        seed=2,
        dataset_paths=[str(path)],
        global_batch_size=6,
        test_set_mode=test,
        epochs_per_iter=2,
        **changes,
    )
    return PuzzleDataset(config, "test" if test else "train")


def test_default_fields_are_upstreams() -> None:
    assert DEFAULT_FIELDS == ("inputs", "labels", "puzzle_identifiers")
    demo_fields = ["demo_inputs", "demo_labels", "demo_mask", "group_ids"]
    assert BATCH_FIELDS.names() == sorted([*DEFAULT_FIELDS, *demo_fields, "puzzle_index"])


@pytest.mark.parametrize("test", [False, True])
@pytest.mark.parametrize(
    "fields", [["labels"], ["puzzle_identifiers", "inputs"], ["puzzle_identifiers"]]
)
def test_only_requested_fields_come_out(data: Path, test: bool, fields: list[str]) -> None:
    full = list(dataset(data, test))
    some = list(dataset(data, test, fields=fields))
    assert len(some) == len(full) > 0
    for (name, batch, effective), (full_name, full_batch, full_effective) in zip(
        some, full, strict=True
    ):
        assert (name, effective) == (full_name, full_effective)
        assert list(batch) == fields
        for key in fields:
            assert torch.equal(batch[key], full_batch[key])


def test_unknown_or_repeated_field_is_refused_in_one_line(tmp_path: Path) -> None:
    # Refused before any file is read: the path does not exist.
    with pytest.raises(ValueError) as info:
        dataset(tmp_path / "missing", fields=["inputs", "demo_outputs"])
    message = str(info.value)
    assert "\n" not in message
    assert "unknown batch field 'demo_outputs'" in message
    assert "inputs, labels, puzzle_identifiers" in message
    with pytest.raises(ValueError, match="twice"):
        dataset(tmp_path / "missing", fields=["labels", "labels"])
    with pytest.raises(ValueError, match="fields"):
        dataset(tmp_path / "missing", fields=[])


def test_collator_pads_and_slices_for_its_rank(data: Path) -> None:
    reader = PuzzleReader([str(data)], "test")
    # A short global batch of 5 rows for 2 ranks of 4: rank 1 gets one real row and 3 padding.
    rows = np.array([7, 8, 9, 10, 11])
    puzzles = np.searchsorted(reader.sets[0].puzzle_indices, rows, side="right") - 1
    batch = BatchRows(rows, puzzles, 5, contiguous=True)
    out = [Collator(reader, local_batch_size=4, rank=r)(reader.sets[0], batch) for r in (0, 1)]
    assert out[0]["inputs"][:, 0].tolist() == [8, 9, 10, 11]
    assert out[1]["inputs"][:, 0].tolist() == [12, PAD, PAD, PAD]
    assert (out[1]["labels"][1:] == IGNORE_LABEL_ID).all()
    assert out[1]["puzzle_identifiers"].tolist() == [int(puzzles[4]) + 1, 0, 0, 0]
    for part in out:
        assert part["inputs"].shape == part["labels"].shape == (4, SEQ_LEN)
        assert part["puzzle_identifiers"].shape == (4,)
        assert all(t.dtype == torch.int32 for t in part.values())


def build_inputs_and_labels(source: BatchSource) -> np.ndarray:
    """int32 [local_batch_size, 2 * seq_len]: a row's inputs followed by its labels."""
    both = np.concatenate([source.gather("inputs"), source.gather("labels")], axis=1)
    return source.pad(both.astype(np.int32), source.metadata.pad_id)


def test_a_registered_field_is_built_by_name(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BATCH_FIELDS, "_entries", {**BATCH_FIELDS._entries})
    BATCH_FIELDS.add("inputs_and_labels", build_inputs_and_labels)
    fields = ["inputs_and_labels", "labels"]
    for (_, batch, _), (_, full, _) in zip(
        dataset(data, True, fields=fields), dataset(data, True), strict=True
    ):
        assert list(batch) == ["inputs_and_labels", "labels"]
        assert batch["inputs_and_labels"].shape == (6, 2 * SEQ_LEN)
        assert torch.equal(batch["inputs_and_labels"][:, :SEQ_LEN], full["inputs"])
