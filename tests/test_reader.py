"""PuzzleReader: merged metadata, checked gathers, and copies that leave the memory maps behind."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

import dataset.common
import dataset.puzzle_dataset
from dataset.reader import PuzzleReader
from tests.test_puzzle_dataset import GROUPS, SEQ_LEN, VOCAB, make, set_token, write_split


def test_ignore_label_id_is_defined_once() -> None:
    assert dataset.puzzle_dataset.IGNORE_LABEL_ID is dataset.common.IGNORE_LABEL_ID == -100


def test_reader_exposes_what_the_dataset_exposes(tmp_path: Path) -> None:
    write_split(tmp_path / "a", "train")
    write_split(tmp_path / "b", "train", [[2], [1, 1]], base=500, num_puzzle_identifiers=9)
    paths = [tmp_path / "a", tmp_path / "b"]
    reader = PuzzleReader([str(p) for p in paths], "train")
    ds = make(paths, 4)
    assert reader.metadata == ds.metadata
    assert reader.metadata_per_path == ds.metadata_per_path
    assert reader.identifier_offsets == ds.identifier_offsets == [0, 12]
    assert [s.name for s in reader.sets] == ["all", "all1"]
    assert [s.num_groups for s in reader.sets] == [len(GROUPS), 2]
    np.testing.assert_array_equal(reader.sets[1].puzzle_identifiers, [13, 14, 15])


def test_gather_reads_rows_in_order_and_checks_them(tmp_path: Path) -> None:
    arrays = write_split(tmp_path, "train")
    set_token(tmp_path / "train/all__labels.npy", 5, VOCAB)
    with pytest.raises(ValueError, match=r"all__labels\.npy: row 5 .*vocab_size"):
        PuzzleReader([str(tmp_path)], "train")
    write_split(tmp_path, "train")
    reader = PuzzleReader([str(tmp_path)], "train")
    part = reader.sets[0]
    rows = np.array([9, 2, 4])
    np.testing.assert_array_equal(reader.gather(part, "inputs", rows), arrays["inputs"][rows])
    window = reader.gather(part, "labels", np.arange(3, 7), contiguous=True)
    assert window.shape == (4, SEQ_LEN) and window.dtype == arrays["labels"].dtype
    np.testing.assert_array_equal(window, arrays["labels"][3:7])
    assert reader.gather(part, "inputs", np.arange(0), contiguous=True).shape == (0, SEQ_LEN)
    with pytest.raises(ValueError, match="not a token field"):
        reader.gather(part, "puzzle_indices", rows)


def test_pickled_reader_leaves_memory_maps_behind(tmp_path: Path) -> None:
    arrays = write_split(tmp_path, "train")
    ds = make(tmp_path, 4)
    next(iter(ds))
    assert any(isinstance(a, np.memmap) for a in ds.reader._token_arrays.values())
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.reader._token_arrays == {}
    assert copy.sampler.sets[0] is copy.reader.sets[0]  # one copy of the index arrays
    np.testing.assert_array_equal(
        copy.reader.gather(copy.reader.sets[0], "inputs", np.arange(3)), arrays["inputs"][:3]
    )
