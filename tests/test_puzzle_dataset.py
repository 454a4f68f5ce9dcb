"""PuzzleDataset: upstream's sampling, rank sharding, collation, validation and resumption.

Datasets are written by hand in tmp dirs. Example ``i`` of a split has inputs
``[base + i + 1] * (SEQ_LEN - 1) + [PAD]`` and labels ``[base + i + 1, 0] * (SEQ_LEN // 2)``, so
every row can be traced back to its example.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataset.puzzle_dataset as pd_module
import dataset.reader as reader_module
from dataset.puzzle_dataset import IGNORE_LABEL_ID, PuzzleDataset, PuzzleDatasetConfig

SEQ_LEN = 4
PAD = 0
VOCAB = 1000
# Groups of puzzles, each puzzle given by its number of examples.
GROUPS = [[3, 1, 2], [2], [1, 4], [5], [2, 2, 2], [1]]


def write_split(
    root: Path,
    split: str = "train",
    groups: list[list[int]] = GROUPS,
    *,
    set_name: str = "all",
    base: int = 0,
    ignore_label_id: int | None = 0,
    num_puzzle_identifiers: int | None = None,
    vocab_size: int = VOCAB,
    dtype: type = np.uint16,
    packed: str | None = None,
) -> dict[str, np.ndarray]:
    """Write one split (``packed`` in {None, "npz", "npz_compressed"}); return its arrays."""
    sizes = [n for group in groups for n in group]
    num_examples = sum(sizes)
    token = base + 1 + np.arange(num_examples)
    inputs = np.repeat(token[:, None], SEQ_LEN, axis=1)
    inputs[:, -1] = PAD
    labels = np.zeros((num_examples, SEQ_LEN), dtype=np.int64)
    labels[:, ::2] = token[:, None]
    arrays = {
        "inputs": inputs.astype(dtype),
        "labels": labels.astype(dtype),
        "puzzle_identifiers": np.arange(1, len(sizes) + 1, dtype=np.int32),
        "puzzle_indices": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
        "group_indices": np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(
            np.int32
        ),
    }
    metadata = {
        "pad_id": PAD,
        "ignore_label_id": ignore_label_id,
        "blank_identifier_id": 0,
        "vocab_size": vocab_size,
        "seq_len": SEQ_LEN,
        "num_puzzle_identifiers": num_puzzle_identifiers or len(sizes) + 1,
        "total_groups": len(groups),
        "mean_puzzle_examples": num_examples / max(1, len(sizes)),
        "total_puzzles": len(sizes),
        "sets": [set_name],
    }
    if packed is None:
        (root / split).mkdir(parents=True, exist_ok=True)
        for field, arr in arrays.items():
            np.save(root / split / f"{set_name}__{field}.npy", arr)
        (root / split / "dataset.json").write_text(json.dumps(metadata))
    else:
        root.mkdir(parents=True, exist_ok=True)
        save = np.savez_compressed if packed == "npz_compressed" else np.savez
        save(root / f"{split}.npz", **{f"{set_name}__{k}": v for k, v in arrays.items()})
        (root / f"{split}.json").write_text(json.dumps(metadata))
    return arrays


def make(
    paths: list[Path] | Path,
    gbs: int,
    *,
    test: bool = False,
    seed: int = 0,
    epochs: int = 1,
    rank: int = 0,
    replicas: int = 1,
    split: str | None = None,
) -> PuzzleDataset:
    paths = paths if isinstance(paths, list) else [paths]
    config = PuzzleDatasetConfig(
        seed=seed,
        dataset_paths=[str(p) for p in paths],
        global_batch_size=gbs,
        test_set_mode=test,
        epochs_per_iter=epochs,
        rank=rank,
        num_replicas=replicas,
    )
    return PuzzleDataset(config, split=split or ("test" if test else "train"))


Batch = tuple[str, dict[str, torch.Tensor], int]


def one_iteration(ds: PuzzleDataset) -> list[Batch]:
    return list(ds)


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and x[2] == y[2] and all(torch.equal(x[1][k], y[1][k]) for k in x[1])
        for x, y in zip(a, b, strict=True)
    )


def examples_of(batch: dict[str, torch.Tensor], base: int = 0) -> np.ndarray:
    """Example index of every row (-1 for padding rows)."""
    first = batch["inputs"][:, 0].numpy().astype(np.int64)
    return np.where(first == PAD, -1, first - base - 1)


def puzzle_of_example(groups: list[list[int]] = GROUPS) -> np.ndarray:
    return np.repeat(np.arange(sum(len(g) for g in groups)), [n for g in groups for n in g])


def upstream_plan(
    seed: int, counter: int, epochs: int, gbs: int, groups: list[list[int]] = GROUPS
) -> list[list[tuple[int, int]]]:
    """Upstream's _iter_train/_sample_batch loop: per batch, (puzzle, examples added) per visit."""
    sizes = [n for g in groups for n in g]
    group_indices = np.concatenate([[0], np.cumsum([len(g) for g in groups])])
    rng = np.random.Generator(np.random.Philox(seed=seed + counter))
    order = np.concatenate([rng.permutation(len(groups)) for _ in range(epochs)])
    batches, start = [], 0
    while start < order.size:
        visits, size = [], 0
        while start < order.size and size < gbs:
            group = order[start]
            puzzle = int(rng.integers(group_indices[group], group_indices[group + 1]))
            start += 1
            add = min(sizes[puzzle], gbs - size)
            visits.append((puzzle, add))
            size += add
        if size < gbs:
            break
        batches.append(visits)
    return batches


def assert_upstream_visits(
    batches: list[Batch],
    expected: list[list[tuple[int, int]]],
    groups: list[list[int]],
    gbs: int,
    base: int = 0,
    id_offset: int = 0,
) -> None:
    """Batches hold upstream's visits: whole puzzles, only the batch-filling visit trimmed."""
    owner = puzzle_of_example(groups)
    sizes = np.bincount(owner)
    assert len(batches) == len(expected)
    for (_, batch, effective), visits in zip(batches, expected, strict=True):
        assert effective == gbs
        assert all(batch[k].shape[0] == gbs and batch[k].dtype == torch.int32 for k in batch)
        rows = examples_of(batch, base)
        assert (rows >= 0).all()
        np.testing.assert_array_equal(owner[rows], np.repeat(*zip(*visits, strict=True)))
        np.testing.assert_array_equal(
            batch["puzzle_identifiers"].numpy(), owner[rows] + 1 + id_offset
        )
        start = 0
        for i, (puzzle, added) in enumerate(visits):
            chunk = rows[start : start + added]
            assert len(set(chunk.tolist())) == added  # without replacement
            if i < len(visits) - 1:  # only the visit that fills the batch may be trimmed
                assert added == sizes[puzzle]
            start += added


# ----------------------------------------------------------------------------------------------
# Train sampling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "epochs", "gbs"), [(0, 1, 5), (3, 3, 5), (7, 4, 8), (1, 2, 1)])
def test_train_matches_upstream_visits(data: Path, seed: int, epochs: int, gbs: int) -> None:
    ds = make(data, gbs, seed=seed, epochs=epochs)
    for counter in (1, 2):
        batches = one_iteration(ds)
        assert all(name == "all" for name, _, _ in batches)
        assert_upstream_visits(batches, upstream_plan(seed, counter, epochs, gbs), GROUPS, gbs)


def test_train_visits_each_group_epochs_per_iter_times(tmp_path: Path) -> None:
    """Visits, read back from the batches, are a prefix of epochs_per_iter group permutations.

    Only visits after the last full batch are dropped; they hold < gbs examples together and
    each holds >= min puzzle size examples, so at most (gbs - 1) // min_size visits are missing.
    """
    groups = [[3, 1, 2], [2], [1, 4], [5], [2, 2, 2], [2, 3]]
    write_split(tmp_path, "train", groups)
    owner = puzzle_of_example(groups)
    sizes = np.bincount(owner)
    group_of_puzzle = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    epochs, gbs = 5, 7
    for seed in range(4):
        visits: list[int] = []
        for _, batch, _ in make(tmp_path, gbs, seed=seed, epochs=epochs):
            rows = examples_of(batch)
            puzzles = owner[rows]
            # Split the batch into visits: runs of one puzzle, cut every `size` examples (a group
            # may be visited twice in a row, across a permutation boundary).
            start = 0
            while start < gbs:
                end = start
                while (
                    end < gbs
                    and puzzles[end] == puzzles[start]
                    and end - start < sizes[puzzles[start]]
                ):
                    end += 1
                assert len(set(rows[start:end].tolist())) == end - start
                assert end == gbs or end - start == sizes[puzzles[start]]
                visits.append(int(group_of_puzzle[puzzles[start]]))
                start = end
        n = len(groups)
        for k in range(0, len(visits), n):
            block = visits[k : k + n]
            assert len(set(block)) == len(block)
        counts = np.bincount(visits, minlength=n)
        assert counts.max() <= epochs
        missing = epochs * n - len(visits)
        assert 0 <= missing <= (gbs - 1) // sizes.min()


def test_examples_of_a_puzzle_are_shuffled_as_upstream(data: Path) -> None:
    owner = puzzle_of_example()
    sizes = np.bincount(owner)
    unsorted = 0
    for _, batch, _ in make(data, 5, epochs=20):
        rows = examples_of(batch)
        for puzzle in np.unique(owner[rows]):
            chunk = rows[owner[rows] == puzzle]
            if chunk.size == sizes[puzzle] >= 2:
                unsorted += int((np.diff(chunk) < 0).any())
    assert unsorted > 0


def test_same_seed_same_batches_other_seed_or_iteration_differs(data: Path) -> None:
    a, b, c = (
        make(data, 5, seed=3, epochs=2),
        make(data, 5, seed=3, epochs=2),
        make(data, 5, seed=4, epochs=2),
    )
    first_a, first_b, first_c = one_iteration(a), one_iteration(b), one_iteration(c)
    assert same_batches(first_a, first_b)
    assert not same_batches(first_a, first_c)
    assert not same_batches(first_a, one_iteration(a))


def test_global_numpy_rng_untouched(data: Path) -> None:
    np.random.seed(1234)
    before = np.random.get_state()
    for test in (False, True):
        for _ in range(2):
            one_iteration(make(data, 5, test=test, epochs=3))
    after = np.random.get_state()
    assert before[0] == after[0] and before[2:] == after[2:]
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("test", [False, True])
@pytest.mark.parametrize("replicas", [2, 4])
def test_ranks_together_equal_one_process(data: Path, test: bool, replicas: int) -> None:
    gbs = 8
    single = one_iteration(make(data, gbs, test=test, epochs=3, seed=5))
    per_rank = [
        one_iteration(make(data, gbs, test=test, epochs=3, seed=5, rank=r, replicas=replicas))
        for r in range(replicas)
    ]
    assert all(len(batches) == len(single) for batches in per_rank)
    for i, (set_name, batch, effective) in enumerate(single):
        for r in range(replicas):
            assert per_rank[r][i][0] == set_name and per_rank[r][i][2] == effective
            assert all(per_rank[r][i][1][k].shape[0] == gbs // replicas for k in batch)
        for k in batch:
            joined = torch.cat([per_rank[r][i][1][k] for r in range(replicas)])
            assert torch.equal(joined, batch[k])


# ----------------------------------------------------------------------------------------------
# Test mode and collation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gbs", [1, 5, 8, 40])
def test_test_mode_visits_every_example_once_in_order(data: Path, gbs: int) -> None:
    owner = puzzle_of_example()
    n = owner.size
    ds = make(data, gbs, test=True)
    batches = one_iteration(ds)
    assert [effective for _, _, effective in batches] == [
        min(gbs, n - start) for start in range(0, n, gbs)
    ]
    seen = []
    for set_name, batch, effective in batches:
        assert set_name == "all" and all(batch[k].shape[0] == gbs for k in batch)
        rows = examples_of(batch)
        seen.extend(rows[:effective].tolist())
        np.testing.assert_array_equal(
            batch["puzzle_identifiers"][:effective].numpy(), owner[rows[:effective]] + 1
        )
        assert (batch["inputs"][effective:] == PAD).all()
        assert (batch["labels"][effective:] == IGNORE_LABEL_ID).all()
        assert (batch["puzzle_identifiers"][effective:] == 0).all()
    assert seen == list(range(n))
    # Each __iter__ starts again from the first example, even after an abandoned one.
    next(iter(ds))
    assert same_batches(batches, one_iteration(ds))


def test_abandoned_train_iterator_then_new_iteration_as_upstream(data: Path) -> None:
    ds = make(data, 5, epochs=2)
    next(iter(ds))
    # Upstream's counter already moved to 1, so the next iteration samples with counter 2.
    assert_upstream_visits(one_iteration(ds), upstream_plan(0, 2, 2, 5), GROUPS, 5)


@pytest.mark.parametrize("ignore_label_id", [0, None])
def test_labels_ignore_id_becomes_minus_100(tmp_path: Path, ignore_label_id: int | None) -> None:
    write_split(tmp_path, "test", ignore_label_id=ignore_label_id, dtype=np.uint8)
    (_, batch, _), *_ = one_iteration(make(tmp_path, 4, test=True))
    token = batch["inputs"][:, :1]
    ignored = IGNORE_LABEL_ID if ignore_label_id is not None else 0
    expected = torch.cat([token, torch.full_like(token, ignored)] * (SEQ_LEN // 2), dim=1)
    assert torch.equal(batch["labels"], expected)


# ----------------------------------------------------------------------------------------------
# Several dataset paths and the packed layout
# ----------------------------------------------------------------------------------------------
def test_two_paths_get_offset_identifiers_and_both_sets(tmp_path: Path) -> None:
    other = [[2, 2], [3], [1, 1, 1]]
    write_split(tmp_path / "a", "train")
    write_split(tmp_path / "b", "train", other, base=500, num_puzzle_identifiers=20)
    ds = make([tmp_path / "a", tmp_path / "b"], 4, epochs=3)
    ids_a = sum(len(g) for g in GROUPS) + 1
    assert ds.metadata.sets == ["all", "all1"]
    assert ds.metadata.num_puzzle_identifiers == ids_a + 20
    assert ds.metadata.total_groups == len(GROUPS) + len(other)
    assert ds.identifier_offsets == [0, ids_a]
    for counter in (1, 3):
        batches = one_iteration(ds)
        names = [name for name, _, _ in batches]
        # Set by set, as upstream, each with the next value of the counter.
        split = names.index("all1")
        assert set(names[:split]) == {"all"} and set(names[split:]) == {"all1"}
        assert_upstream_visits(batches[:split], upstream_plan(0, counter, 3, 4), GROUPS, 4)
        assert_upstream_visits(
            batches[split:], upstream_plan(0, counter + 1, 3, 4, other), other, 4, 500, ids_a
        )


@pytest.mark.parametrize("packed", ["npz", "npz_compressed"])
@pytest.mark.parametrize("test", [False, True])
def test_packed_npz_gives_the_same_batches(tmp_path: Path, packed: str, test: bool) -> None:
    split = "test" if test else "train"
    write_split(tmp_path / "npy", split)
    write_split(tmp_path / "npz", split, packed=packed)
    a, b = (
        make(tmp_path / "npy", 6, test=test, epochs=3),
        make(tmp_path / "npz", 6, test=test, epochs=3),
    )
    assert a.metadata == b.metadata
    for _ in range(2):
        assert same_batches(one_iteration(a), one_iteration(b))


# ----------------------------------------------------------------------------------------------
# Position
# ----------------------------------------------------------------------------------------------
def consume(ds: PuzzleDataset, k: int) -> None:
    """Take k batches from ds, iteration after iteration, leaving the last iterator suspended."""
    while k > 0:
        it = iter(ds)
        for _ in it:
            k -= 1
            if k == 0:
                return


@pytest.mark.parametrize("second", [None, [[2, 2], [3]], [[1]]])
@pytest.mark.parametrize("test", [False, True])
def test_state_dict_resumes_bit_identically(
    tmp_path: Path, second: list[list[int]] | None, test: bool
) -> None:
    """Resume after every prefix of three iterations; [[1]] is a set too small for a batch."""
    split = "test" if test else "train"
    paths = [tmp_path / "a"]
    write_split(tmp_path / "a", split)
    if second is not None:
        write_split(tmp_path / "b", split, second, base=500)
        paths.append(tmp_path / "b")

    def fresh() -> PuzzleDataset:
        return make(paths, 4, test=test, epochs=2, seed=9)

    reference_ds = fresh()
    iterations = [one_iteration(reference_ds) for _ in range(3)]
    flat = [b for it in iterations for b in it]
    ends = np.cumsum([len(it) for it in iterations])
    assert [fresh().num_batches(i) for i in range(3)] == [len(it) for it in iterations]
    for k in range(int(ends[1]) + 1):
        original = fresh()
        consume(original, k)
        state = original.state_dict()
        # What a loop that counts consumed batches itself would store.
        whole = int(np.searchsorted(ends, k, side="right"))
        assert fresh().state_at(whole, k - int(ends[whole - 1] if whole else 0)) == state
        if whole and k == ends[whole - 1]:
            assert fresh().state_at(whole - 1, len(iterations[whole - 1])) == state
        buffer = io.BytesIO()
        torch.save(json.loads(json.dumps(state)), buffer)
        buffer.seek(0)
        resumed = fresh()
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert resumed.state_dict() == state
        # The first __iter__ finishes the interrupted iteration (a whole one at a boundary).
        done = int(ends[np.searchsorted(ends, k, side="right")])
        assert same_batches(one_iteration(resumed), flat[k:done])
        following = int(np.searchsorted(ends, done)) + 1
        if following < len(iterations):
            assert same_batches(one_iteration(resumed), iterations[following])


def test_state_rejects_another_configuration(data: Path) -> None:
    with pytest.raises(ValueError, match="has only"):
        make(data, 4).state_at(0, make(data, 4).num_batches(0) + 1)
    state = make(data, 4).state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        make(data, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(data, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="test_set_mode"):
        make(data, 4, test=True).load_state_dict(state)


def test_state_resumes_on_another_world_size(data: Path) -> None:
    single = make(data, 4, epochs=3)
    consume(single, 3)
    state = single.state_dict()
    resumed = make(data, 4, epochs=3)
    ranks = [make(data, 4, epochs=3, rank=r, replicas=2) for r in range(2)]
    for ds in [resumed, *ranks]:
        ds.load_state_dict(state)
    expected = one_iteration(resumed)
    halves = [one_iteration(ds) for ds in ranks]
    assert len(expected) > 0 and all(len(h) == len(expected) for h in halves)
    for i, (_, batch, _) in enumerate(expected):
        for k in batch:
            assert torch.equal(torch.cat([halves[0][i][1][k], halves[1][i][1][k]]), batch[k])


def test_pickled_copy_and_dataloader_iterate_the_same(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make(data, 5, epochs=2)
    one_iteration(ds)
    copy = pickle.loads(pickle.dumps(ds))
    reference = make(data, 5, epochs=2)
    one_iteration(reference)
    assert same_batches(one_iteration(copy), one_iteration(reference))
    for workers in (0, 1):
        loader = DataLoader(make(data, 5, epochs=2), batch_size=None, num_workers=workers)
        assert same_batches(list(loader), one_iteration(make(data, 5, epochs=2)))
    # As upstream, several workers would each yield every batch; a real 2-worker loader takes
    # seconds to shut down after the error, so the worker info is faked.
    fake_worker = type("WorkerInfo", (), {"num_workers": 2})()
    monkeypatch.setattr(pd_module, "get_worker_info", lambda: fake_worker)
    with pytest.raises(RuntimeError, match="at most one DataLoader worker"):
        next(iter(make(data, 5, epochs=2)))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def edit_json(path: Path, **changes: object) -> None:
    metadata = json.loads(path.read_text())
    metadata.update(changes)
    path.write_text(json.dumps(metadata))


def resave(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    np.save(path, change(np.load(path)))


def set_token(path: Path, row: int, value: int) -> None:
    arr = np.load(path)
    arr[row, 1] = value
    np.save(path, arr)


BROKEN: dict[str, tuple[Callable[[Path], None], type[Exception], list[str]]] = {
    "missing_labels": (
        lambda d: (d / "a/train/all__labels.npy").unlink(),
        FileNotFoundError,
        ["all__labels.npy"],
    ),
    "missing_metadata": (
        lambda d: (d / "a/train/dataset.json").unlink(),
        FileNotFoundError,
        ["a/train/dataset.json"],
    ),
    "missing_split": (
        lambda d: __import__("shutil").rmtree(d / "a/train"),
        FileNotFoundError,
        ["a/train/dataset.json", "a/train.npz"],
    ),
    "bad_json": (
        lambda d: (d / "a/train/dataset.json").write_text("{"),
        ValueError,
        ["a/train/dataset.json"],
    ),
    "json_missing_field": (
        lambda d: (d / "a/train/dataset.json").write_text(
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((d / "a/train/dataset.json").read_text()).items()
                    if k != "vocab_size"
                }
            )
        ),
        ValueError,
        ["a/train/dataset.json", "vocab_size"],
    ),
    "labels_shape": (
        lambda d: resave(d / "a/train/all__labels.npy", lambda a: a[:-1]),
        ValueError,
        ["all__labels.npy", "shape"],
    ),
    "inputs_seq_len": (
        lambda d: edit_json(d / "a/train/dataset.json", seq_len=SEQ_LEN + 1),
        ValueError,
        ["all__inputs.npy", "seq_len"],
    ),
    "puzzle_indices_end": (
        lambda d: resave(
            d / "a/train/all__puzzle_indices.npy", lambda a: np.append(a[:-1], a[-1] - 1)
        ),
        ValueError,
        ["all__puzzle_indices.npy", "last value"],
    ),
    "puzzle_indices_start": (
        lambda d: resave(d / "a/train/all__puzzle_indices.npy", lambda a: np.append([1], a[1:])),
        ValueError,
        ["all__puzzle_indices.npy", "start at 0"],
    ),
    "puzzle_indices_decreasing": (
        lambda d: resave(
            d / "a/train/all__puzzle_indices.npy", lambda a: np.where(np.arange(a.size) == 2, 0, a)
        ),
        ValueError,
        ["all__puzzle_indices.npy", "non-decreasing"],
    ),
    "group_indices_end": (
        lambda d: resave(d / "a/train/all__group_indices.npy", lambda a: a[:-1]),
        ValueError,
        ["all__group_indices.npy", "last value"],
    ),
    "input_token_out_of_vocab": (
        lambda d: set_token(d / "a/train/all__inputs.npy", 7, VOCAB),
        ValueError,
        ["all__inputs.npy", "row 7", "vocab_size"],
    ),
    "label_token_out_of_vocab": (
        lambda d: set_token(d / "a/train/all__labels.npy", 3, VOCAB + 5),
        ValueError,
        ["all__labels.npy", "row 3", "vocab_size"],
    ),
    "identifier_out_of_range": (
        lambda d: resave(d / "a/train/all__puzzle_identifiers.npy", lambda a: a + 1),
        ValueError,
        ["all__puzzle_identifiers.npy", "num_puzzle_identifiers"],
    ),
    "pad_id_out_of_vocab": (
        lambda d: edit_json(d / "a/train/dataset.json", pad_id=VOCAB),
        ValueError,
        ["a/train/dataset.json", "pad_id"],
    ),
    "paths_disagree_on_vocab": (
        lambda d: edit_json(d / "b/train/dataset.json", vocab_size=VOCAB + 1),
        ValueError,
        ["b/train/dataset.json", "vocab_size", "a/train/dataset.json"],
    ),
    "paths_disagree_on_ignore_label": (
        lambda d: edit_json(d / "b/train/dataset.json", ignore_label_id=None),
        ValueError,
        ["b/train/dataset.json", "ignore_label_id"],
    ),
    "paths_disagree_on_seq_len": (
        lambda d: edit_json(d / "b/train/dataset.json", seq_len=SEQ_LEN * 2),
        ValueError,
        ["b/train/dataset.json", "seq_len"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_inputs_raise_naming_the_file(tmp_path: Path, case: str) -> None:
    write_split(tmp_path / "a", "train")
    write_split(tmp_path / "b", "train")
    breaker, error, fragments = BROKEN[case]
    breaker(tmp_path)
    paths = [tmp_path / "a", tmp_path / "b"] if case.startswith("paths_") else [tmp_path / "a"]
    with pytest.raises(error) as info:
        make(paths, 4)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_broken_packed_inputs(tmp_path: Path) -> None:
    write_split(tmp_path, "train", packed="npz")
    with np.load(tmp_path / "train.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "all__labels"}
    np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(ValueError, match=r"train\.npz has no array 'all__labels'"):
        make(tmp_path, 4)
    (tmp_path / "train.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.json is missing"):
        make(tmp_path, 4)


def test_large_arrays_are_sampled_then_checked_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = [[1] * 10 for _ in range(20)]
    write_split(tmp_path, "test", groups)
    monkeypatch.setattr(reader_module, "FULL_TOKEN_CHECK_BYTES", 4 * SEQ_LEN * 2 * 16)
    checked = {
        r for lo, hi in reader_module._token_check_blocks(200, SEQ_LEN * 2) for r in range(lo, hi)
    }
    assert 0 < len(checked) < 200
    unchecked = min(set(range(200)) - checked)
    set_token(tmp_path / "test/all__inputs.npy", unchecked, VOCAB)
    ds = make(tmp_path, 16, test=True)
    with pytest.raises(ValueError, match=rf"all__inputs\.npy: row {unchecked} .*vocab_size"):
        one_iteration(ds)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"global_batch_size": 10, "num_replicas": 3}, "multiple of num_replicas"),
        ({"rank": 2, "num_replicas": 2}, "rank 2 must be < num_replicas"),
        ({"epochs_per_iter": 0}, "epochs_per_iter"),
        ({"typo": 1}, "typo"),
    ],
)
def test_config_errors(data: Path, changes: dict[str, object], fragment: str) -> None:
    fields: dict[str, object] = {
        "seed": 0,
        "dataset_paths": [str(data)],
        "global_batch_size": 4,
        "test_set_mode": False,
        "epochs_per_iter": 1,
    }
    with pytest.raises(ValueError, match=fragment):
        PuzzleDatasetConfig(**{**fields, **changes})
