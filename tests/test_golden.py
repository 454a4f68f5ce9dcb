"""Training and evaluation reproduce the golden per-step numbers (``tests/golden_runs.py``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import golden_runs

GOLDEN = json.loads(golden_runs.GOLDEN_FILE.read_text())
SAME_MACHINE_CLASS = GOLDEN["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return golden_runs.build_data(tmp_path_factory.mktemp("golden"))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_matches(got: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_matches(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_matches(g, e, f"{where}[{i}]")
    elif SAME_MACHINE_CLASS or isinstance(expected, int) or not math.isfinite(expected):
        assert got == expected, f"{where}: {got!r} != golden {expected!r}"
    else:
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), where


def test_golden_file_covers_every_case() -> None:
    assert GOLDEN["steps"].keys() == golden_runs.CASES.keys()
    assert all(len(steps) == golden_runs.STEPS for steps in GOLDEN["steps"].values())


@pytest.mark.parametrize("name", list(golden_runs.CASES))
def test_training_steps_match_the_golden_numbers(name: str, data: Path, tmp_path: Path) -> None:
    steps = golden_runs.run_case(name, data, tmp_path)
    assert_matches(steps, GOLDEN["steps"][name], name)
    if name == golden_runs.EVAL_CASE:
        checkpoint = tmp_path / f"step_{golden_runs.STEPS}"
        assert_matches(golden_runs.eval_checkpoint(data, checkpoint), GOLDEN["eval"], "eval")
