"""Shared test settings. ``TRM_TEST_DEVICE=cuda pytest -m "not slow"`` runs the device-aware
tests on a GPU; the default is the CPU."""

from __future__ import annotations

import os

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
