"""Samplers: the registry, the schedule length they report and a sampler plugged in by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from dataset.reader import PuzzleReader
from dataset.sampling import SAMPLERS, BatchRows, Sampler, SetPlan, UniformSampler
from tests.test_puzzle_dataset import (
    consume,
    examples_of,
    make,
    one_iteration,
    same_batches,
    upstream_plan,
    write_split,
)
from utils.schema import ConfigError


def config(path: Path, **changes: object) -> PuzzleDatasetConfig:
    fields: dict[str, object] = {
        "seed": 0,
        "dataset_paths": [str(path)],
        "global_batch_size": 4,
        "test_set_mode": False,
        "epochs_per_iter": 1,
    }
    return PuzzleDatasetConfig(**{**fields, **changes})


def test_registry_names_and_unknown_sampler_is_one_line(tmp_path: Path) -> None:
    assert SAMPLERS.names() == [
        "few_shot",
        "few_shot_eval",
        "hard_examples",
        "sequential",
        "uniform",
    ]
    # Refused before any file is read: the path does not exist.
    with pytest.raises(ValueError) as info:
        PuzzleDataset(config(tmp_path / "missing", sampler="fewshots"))
    message = str(info.value)
    assert "\n" not in message
    assert "unknown sampler 'fewshots'" in message
    assert "few_shot, few_shot_eval, hard_examples, sequential, uniform" in message


def test_uniform_total_steps_is_upstreams_formula(tmp_path: Path) -> None:
    write_split(tmp_path / "a", "train")
    # GROUPS: 6 groups, 11 puzzles, 25 examples.
    ds = make(tmp_path / "a", 8, epochs=3)
    assert ds.metadata.total_groups == 6 and ds.metadata.mean_puzzle_examples == 25 / 11
    for epochs in (1, 7, 100, 20000):
        assert ds.total_steps(epochs) == int(epochs * 6 * (25 / 11) / 8)
    assert ds.total_steps(100) == 170  # 15000 / 88 = 170.45...

    # Two paths: groups summed, mean_puzzle_examples weighted by puzzles (5 puzzles, 15 examples).
    write_split(tmp_path / "b", "train", [[2, 2], [3], [1, 7]], base=500)
    two = make([tmp_path / "a", tmp_path / "b"], 6)
    mean = (25 / 11 * 11 + 3.0 * 5) / 16
    assert two.metadata.mean_puzzle_examples == mean
    for epochs in (1, 9, 5000):
        assert two.total_steps(epochs) == int(epochs * 9 * mean / 6)


def test_uniform_total_steps_multiplies_left_to_right_as_upstream(tmp_path: Path) -> None:
    """``int(epochs * total_groups * mean_puzzle_examples / gbs)`` in upstream's order: for
    these figures epochs * (groups * mean) rounds to one step fewer (3162067)."""
    write_split(tmp_path / "a", "train")
    ds = make(tmp_path / "a", 8)
    metadata = ds.metadata.model_copy(update={"total_groups": 1625, "mean_puzzle_examples": 4.3008})
    sampler = UniformSampler(ds.sampler.sets, metadata, seed=0, global_batch_size=192,
                             epochs_per_iter=1)  # fmt: skip
    assert 86870 * 1625 * 4.3008 / 192 != 86870 * (1625 * 4.3008) / 192
    assert sampler.total_steps(86870) == 3162068


def test_sequential_total_steps_counts_its_windows(data: Path) -> None:
    ds = make(data, 8, test=True)
    passes = len(one_iteration(ds))
    assert passes == 4  # 25 examples in windows of 8
    assert ds.num_batches(0) == passes and ds.total_steps(3) == 3 * passes


def test_sampler_num_batches_matches_what_it_yields(data: Path) -> None:
    reader = PuzzleReader([str(data)], "train")
    sampler = UniformSampler(
        reader.sets, reader.metadata, seed=3, global_batch_size=5, epochs_per_iter=2
    )
    ds = make(data, 5, seed=3, epochs=2)
    for iteration in range(3):
        expected = len(upstream_plan(3, iteration + 1, 2, 5))
        assert sampler.num_batches(iteration) == expected == len(one_iteration(ds))
        assert ds.num_batches(iteration) == expected


def test_mode_default_sampler_keeps_the_state_format(data: Path) -> None:
    for test in (False, True):
        default = PuzzleDataset(config(data, test_set_mode=test), "test" if test else "train")
        named = PuzzleDataset(
            config(data, test_set_mode=test, sampler="sequential" if test else "uniform"),
            "test" if test else "train",
        )
        assert named.state_dict() == default.state_dict()
        assert "sampler" not in default.state_dict()


def test_another_sampler_is_recorded_in_the_state(data: Path) -> None:
    sequential = PuzzleDataset(config(data, sampler="sequential"))
    uniform = PuzzleDataset(config(data))
    # Windows of the train split, the same every iteration: the counter does not move.
    first = one_iteration(sequential)
    assert [effective for _, _, effective in first] == [4] * 6 + [1]
    assert len(one_iteration(sequential)) == len(first)
    state = sequential.state_dict()
    assert state["sampler"] == "sequential" and state["iters"] == 0
    with pytest.raises(ValueError, match="sampler='sequential'"):
        uniform.load_state_dict(state)
    with pytest.raises(ValueError, match="sampler='uniform'"):
        sequential.load_state_dict(uniform.state_dict())


class _FirstBatchPlan(SetPlan):
    def __init__(self, num_examples: int, gbs: int) -> None:
        self.size = min(num_examples, gbs)

    @property
    def num_batches(self) -> int:
        return 1

    def batch(self, index: int) -> BatchRows:
        rows = np.arange(self.size)[::-1].copy()
        return BatchRows(rows, np.zeros(self.size, dtype=np.int64), self.size, contiguous=False)


class _FirstBatchSampler(Sampler):
    """The first examples of each set, reversed: a stand-in for a future sampler."""

    counter_step = 0

    def plan(self, set_index: int, counter: int) -> SetPlan:
        return _FirstBatchPlan(self.sets[set_index].num_examples, self.global_batch_size)

    def total_steps(self, epochs: int) -> int:
        return epochs * len(self.sets)


def test_a_registered_sampler_is_used_by_name(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SAMPLERS, "_entries", {**SAMPLERS._entries, "first": _FirstBatchSampler})
    ds = PuzzleDataset(config(data, sampler="first"))
    assert ds.total_steps(5) == 5
    ((name, batch, effective),) = one_iteration(ds)
    assert name == "all" and effective == 4
    assert batch["inputs"][:, 0].tolist() == [4, 3, 2, 1]
    assert batch["puzzle_identifiers"].tolist() == [1, 1, 1, 1]
    assert ds.state_dict()["sampler"] == "first"


# ----------------------------------------------------------------------------------------------
# max_groups: the first N groups of each set
# ----------------------------------------------------------------------------------------------
# GROUPS' first two groups: puzzles 0-2 (3, 1, 2 examples) and 3 (2): rows 0-7.
FIRST_TWO_ROWS = 8


@pytest.mark.parametrize("gbs", [3, 8])
def test_sequential_max_groups_passes_the_first_groups_rows(data: Path, gbs: int) -> None:
    ds = PuzzleDataset(config(data, test_set_mode=True, global_batch_size=gbs,
                              sampler_options={"max_groups": 2}), "test")  # fmt: skip
    batches = one_iteration(ds)
    rows = np.concatenate([examples_of(b)[:effective] for _, b, effective in batches])
    assert rows.tolist() == list(range(FIRST_TWO_ROWS))
    assert [effective for _, _, effective in batches] == ([3, 3, 2] if gbs == 3 else [8])
    ids = np.concatenate([b["puzzle_identifiers"][:e].numpy() for _, b, e in batches])
    assert ids.tolist() == [1, 1, 1, 2, 3, 3, 4, 4]  # puzzle p has identifier p + 1
    assert ds.num_batches(0) == len(batches) and ds.total_steps(2) == 2 * len(batches)
    # As many groups as the set has, or more: every row, as without the option.
    every = one_iteration(make(data, gbs, test=True))
    for n in (6, 100):
        full = PuzzleDataset(config(data, test_set_mode=True, global_batch_size=gbs,
                                    sampler_options={"max_groups": n}), "test")  # fmt: skip
        assert same_batches(one_iteration(full), every)


def test_uniform_max_groups_trains_on_the_first_groups(data: Path) -> None:
    limited = PuzzleDataset(config(data, global_batch_size=2, epochs_per_iter=4,
                                   sampler_options={"max_groups": 2}))  # fmt: skip
    rows = np.concatenate([examples_of(b) for _, b, _ in one_iteration(limited)])
    assert rows.max() < FIRST_TWO_ROWS and set(rows.tolist()) >= {6, 7}  # group 1's puzzle
    # Upstream's estimate over the kept groups: 2 groups of mean puzzle size 8 / 4 examples.
    for epochs in (1, 5, 333):
        assert limited.total_steps(epochs) == int(epochs * 2 * (8 / 4) / 2)
    # Keeping every group is upstream's sampler, draw for draw.
    for n in (6, 100):
        every = PuzzleDataset(config(data, global_batch_size=2, epochs_per_iter=4,
                                     sampler_options={"max_groups": n}))  # fmt: skip
        plain = make(data, 2, epochs=4)
        assert same_batches(one_iteration(every), one_iteration(plain))
        assert every.total_steps(7) == plain.total_steps(7)


def test_max_groups_is_recorded_and_a_state_without_it_resumes(data: Path) -> None:
    plain, limited = (
        PuzzleDataset(config(data)),
        PuzzleDataset(config(data, sampler_options={"max_groups": 2})),
    )
    assert "sampler_options" not in plain.state_dict()
    assert limited.state_dict()["sampler_options"] == {"max_groups": 2}
    consume(plain, 2)
    resumed = PuzzleDataset(config(data))
    resumed.load_state_dict(plain.state_dict())
    assert same_batches(one_iteration(resumed), one_iteration(make(data, 4))[2:])
    with pytest.raises(ValueError, match="sampler_options"):
        PuzzleDataset(config(data, sampler_options={"max_groups": 2})).load_state_dict(
            make(data, 4).state_dict()
        )


@pytest.mark.parametrize("bad", [0, -1, "2"])
def test_bad_max_groups_is_one_line(data: Path, bad: object) -> None:
    for test in (False, True):
        with pytest.raises(ConfigError, match="max_groups must be None or an integer >= 1"):
            PuzzleDataset(config(data, test_set_mode=test, sampler_options={"max_groups": bad}),
                          "test" if test else "train")  # fmt: skip
