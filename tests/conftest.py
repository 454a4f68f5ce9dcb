"""Shared test settings. ``TRM_TEST_DEVICE=cuda pytest -m "not slow"`` runs the device-aware
tests on a GPU; the default is the CPU."""

from __future__ import annotations

import os

import pytest
import torch

TEST_DEVICE = torch.device(os.environ.get("TRM_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    return TEST_DEVICE
