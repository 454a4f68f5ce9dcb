"""The few-shot data path: strict builds, demo batch fields, the few-shot samplers and refusals.

Expectations come from the source tasks (decoded canvases, undone augmentations), from the raw
arrays on disk, from an independent re-statement of ETRM's batch filling loop and from what
ETRM's own loader (bdsaglam/etrm at 109b070) yields on ``tests/fixtures/etrm_encoder_dataset``:
its evaluation batches below, and its training batches in
``tests/golden/etrm_fewshot_train_batches.json``, written by running ETRM's
``FewShotPuzzleDataset`` unchanged from an archive of that commit::

    mkdir -p /tmp/etrm && git -C ETRM_REPO archive 109b070 dataset models | tar -x -C /tmp/etrm
    .venv/bin/python tests/golden/etrm_fewshot_train_capture.py /tmp/etrm
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset.few_shot as few_shot_module
from dataset import (
    build_arc_dataset,
    build_arc_dataset_encoder,
    build_maze_dataset,
    build_sudoku_dataset,
)
from dataset.common import IGNORE_LABEL_ID, DataError, run_cli
from dataset.few_shot import FewShotSampler
from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from dataset.reader import PuzzleReader
from tests.test_arc_dataset import _task, decode_pair, undo, write_kaggle
from tests.test_puzzle_dataset import write_split
from utils.schema import ConfigError

REPO = Path(__file__).resolve().parent.parent
ETRM_FIXTURE = REPO / "tests" / "fixtures" / "etrm_encoder_dataset"
FIELDS = ["inputs", "labels", "puzzle_identifiers", "demo_inputs", "demo_labels", "demo_mask",
          "group_ids"]  # fmt: skip
# (demos, tests) per task; "tr03" has 4 demos so that max_demos=2 cuts its demos.
TRAIN_SHAPES = {"tr00": (2, 1), "tr01": (3, 2), "tr02": (4, 1), "tr03": (2, 3)}
EVAL_SHAPES = {"ev00": (2, 1), "ev01": (3, 3), "ev02": (5, 2)}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, dict[str, dict]]]:
    rng = np.random.default_rng(77)
    subsets = {
        "training": {name: _task(rng, d, t) for name, (d, t) in TRAIN_SHAPES.items()},
        "evaluation": {name: _task(rng, d, t) for name, (d, t) in EVAL_SHAPES.items()},
    }
    return write_kaggle(tmp_path_factory.mktemp("src"), subsets), subsets


def encoder_build(prefix: str, out: Path, *extra: str) -> Path:
    argv = ["--input-file-prefix", prefix, "--output-dir", str(out), "--subsets", "training",
            "evaluation", "--test-set-name", "evaluation", "--num-aug", "2", *extra]  # fmt: skip
    assert run_cli(build_arc_dataset_encoder.main, argv) == 0
    return out


@pytest.fixture(scope="module")
def strict(tasks: tuple[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return encoder_build(tasks[0], tmp_path_factory.mktemp("strict") / "ds")


def make(
    path: Path,
    split: str = "train",
    *,
    gbs: int = 4,
    seed: int = 0,
    epochs: int = 1,
    rank: int = 0,
    replicas: int = 1,
    fields: list[str] = FIELDS,
    **options: object,
) -> PuzzleDataset:
    test = split == "test"
    config = PuzzleDatasetConfig(
        seed=seed,
        dataset_paths=[str(path)],
        global_batch_size=gbs,
        test_set_mode=test,
        epochs_per_iter=epochs,
        rank=rank,
        num_replicas=replicas,
        sampler="few_shot_eval" if test else "few_shot",
        sampler_options=options,
        fields=fields,
    )
    return PuzzleDataset(config, split)


def raw(path: Path, split: str) -> dict[str, np.ndarray]:
    names = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
    return {f: np.load(path / split / f"all__{f}.npy") for f in (*names, "num_demos")}


def identifiers(path: Path) -> list[str]:
    return json.loads((path / "identifiers.json").read_text())


def demo_pairs(batch: dict[str, torch.Tensor], i: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The decoded (input, output) grids of row i's filled demo slots."""
    mask = batch["demo_mask"][i].numpy()
    ins, outs = batch["demo_inputs"][i].numpy(), batch["demo_labels"][i].numpy()
    return [decode_pair(ins[k], outs[k])[:2] for k in np.flatnonzero(mask)]


def source_pairs(task: dict, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(p["input"]), np.array(p["output"])) for p in task[key]]


def same_pairs(
    a: list[tuple[np.ndarray, np.ndarray]], b: list[tuple[np.ndarray, np.ndarray]]
) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )


def row_of(data: dict[str, np.ndarray], ident: int, canvas: torch.Tensor) -> tuple[int, int]:
    """(puzzle, row) of the example of puzzle ``ident`` whose inputs are ``canvas``."""
    p = int(np.flatnonzero(data["puzzle_identifiers"] == ident)[0])
    lo, hi = int(data["puzzle_indices"][p]), int(data["puzzle_indices"][p + 1])
    hits = np.flatnonzero((data["inputs"][lo:hi] == canvas.numpy()).all(axis=1))
    assert hits.size == 1
    return p, lo + int(hits[0])


def etrm_batches(sizes: list[int], gbs: int) -> int:
    """ETRM's ``_iter_train`` filling loop restated: visits add min(queries, free slots) items,
    a full batch is emitted, the short last one dropped."""
    batches, filled = 0, 0
    for size in sizes:
        if size <= 0:
            continue
        filled += min(size, gbs - filled)
        if filled == gbs:
            batches, filled = batches + 1, 0
    return batches


# ----------------------------------------------------------------------------------------------
# Builder alias
# ----------------------------------------------------------------------------------------------
def test_encoder_builder_is_strict_and_leaks_no_evaluation_task(
    strict: Path, tasks: tuple[str, dict]
) -> None:
    _, subsets = tasks
    names = identifiers(strict)
    train, test = raw(strict, "train"), raw(strict, "test")
    train_bases = {names[i].split("|||")[0] for i in train["puzzle_identifiers"]}
    test_bases = {names[i].split("|||")[0] for i in test["puzzle_identifiers"]}
    assert train_bases == set(TRAIN_SHAPES) and test_bases == set(EVAL_SHAPES)
    assert not train_bases & test_bases
    for split, data, shapes in (("train", train, TRAIN_SHAPES), ("test", test, EVAL_SHAPES)):
        meta = json.loads((strict / split / "dataset.json").read_text())
        assert meta["split_policy"] == "strict"
        for p, ident in enumerate(data["puzzle_identifiers"]):
            demos, tests = shapes[names[ident].split("|||")[0]]
            size = data["puzzle_indices"][p + 1] - data["puzzle_indices"][p]
            assert (data["num_demos"][p], size) == (demos, demos + tests)
    assert set(json.loads((strict / "test_puzzles.json").read_text())) == set(subsets["evaluation"])


def test_encoder_builder_refuses_the_trm_split_and_runs_as_a_script(
    tasks: tuple[str, dict], tmp_path: Path
) -> None:
    argv = ["--input_file_prefix", tasks[0], "--output_dir", str(tmp_path / "x"),
            "--subsets", "training", "evaluation", "--test_set_name", "evaluation",
            "--split-policy", "trm"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        build_arc_dataset_encoder.main(argv)
    assert info.value.code == 2 and not (tmp_path / "x").exists()
    out = tmp_path / "script"
    cmd = [sys.executable, str(REPO / "dataset/build_arc_dataset_encoder.py"),
           "--input-file-prefix", tasks[0], "--output-dir", str(out), "--subsets", "training",
           "evaluation", "--test-set-name", "evaluation", "--num_aug", "1"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    meta = json.loads((out / "test" / "dataset.json").read_text())
    assert meta["split_policy"] == "strict" and meta["total_puzzles"] == 2 * len(EVAL_SHAPES)


# ----------------------------------------------------------------------------------------------
# Evaluation sampler and the demo fields
# ----------------------------------------------------------------------------------------------
def test_eval_items_carry_their_puzzles_demos(strict: Path, tasks: tuple[str, dict]) -> None:
    _, subsets = tasks
    names = identifiers(strict)
    data = raw(strict, "test")
    batches = list(make(strict, "test", gbs=64))
    assert len(batches) == 1
    _, batch, effective = batches[0]
    expected_items = sum(t for _, t in EVAL_SHAPES.values()) * 3  # 3 puzzles per group
    assert effective == expected_items
    assert batch["demo_inputs"].shape == (64, 10, 900) and batch["demo_inputs"].dtype == torch.int32
    assert batch["demo_mask"].shape == (64, 10) and batch["demo_mask"].dtype == torch.bool
    assert batch["group_ids"].dtype == torch.int32
    seen_query: dict[int, int] = {}
    for i in range(effective):
        ident = int(batch["puzzle_identifiers"][i])
        base, to_original = undo(names[ident])
        task = subsets["evaluation"][base]
        demos = [(to_original(a), to_original(b)) for a, b in demo_pairs(batch, i)]
        assert same_pairs(demos, source_pairs(task, "train"))
        q = seen_query.get(ident, 0)
        seen_query[ident] = q + 1
        labels = batch["labels"][i].numpy().copy()
        labels[labels == IGNORE_LABEL_ID] = 0
        query = decode_pair(batch["inputs"][i].numpy(), labels)
        expected = source_pairs(task, "test")[q]
        assert np.array_equal(to_original(query[0]), expected[0])
        assert np.array_equal(to_original(query[1]), expected[1])
        # Demo labels keep PAD 0 (ETRM), unlike the query labels.
        assert int(batch["demo_labels"][i, 0].min()) == 0
        assert (batch["labels"][i] == IGNORE_LABEL_ID).any()
        p, _ = row_of(data, ident, batch["inputs"][i])
        group = int(np.searchsorted(data["group_indices"], p, side="right") - 1)
        assert int(batch["group_ids"][i]) == group
    assert seen_query == {
        int(i): EVAL_SHAPES[names[i].split("|||")[0]][1] for i in data["puzzle_identifiers"]
    }
    # Padding rows: blank identifier, PAD inputs, -100 labels, no demos, group -1.
    pad = slice(effective, 64)
    assert (batch["puzzle_identifiers"][pad] == 0).all() and (batch["inputs"][pad] == 0).all()
    assert (batch["labels"][pad] == IGNORE_LABEL_ID).all()
    assert not batch["demo_mask"][pad].any() and (batch["demo_inputs"][pad] == 0).all()
    assert (batch["demo_labels"][pad] == 0).all() and (batch["group_ids"][pad] == -1).all()


@pytest.mark.parametrize("gbs", [1, 2, 5, 7])
def test_eval_covers_every_query_exactly_once(strict: Path, gbs: int) -> None:
    # ETRM's test iterator lost the queries of a puzzle that did not fit the batch (ev01 has 3).
    data = raw(strict, "test")
    examples = np.diff(data["puzzle_indices"])
    expected = sorted(
        (int(data["puzzle_identifiers"][p]), int(data["puzzle_indices"][p]) + q)
        for p in range(examples.size)
        for q in range(int(data["num_demos"][p]), int(examples[p]))
    )
    ds = make(strict, "test", gbs=gbs, fields=["inputs", "puzzle_identifiers"])
    items = []
    for _, batch, effective in ds:
        assert effective <= gbs
        for i in range(effective):
            ident = int(batch["puzzle_identifiers"][i])
            items.append((ident, row_of(data, ident, batch["inputs"][i])[1]))
    assert sorted(items) == expected
    assert ds.num_batches(0) == -(-len(expected) // gbs) == ds.total_steps(1)


def test_max_eval_groups_keeps_the_first_groups(strict: Path) -> None:
    data = raw(strict, "test")
    first_two = int(data["group_indices"][2])
    queries = int(
        (np.diff(data["puzzle_indices"])[:first_two] - data["num_demos"][:first_two]).sum()
    )
    ds = make(strict, "test", gbs=4, max_groups=2)
    got = [(b["group_ids"][:n], n) for _, b, n in ds]
    assert sum(n for _, n in got) == queries
    assert sorted({int(g) for ids, n in got for g in ids[:n]}) == [0, 1]
    assert sum(n for _, _, n in make(strict, "test", gbs=4, max_groups=99)) == sum(
        int(t) for t in np.diff(data["puzzle_indices"]) - data["num_demos"]
    )


# ----------------------------------------------------------------------------------------------
# Training sampler: target policies, max_demos, max_train_groups
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["test_pairs", "leave_one_out"])
def test_one_epoch_in_one_batch_holds_every_query_of_the_picked_puzzles(
    strict: Path, tasks: tuple[str, dict], policy: str
) -> None:
    _, subsets = tasks
    names = identifiers(strict)
    data = raw(strict, "train")
    per_task = {n: t if policy == "test_pairs" else d + t for n, (d, t) in TRAIN_SHAPES.items()}
    gbs = sum(per_task.values())  # one epoch fills exactly one batch, nothing is cut
    ds = make(strict, gbs=gbs, seed=5, target_policy=policy)
    (_, batch, effective), *rest = list(ds)
    assert not rest and effective == gbs
    by_puzzle: dict[int, list[int]] = {}
    for i in range(gbs):
        ident = int(batch["puzzle_identifiers"][i])
        p, row = row_of(data, ident, batch["inputs"][i])
        start, n_demo = int(data["puzzle_indices"][p]), int(data["num_demos"][p])
        size = int(data["puzzle_indices"][p + 1]) - start
        j = row - start
        by_puzzle.setdefault(p, []).append(j)
        shown = int(batch["demo_mask"][i].sum())
        demo_rows = [row_of(data, ident, batch["demo_inputs"][i, k])[1] for k in range(shown)]
        if policy == "test_pairs":
            assert demo_rows == list(range(start, start + n_demo)) and shown == n_demo
        else:
            others = [start + k for k in range(size) if k != j]
            assert demo_rows == others and shown == size - 1
        # The demos decode to the source task's pairs (augmentation undone).
        base, to_original = undo(names[ident])
        pairs = source_pairs(subsets["training"][base], "train")
        pairs += source_pairs(subsets["training"][base], "test")
        decoded = [(to_original(a), to_original(b)) for a, b in demo_pairs(batch, i)]
        wanted = pairs[:n_demo] if policy == "test_pairs" else pairs[:j] + pairs[j + 1 :]
        assert same_pairs(decoded, wanted)
    # One puzzle per group, all its queries once.
    bases = [names[int(data["puzzle_identifiers"][p])].split("|||")[0] for p in by_puzzle]
    assert sorted(bases) == sorted(TRAIN_SHAPES)
    for p, js in by_puzzle.items():
        n_demo, size = int(data["num_demos"][p]), int(np.diff(data["puzzle_indices"])[p])
        first = n_demo if policy == "test_pairs" else 0
        assert sorted(js) == list(range(first, size))


def test_max_demos_caps_the_slots_not_the_queries(strict: Path) -> None:
    data = raw(strict, "train")
    ds = make(strict, gbs=7, max_demos=2)
    _, batch, _ = next(iter(ds))
    assert batch["demo_inputs"].shape == (7, 2, 900)
    for i in range(7):
        p, row = row_of(data, int(batch["puzzle_identifiers"][i]), batch["inputs"][i])
        start, n_demo = int(data["puzzle_indices"][p]), int(data["num_demos"][p])
        assert row >= start + n_demo  # tr02's 4 demos are never queries
        assert int(batch["demo_mask"][i].sum()) == min(n_demo, 2)
        assert np.array_equal(batch["demo_inputs"][i, 0].numpy(), data["inputs"][start])


def test_max_train_groups_keeps_the_first_groups(strict: Path) -> None:
    ds = make(strict, gbs=2, max_groups=2, epochs=3)
    groups = set()
    for _ in range(4):
        for _, batch, _ in ds:
            groups |= {int(g) for g in batch["group_ids"]}
    assert groups == {0, 1}


def test_group_order_is_etrms_permutation_per_epoch(strict: Path) -> None:
    # ETRM: Generator(Philox(seed + counter)).permutation(groups), once per epoch, counter 1
    # for the first iteration's set; every visit adds all queries of its puzzle.
    names = identifiers(strict)
    seed = 11
    ds = make(strict, gbs=1, seed=seed, epochs=2, fields=["puzzle_identifiers", "group_ids"])
    batches = list(ds)
    got = [int(b["group_ids"][0]) for _, b, _ in batches]
    bases = sorted(TRAIN_SHAPES)  # one group per task; the builder's order is its own
    group_of = {
        names[int(b["puzzle_identifiers"][0])].split("|||")[0]: int(b["group_ids"][0])
        for _, b, _ in batches
    }
    tests = {group_of[name]: TRAIN_SHAPES[name][1] for name in bases}
    rng = np.random.Generator(np.random.Philox(seed=seed + 1))
    order = [int(g) for _ in range(2) for g in rng.permutation(len(bases))]
    assert got == [g for g in order for _ in range(tests[g])]


# ----------------------------------------------------------------------------------------------
# Exact total_steps
# ----------------------------------------------------------------------------------------------
def write_varied(root: Path) -> Path:
    """Hand-written groups whose puzzles differ in size, with demos per puzzle."""
    write_split(root, "train")  # GROUPS = [[3, 1, 2], [2], [1, 4], [5], [2, 2, 2], [1]]
    np.save(root / "train" / "all__num_demos.npy", np.array([1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1]))
    return root


@pytest.mark.parametrize("policy", ["test_pairs", "leave_one_out"])
@pytest.mark.parametrize(
    ("gbs", "epochs", "chunk"), [(1, 1, 1024), (3, 2, 1), (4, 5, 2), (7, 3, 2)]
)
def test_total_steps_is_the_batches_emitted(
    tmp_path: Path,
    strict: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    gbs: int,
    epochs: int,
    chunk: int,
) -> None:
    monkeypatch.setattr(few_shot_module, "CHUNK_EPOCHS", chunk)
    for path in (strict, write_varied(tmp_path / "varied")):
        data = raw(path, "train")
        examples = np.diff(data["puzzle_indices"])
        fields = ["inputs", "puzzle_identifiers"]
        ds = make(path, gbs=gbs, epochs=epochs, fields=fields, target_policy=policy)
        sampler = ds.sampler
        assert isinstance(sampler, FewShotSampler)
        emitted = []
        for iteration in range(3):
            batches = list(ds)
            assert all(n == gbs and len(b["inputs"]) == gbs for _, b, n in batches)
            emitted.append(len(batches))
            got = [
                row_of(data, int(ident), inputs)[1]
                for _, b, _ in batches
                for ident, inputs in zip(b["puzzle_identifiers"], b["inputs"], strict=True)
            ]
            # The stream restated: each visit adds all of its puzzle's queries, in order; the
            # batches are its consecutive runs of gbs items, the short rest dropped.
            counter = sampler.set_counter(sampler.iteration_counter(iteration), 0)
            _, picks = sampler.visit_picks(0, counter)
            stream = []
            for p in picks:
                start, size = int(data["puzzle_indices"][p]), int(examples[p])
                if policy == "test_pairs":
                    stream += range(start + int(data["num_demos"][p]), start + size)
                elif size >= 2:
                    stream += range(start, start + size)
            assert got == stream[: len(stream) // gbs * gbs]
            assert len(batches) == len(stream) // gbs == ds.num_batches(iteration)
        assert ds.total_steps(3 * epochs) == sum(emitted)
        fresh = make(path, gbs=gbs, epochs=epochs, target_policy=policy)
        assert fresh.total_steps(3 * epochs) == sum(emitted)


def test_total_steps_needs_whole_iterations(strict: Path) -> None:
    with pytest.raises(DataError, match="not a multiple"):
        make(strict, epochs=2).total_steps(3)


def test_total_steps_counts_batches_not_groups(strict: Path) -> None:
    # 4 groups and 7 test-pair queries per epoch: 100 epochs at batch 3 emit 7*100//3 batches,
    # not ETRM's count of 4*100/3 groups.
    ds = make(strict, gbs=3, epochs=100, fields=["group_ids"])
    assert ds.total_steps(100) == len(list(ds)) == 7 * 100 // 3


# ----------------------------------------------------------------------------------------------
# batch_fill=etrm: ETRM's trimmed batches
# ----------------------------------------------------------------------------------------------
def etrm_fill(
    data: dict[str, np.ndarray], seed: int, counter: int, gbs: int, epochs: int, policy: str
) -> list[list[int]]:
    """ETRM's ``_iter_train`` restated, its loop and its draws from one generator (extended to
    ``leave_one_out``, whose queries are all examples of a puzzle with two or more): the example
    rows of each batch it emits."""
    groups, starts = data["group_indices"], data["puzzle_indices"]
    rng = np.random.Generator(np.random.Philox(seed=seed + counter))
    order = np.concatenate([rng.permutation(groups.size - 1) for _ in range(epochs)])
    batches, visit = [], 0
    while visit < len(order):
        items: list[int] = []
        while len(items) < gbs and visit < len(order):
            g = order[visit]
            p = rng.integers(groups[g], groups[g + 1])
            visit += 1
            first = starts[p] + data["num_demos"][p] if policy == "test_pairs" else starts[p]
            size = starts[p + 1] - first
            if size <= 0 or (policy == "leave_one_out" and size < 2):
                continue
            take = min(size, gbs - len(items))
            items += [int(first + q) for q in rng.choice(size, take, replace=False)]
        if len(items) < gbs:
            break
        batches.append(items)
    return batches


@pytest.mark.parametrize("policy", ["test_pairs", "leave_one_out"])
@pytest.mark.parametrize(("gbs", "epochs", "seed"), [(1, 1, 0), (3, 2, 1), (4, 5, 2), (7, 3, 3)])
def test_etrm_fill_is_etrms_loop_and_total_steps_its_batches(
    tmp_path: Path, strict: Path, policy: str, gbs: int, epochs: int, seed: int
) -> None:
    # strict: every puzzle of a group has as many queries, so the group order alone counts the
    # batches; varied: its puzzles differ, so the count needs every draw of the iteration.
    for path in (strict, write_varied(tmp_path / "varied")):
        data = raw(path, "train")
        fields = ["inputs", "puzzle_identifiers"]
        options = {"target_policy": policy, "batch_fill": "etrm"}
        ds = make(path, gbs=gbs, epochs=epochs, seed=seed, fields=fields, **options)
        sampler = ds.sampler
        assert isinstance(sampler, FewShotSampler)
        emitted = []
        for iteration in range(3):
            counter = sampler.set_counter(sampler.iteration_counter(iteration), 0)
            count = ds.num_batches(iteration)  # before any draw of the iteration's picks
            batches = list(ds)
            assert all(n == gbs and len(b["inputs"]) == gbs for _, b, n in batches)
            got = [
                [
                    row_of(data, int(i), x)[1]
                    for i, x in zip(b["puzzle_identifiers"], b["inputs"], strict=True)
                ]
                for _, b, _ in batches
            ]
            assert got == etrm_fill(data, seed, counter, gbs, epochs, policy)
            assert len(batches) == count
            # Any batch on its own, in any order, as a resumed run asks for it.
            plan = sampler.plan(0, counter)
            rows = [plan.batch(b).rows.tolist() for b in reversed(range(count))]
            assert rows[::-1] == got
            emitted.append(count)
        assert ds.total_steps(3 * epochs) == sum(emitted)
        fresh = make(path, gbs=gbs, epochs=epochs, seed=seed, **options)
        assert fresh.total_steps(3 * epochs) == sum(emitted)


def test_etrm_fill_counts_with_etrms_filling_loop(strict: Path) -> None:
    # 100 epochs of 4 groups at batch 3 (tasks of 1, 2, 1 and 3 test pairs): the count from the
    # group order alone against the filling loop restated (etrm_batches) and the batches emitted.
    ds = make(strict, gbs=3, epochs=100, seed=9, fields=["group_ids"], batch_fill="etrm")
    sampler = ds.sampler
    assert isinstance(sampler, FewShotSampler)
    counts = sampler._group_counts[0]
    assert counts is not None and sorted(counts.tolist()) == [1, 1, 2, 3]
    rng = np.random.Generator(np.random.Philox(seed=9 + 1))
    sizes = [int(counts[g]) for _ in range(100) for g in rng.permutation(4)]
    expected = etrm_batches(sizes, 3)
    assert expected < 7 * 100 // 3  # trimming loses queries
    assert ds.total_steps(100) == len(list(ds)) == expected


def test_batch_fill_is_checked(strict: Path) -> None:
    with pytest.raises(ConfigError, match="batch_fill must be one of continue, etrm"):
        make(strict, batch_fill="trim")
    with pytest.raises(ConfigError, match="sampler 'few_shot_eval' has no option 'batch_fill'"):
        make(strict, "test", batch_fill="etrm")


# ----------------------------------------------------------------------------------------------
# Resume and ranks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("split", "fill"), [("train", {}), ("test", {}), ("train", {"batch_fill": "etrm"})]
)
def test_resume_continues_with_the_next_batch(strict: Path, split: str, fill: dict) -> None:
    full = make(strict, split, gbs=2, epochs=2, seed=4, **fill)
    reference = list(full) + list(full)
    half = make(strict, split, gbs=2, epochs=2, seed=4, **fill)
    taken = []
    iterator = iter(half)
    for _ in range(3):
        taken.append(next(iterator))
    state = half.state_dict()
    resumed = make(strict, split, gbs=2, epochs=2, seed=4, **fill)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed)
    if split == "train":
        rest += list(resumed)
    first = len(list(make(strict, split, gbs=2, epochs=2, seed=4, **fill)))
    got = taken + rest
    expected = reference if split == "train" else reference[:first]
    assert len(got) == len(expected)
    for (n1, b1, e1), (n2, b2, e2) in zip(got, expected, strict=True):
        assert (n1, e1) == (n2, e2)
        assert all(torch.equal(b1[k], b2[k]) for k in FIELDS)
    # Other options mean other batches: the state is refused.
    other = make(strict, split, gbs=2, epochs=2, seed=4, max_demos=3, **fill)
    with pytest.raises(DataError, match="sampler_options"):
        other.load_state_dict(state)
    if fill:  # a run's loader always names its options (training.data)
        with pytest.raises(DataError, match="sampler_options"):
            make(strict, split, gbs=2, epochs=2, seed=4, max_demos=10).load_state_dict(state)


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_ranks_concatenate_to_one(strict: Path, split: str) -> None:
    one = list(make(strict, split, gbs=4, epochs=2))
    ranks = [list(make(strict, split, gbs=4, epochs=2, rank=r, replicas=2)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) > 0
    short = False
    for (_, full, n), (_, a, na), (_, b, nb) in zip(one, *ranks, strict=True):
        assert n == na == nb
        for key in FIELDS:
            assert torch.equal(torch.cat([a[key], b[key]]), full[key]), key
        short |= n < 4
        if n <= 2:  # rank 1 holds only blank rows
            assert not b["demo_mask"].any() and (b["labels"] == IGNORE_LABEL_ID).all()
            assert (b["puzzle_identifiers"] == 0).all() and (b["group_ids"] == -1).all()
    assert short == (split == "test")


# ----------------------------------------------------------------------------------------------
# Refusals and bad input
# ----------------------------------------------------------------------------------------------
def test_data_without_demonstrations_is_refused(tmp_path: Path) -> None:
    sudoku = tmp_path / "sudoku"
    assert run_cli(build_sudoku_dataset.main, ["--generate", "4", "--generate-test", "2",
                                                "--output-dir", str(sudoku)]) == 0  # fmt: skip
    maze = tmp_path / "maze"
    argv = [
        "--generate",
        "2",
        "--generate-test",
        "1",
        "--grid-size",
        "5",
        "--output-dir",
        str(maze),
    ]
    assert run_cli(build_maze_dataset.main, argv) == 0
    for path in (sudoku, maze):
        for split in ("train", "test"):
            with pytest.raises(DataError) as info:
                make(path, split)
            message = str(info.value)
            assert "\n" not in message and "num_demos" in message and "ARC" in message


def test_trm_split_is_refused(tasks: tuple[str, dict], tmp_path: Path) -> None:
    out = tmp_path / "trm"
    argv = ["--input-file-prefix", tasks[0], "--output-dir", str(out), "--subsets", "training",
            "evaluation", "--test-set-name", "evaluation", "--num-aug", "1"]  # fmt: skip
    assert run_cli(build_arc_dataset.main, argv) == 0
    with pytest.raises(DataError) as info:
        make(out, "test")
    assert "\n" not in str(info.value) and "--split-policy strict" in str(info.value)
    from training.data import check_demo_data

    for split in ("train", "test"):
        with pytest.raises(DataError) as info:
            check_demo_data([str(out)], split)
        message = str(info.value)
        assert "\n" not in message and str(out) in message and "--split-policy strict" in message


def test_demo_fields_need_a_demo_sampler_and_options_are_checked(strict: Path) -> None:
    config = PuzzleDatasetConfig(seed=0, dataset_paths=[str(strict)], global_batch_size=2,
                                 test_set_mode=False, epochs_per_iter=1, fields=FIELDS)  # fmt: skip
    with pytest.raises(DataError) as info:
        next(iter(PuzzleDataset(config)))
    assert "\n" not in str(info.value) and "few_shot" in str(info.value)
    with pytest.raises(ConfigError, match="sampler 'uniform' has no option 'max_demos'"):
        PuzzleDataset(config.model_copy(update={"sampler_options": {"max_demos": 3}}))
    with pytest.raises(ConfigError, match="target_policy"):
        make(strict, target_policy="all_pairs")
    with pytest.raises(ConfigError, match="max_demos"):
        make(strict, max_demos=0)
    with pytest.raises(ConfigError, match="sampler 'few_shot_eval' has no option 'target_policy'"):
        make(strict, "test", target_policy="test_pairs")


@pytest.mark.parametrize(
    ("values", "problem"),
    [(np.array([1, 1]), "expected 11 integers"), (np.array([1] * 10 + [2]), "outside [0, 1]")],
)
def test_bad_num_demos_is_one_line(tmp_path: Path, values: np.ndarray, problem: str) -> None:
    root = write_varied(tmp_path / "d")
    np.save(root / "train" / "all__num_demos.npy", values)
    with pytest.raises(DataError) as info:
        PuzzleReader([str(root)], "train")
    message = str(info.value)
    assert "\n" not in message and "all__num_demos.npy" in message and problem in message


def test_num_demos_is_optional_and_split_policy_inferred(tmp_path: Path, strict: Path) -> None:
    plain = tmp_path / "plain"
    write_split(plain, "train")
    reader = PuzzleReader([str(plain)], "train")
    assert reader.sets[0].num_demos is None and reader.metadata.split_policy is None
    varied = write_varied(tmp_path / "v")
    reader = PuzzleReader([str(varied)], "train")
    assert reader.sets[0].num_demos.tolist() == [1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1]
    assert reader.metadata.split_policy == "strict"  # no split_policy, every puzzle has demos
    assert PuzzleReader([str(strict)], "test").metadata.split_policy == "strict"


def test_training_loaders_of_a_family_that_reads_demos(
    strict: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data as data_module
    from training.config import load_pretrain_config
    from utils.config import compose
    from utils.distributed import DistInfo

    class ReadsDemos:
        batch_fields = tuple(FIELDS)

    monkeypatch.setattr(data_module, "family_of", lambda arch: ReadsDemos())
    overrides = ["+experiment=tiny_cpu", "logger=none", "data_workers=0", "global_batch_size=4",
                 f"data_paths=[{strict}]", "++max_demos=3", "++max_train_groups=2",
                 "++max_eval_groups=1", "++target_policy=leave_one_out"]  # fmt: skip
    config = load_pretrain_config(compose(overrides=overrides))
    _, train = data_module.create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    _, test = data_module.create_dataloader(config, "test", DistInfo(), test_set_mode=True)
    assert (train.sampler_name, test.sampler_name) == ("few_shot", "few_shot_eval")
    options = (train.sampler.max_demos, train.sampler.max_groups, train.sampler.target_policy)
    assert options == (3, 2, "leave_one_out")
    options = (test.sampler.max_demos, test.sampler.max_groups, test.sampler.target_policy)
    assert options == (3, 1, "test_pairs")
    _, batch, _ = next(iter(train))
    assert batch["demo_inputs"].shape == (4, 3, 900) and set(batch) == set(FIELDS)
    uniform = config.model_copy(update={"sampler": "uniform"})
    with pytest.raises(ConfigError, match="sampler=uniform does not choose demonstrations"):
        data_module.create_dataloader(uniform, "train", DistInfo(), test_set_mode=False)


# ----------------------------------------------------------------------------------------------
# A dataset built by ETRM's own builder, and what ETRM's loader yields on it
# ----------------------------------------------------------------------------------------------
# ETRM's FewShotPuzzleDataset (109b070) on the fixture, (seed, batch, epochs_per_iter) -> for three
# iterations: its batches, and the groups it visited (its permutations, recorded).
ETRM_TRAIN = {
    (0, 3, 2): [(2, [0, 1, 2, 0, 1, 2]), (2, [0, 2, 1, 1, 2, 0]), (2, [0, 1, 2, 0, 1, 2])],
    (7, 2, 3): [
        (5, [2, 0, 1, 1, 2, 0, 0, 1, 2]),
        (5, [2, 1, 0, 0, 2, 1, 2, 0, 1]),
        (5, [0, 1, 2, 0, 2, 1, 0, 1, 2]),
    ],
    (3, 5, 4): [
        (3, [0, 1, 2, 2, 0, 1, 2, 1, 0, 1, 0, 2]),
        (3, [2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 2, 1]),
        (3, [0, 1, 2, 0, 2, 1, 2, 0, 1, 0, 2, 1]),
    ],
}
ETRM_QUERIES = {0: 1, 1: 1, 2: 2}  # test pairs per group: 0520fde7, 05269061, 239be575
# Its test iterator, batch -> (effective size, identifiers, sha256 of demo_inputs, demo_labels,
# demo_mask, inputs, labels, puzzle_identifiers in that order, padding rows included).
ETRM_TEST = {
    64: [(9, [10, 10, 11, 11, 12, 12, 13, 14, 15],
          "5d96f1b30689b9f0ac64b7e5588d5d126a0f018b58247a6472d7df40f7abd79d")],
    2: [(2, [10, 10], "bd70abb3fb467e9e97b232f6035f01e81df985c314f9602ad8a11bf55626e162"),
        (2, [11, 11], "9f9755e6f2df034e808da874010a2e75dcd66f5378e1d750487ec928131a102e"),
        (2, [12, 12], "01ab104b91118ead5d7cfebb508db82e2757c8e9f256f54c3523b673ba367239"),
        (2, [13, 14], "fb08756ecd0dc7df50438b8351aeb57e248691c717dd012c5dac96b668aa3599"),
        (1, [15], "8110d07992fa2b6ad39c5ae5fe68be4d76084c1f424ebca0179fb66f7ed7c6e5")],
}  # fmt: skip
# At batch 3 ETRM's test iterator lost the second query of puzzle 11 (8 of the 9 items).
ETRM_TEST_GBS3_IDS = [10, 10, 11, 12, 12, 13, 14, 15]
ETRM_HASHED = ("demo_inputs", "demo_labels", "demo_mask", "inputs", "labels", "puzzle_identifiers")


def test_etrm_built_dataset_loads_as_strict() -> None:
    data = raw(ETRM_FIXTURE, "test")
    meta = json.loads((ETRM_FIXTURE / "test" / "dataset.json").read_text())
    assert "split_policy" not in meta
    for split in ("train", "test"):
        reader = PuzzleReader([str(ETRM_FIXTURE)], split)
        assert reader.metadata.split_policy == "strict"
        assert reader.sets[0].num_demos is not None
    # Item 0 of the evaluation: the first query of puzzle 0, with puzzle 0's first examples.
    _, batch, _ = next(iter(make(ETRM_FIXTURE, "test", gbs=4)))
    n_demo = int(data["num_demos"][0])
    assert int(batch["demo_mask"][0].sum()) == n_demo
    for k in range(n_demo):
        assert np.array_equal(batch["demo_inputs"][0, k].numpy(), data["inputs"][k])
        assert np.array_equal(batch["demo_labels"][0, k].numpy(), data["labels"][k])
    assert np.array_equal(batch["inputs"][0].numpy(), data["inputs"][n_demo])
    # The demos decode to the raw evaluation task in test_puzzles.json.
    names = identifiers(ETRM_FIXTURE)
    raw_tasks = json.loads((ETRM_FIXTURE / "test_puzzles.json").read_text())
    base, to_original = undo(names[int(batch["puzzle_identifiers"][0])])
    decoded = [(to_original(a), to_original(b)) for a, b in demo_pairs(batch, 0)]
    assert same_pairs(decoded, source_pairs(raw_tasks[base], "train"))


@pytest.mark.parametrize(("seed", "gbs", "epochs"), list(ETRM_TRAIN))
def test_training_visits_the_groups_as_etrm(seed: int, gbs: int, epochs: int) -> None:
    ds = make(ETRM_FIXTURE, gbs=gbs, seed=seed, epochs=epochs, fields=["group_ids"])
    sampler = ds.sampler
    assert isinstance(sampler, FewShotSampler)
    total = 0
    for iteration, (etrm_batches, visits) in enumerate(ETRM_TRAIN[(seed, gbs, epochs)]):
        counter = sampler.set_counter(sampler.iteration_counter(iteration), 0)
        assert sampler.visit_picks(0, counter)[0].tolist() == visits
        got = [int(g) for _, b, _ in ds for g in b["group_ids"]]
        stream = [g for g in visits for _ in range(ETRM_QUERIES[g])]
        assert got == stream[: len(stream) // gbs * gbs]
        # ETRM loses the rest of the visit that fills a batch, so it may emit fewer.
        assert len(got) // gbs >= etrm_batches
        total += len(got) // gbs
    assert ds.total_steps(3 * epochs) == total


@pytest.mark.parametrize("gbs", list(ETRM_TEST))
def test_evaluation_batches_equal_etrms(gbs: int) -> None:
    got = []
    for _, batch, effective in make(ETRM_FIXTURE, "test", gbs=gbs):
        digest = hashlib.sha256()
        for key in ETRM_HASHED:
            digest.update(batch[key].numpy().tobytes())
        ids = batch["puzzle_identifiers"][:effective].tolist()
        got.append((effective, ids, digest.hexdigest()))
    assert got == ETRM_TEST[gbs]


def test_evaluation_keeps_the_query_etrm_dropped() -> None:
    ds = make(ETRM_FIXTURE, "test", gbs=3, fields=["puzzle_identifiers"])
    ids = [int(i) for _, b, n in ds for i in b["puzzle_identifiers"][:n]]
    assert sorted(ids) == sorted([*ETRM_TEST_GBS3_IDS, 11])


# What ETRM's loader yields in training, by tests/golden/etrm_fewshot_train_capture.py.
ETRM_TRAIN_GOLDEN = json.loads((REPO / "tests/golden/etrm_fewshot_train_batches.json").read_text())


def fewshot_batches(case: dict, **options: object) -> list[list[list[list]]]:
    """The golden's iteration -> batch -> rank -> [identifiers, sha256] from this sampler."""
    replicas, gbs = case["num_replicas"], case["global_batch_size"]
    loaders = [
        make(ETRM_FIXTURE, gbs=gbs, seed=case["seed"], epochs=case["epochs_per_iter"], rank=r,
             replicas=replicas, fields=list(ETRM_HASHED), max_demos=case["max_demos"],
             max_groups=case["max_groups"], **options)
        for r in range(replicas)
    ]  # fmt: skip
    iterations = []
    for _ in case["iterations"]:
        per_rank = [list(loader) for loader in loaders]
        assert len({len(batches) for batches in per_rank}) == 1
        batches = []
        for row in zip(*per_rank, strict=True):
            entry = []
            for _, batch, effective in row:
                assert effective == gbs and len(batch["inputs"]) == gbs // replicas
                digest = hashlib.sha256()
                for key in ETRM_HASHED:
                    digest.update(batch[key].numpy().tobytes())
                entry.append([batch["puzzle_identifiers"].tolist(), digest.hexdigest()])
            batches.append(entry)
        iterations.append(batches)
    return iterations


@pytest.mark.parametrize(
    "case",
    ETRM_TRAIN_GOLDEN["cases"],
    ids=lambda c: "seed{seed}-gbs{global_batch_size}-e{epochs_per_iter}-ws{num_replicas}".format(
        **c
    ),
)
def test_etrm_fill_yields_etrms_training_batches(case: dict) -> None:
    got = fewshot_batches(case, batch_fill="etrm")
    assert got == case["iterations"]
    ds = make(ETRM_FIXTURE, gbs=case["global_batch_size"], seed=case["seed"],
              epochs=case["epochs_per_iter"], max_demos=case["max_demos"],
              max_groups=case["max_groups"], batch_fill="etrm")  # fmt: skip
    emitted = [len(batches) for batches in case["iterations"]]
    assert [ds.num_batches(i) for i in range(len(emitted))] == emitted
    assert ds.total_steps(len(emitted) * case["epochs_per_iter"]) == sum(emitted)


def test_default_fill_is_not_etrms() -> None:
    # The golden can tell the two fills apart: the default keeps every query of every visit.
    case = ETRM_TRAIN_GOLDEN["cases"][1]
    assert fewshot_batches(case) != case["iterations"]


@pytest.mark.parametrize(("seed", "gbs", "epochs"), list(ETRM_TRAIN))
def test_etrm_fill_emits_etrms_batch_counts(seed: int, gbs: int, epochs: int) -> None:
    ds = make(ETRM_FIXTURE, gbs=gbs, seed=seed, epochs=epochs, fields=["group_ids"],
              batch_fill="etrm")  # fmt: skip
    counts = [batches for batches, _ in ETRM_TRAIN[(seed, gbs, epochs)]]
    assert [len(list(ds)) for _ in counts] == counts
    assert ds.total_steps(len(counts) * epochs) == sum(counts)


def test_the_run_config_chooses_the_batch_fill(strict: Path) -> None:
    """``batch_fill`` reaches the training sampler from the run config (``training.data``), is
    left out of the options by default (older checkpoints' loader states keep resuming), and
    a state saved with options is refused by a loader without any."""
    from training.config import load_pretrain_config
    from training.data import _demo_sampling
    from utils.config import compose

    def options(*overrides: str) -> dict:
        config = load_pretrain_config(compose(overrides=["arch=etrm", *overrides]))
        return _demo_sampling(config, test_set_mode=False)[1]

    assert "batch_fill" not in options()
    assert options("batch_fill=etrm")["batch_fill"] == "etrm"
    with pytest.raises(ConfigError, match="batch_fill"):
        options("batch_fill=trim")
    trimmed = make(strict, "train", gbs=3, epochs=2, batch_fill="etrm")
    next(iter(trimmed))
    bare = make(strict, "train", gbs=3, epochs=2)
    with pytest.raises(DataError, match="sampler_options"):
        bare.load_state_dict(trimmed.state_dict())
