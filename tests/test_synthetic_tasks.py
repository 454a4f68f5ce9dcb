"""The colour-substitution task family: rules, held-out rules, the demo-free bound, files.

Expectations are independent of the module: rules are read back from the grids cell by cell,
the bound is checked against values worked out by hand and against a Bayes-optimal predictor
run on sampled queries, and the files go through the real ARC builder.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dataset import build_arc_dataset as arc
from dataset import synthetic_tasks as st
from dataset.common import DatasetBuildError, inverse_aug, run_cli


def read_rule(pair: dict) -> tuple[int, int]:
    """The (A, B) a pair shows: the colour of the cells that changed, and what they became."""
    changed = {
        (i, o)
        for row_in, row_out in zip(pair["input"], pair["output"], strict=True)
        for i, o in zip(row_in, row_out, strict=True)
        if i != o
    }
    assert len(changed) == 1, f"one colour changes into one colour, got {changed}"
    return changed.pop()


@pytest.fixture(scope="module")
def drawn() -> st.GeneratedFamily:
    return st.generate(st.SubstitutionFamily(), train_tasks=300, eval_tasks=60, seed=3)


def test_every_pair_follows_its_task_rule(drawn: st.GeneratedFamily) -> None:
    family = drawn.family
    for subset, tasks in drawn.tasks.items():
        for name, task in tasks.items():
            a, b = drawn.rules[subset][name]
            assert len(task["train"]) == family.num_demos
            assert family.min_tests <= len(task["test"]) <= family.max_tests
            for pair in task["train"] + task["test"]:
                grid_in = np.array(pair["input"])
                assert family.min_side <= grid_in.shape[0] <= family.max_side
                assert family.min_side <= grid_in.shape[1] <= family.max_side
                assert len(set(grid_in.ravel().tolist())) == family.palette_size
                for row_in, row_out in zip(pair["input"], pair["output"], strict=True):
                    assert row_out == [b if c == a else c for c in row_in]
                assert read_rule(pair) == (a, b), "A always occurs, so every pair shows the rule"


def test_heldout_rules_never_reach_training(drawn: st.GeneratedFamily) -> None:
    seen = {
        subset: {read_rule(p) for t in tasks.values() for p in t["train"] + t["test"]}
        for subset, tasks in drawn.tasks.items()
    }
    assert not seen["training"] & seen["evaluation"]
    # Offsets 2, 5, 8 hold out 3 of the 8 targets of every source colour: 27 rules of 72.
    train_rules, eval_rules = drawn.family.rule_split()
    assert (len(train_rules), len(eval_rules)) == (45, 27)
    assert seen["training"] <= set(train_rules) and seen["evaluation"] <= set(eval_rules)
    assert len(seen["training"]) == 45, "300 tasks cover every training rule"
    for colour in range(1, 10):
        assert sum(a == colour for a, _ in eval_rules) == 3
        assert sum(b == colour for _, b in eval_rules) == 3
    assert (1, 3) in eval_rules and (9, 2) in eval_rules and (1, 2) in train_rules


def test_no_heldout_offsets_share_all_rules() -> None:
    family = st.SubstitutionFamily(heldout_offsets=())
    train_rules, eval_rules = family.rule_split()
    assert train_rules == eval_rules and len(train_rules) == 72


def test_draws_are_reproducible_and_subsets_independent() -> None:
    family = st.SubstitutionFamily()
    one = st.generate(family, train_tasks=20, eval_tasks=10, seed=7)
    two = st.generate(family, train_tasks=20, eval_tasks=10, seed=7)
    more = st.generate(family, train_tasks=50, eval_tasks=10, seed=7)
    other = st.generate(family, train_tasks=20, eval_tasks=10, seed=8)
    assert one.tasks == two.tasks
    assert more.tasks["evaluation"] == one.tasks["evaluation"]
    assert other.tasks["evaluation"] != one.tasks["evaluation"]


def test_demo_free_bound_by_hand() -> None:
    # All 72 rules, 3 colours per grid: 0 joins the palette with probability 2/9, leaving 2
    # candidate sources, else 3; each source has 8 targets: 2/9 / 16 + 7/9 / 24 = 5/108.
    shared = st.SubstitutionFamily(heldout_offsets=())
    assert st.demo_free_bound(shared, shared.rule_split()[1]) == Fraction(5, 108)
    # Held-out offsets 2, 5, 8: 3 targets per source: 2/9 / 6 + 7/9 / 9 = 10/81.
    held = st.SubstitutionFamily()
    assert st.demo_free_bound(held, held.rule_split()[1]) == Fraction(10, 81)
    # One rule: a demo-free model knows it, so the bound is 1.
    assert st.demo_free_bound(held, [(4, 7)]) == 1
    # A single colour per grid: the source is visible, only B is unknown (8, or 3 held out).
    mono = st.SubstitutionFamily(palette_size=1)
    assert st.demo_free_bound(mono, mono.rule_split()[1]) == Fraction(1, 3)


def test_bayes_optimal_demo_free_predictor_reaches_the_bound() -> None:
    """A predictor that sees only the query input, guessing the first rule whose source occurs
    in it, scores the bound on sampled evaluation queries (within 4 standard errors), and no
    predictor can do better on average."""
    family = st.SubstitutionFamily()
    _, eval_rules = family.rule_split()
    rng = np.random.default_rng(11)
    n, hits = 6000, 0
    for _ in range(n):
        rule = eval_rules[int(rng.integers(0, len(eval_rules)))]
        grid = st.sample_grid(rng, family, rule[0])
        present = set(grid.ravel().tolist())
        guess = next(r for r in eval_rules if r[0] in present)
        target = np.where(grid == rule[0], rule[1], grid)
        hits += np.array_equal(np.where(grid == guess[0], guess[1], grid), target)
    bound = float(st.demo_free_bound(family, eval_rules))
    stderr = math.sqrt(bound * (1 - bound) / n)
    assert abs(hits / n - bound) < 4 * stderr
    copy_hits = sum(
        np.array_equal(g, st.apply_rule(g, (4, 7)))
        for g in (st.sample_grid(rng, family, 4) for _ in range(200))
    )
    assert copy_hits == 0, "copying the input never solves a task"


def test_files_build_into_a_strict_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    argv = ["--output-dir", str(src), "--train-tasks", "12", "--eval-tasks", "5", "--seed", "1"]
    assert run_cli(st.main, argv) == 0
    record = json.loads((src / "family.json").read_text())
    assert record["demo_free_bound"]["evaluation"] == pytest.approx(10 / 81)
    assert sorted(p.stem for p in (src / "evaluation").iterdir()) == [f"eval{i}" for i in range(5)]
    out = tmp_path / "built"
    argv = ["--input-dir", str(src), "--subsets", "training", "evaluation", "--test-set-name",
            "evaluation", "--split-policy", "strict", "--num-aug", "0",
            "--output-dir", str(out)]  # fmt: skip
    assert run_cli(arc.main, argv) == 0
    names = json.loads((out / "identifiers.json").read_text())
    split = {s: np.load(out / s / "all__puzzle_identifiers.npy") for s in ("train", "test")}
    assert {names[i] for i in split["train"]} == set(record["task_rules"]["training"])
    assert {names[i] for i in split["test"]} == set(record["task_rules"]["evaluation"])
    assert (np.load(out / "test" / "all__num_demos.npy") == 3).all()
    test_puzzles = json.loads((out / "test_puzzles.json").read_text())
    for name, rule in record["task_rules"]["evaluation"].items():
        assert test_puzzles[name] == json.loads((src / "evaluation" / f"{name}.json").read_text())
        assert read_rule(test_puzzles[name]["test"][0]) == tuple(rule)


def test_output_dir_safety(tmp_path: Path) -> None:
    src = tmp_path / "src"
    argv = ["--output-dir", str(src), "--train-tasks", "2", "--eval-tasks", "1"]
    assert run_cli(st.main, argv) == 0
    assert run_cli(st.main, argv) == 2, "written earlier: needs --overwrite"
    assert run_cli(st.main, [*argv, "--overwrite", "--seed", "5"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert run_cli(st.main, ["--output-dir", str(foreign), "--train-tasks", "2",
                             "--eval-tasks", "1", "--overwrite"]) == 2  # fmt: skip
    assert (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "kwargs",
    [{"palette_size": 11}, {"min_side": 4, "max_side": 3}, {"heldout_offsets": (9,)},
     {"heldout_offsets": tuple(range(1, 9))}, {"min_side": 1, "palette_size": 2}],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(kwargs: dict) -> None:
    with pytest.raises(DatasetBuildError) as err:
        st.SubstitutionFamily(**kwargs)
    assert "\n" not in str(err.value)


def decode_compact(seq: np.ndarray, side: int) -> np.ndarray:
    """The grid at the origin of a side × side canvas, checking its exact EOS frame."""
    canvas = seq.reshape(side, side).astype(int)
    h = int(np.argmax(np.append(canvas[:, 0] < 2, True)))
    w = int(np.argmax(np.append(canvas[0, :] < 2, True)))
    expected = np.zeros((side, side), dtype=int)
    expected[:h, :w] = canvas[:h, :w]
    expected[h, :w] = 1
    expected[:h, w] = 1
    np.testing.assert_array_equal(canvas, expected)
    return canvas[:h, :w] - 2


def test_compact_canvas_keeps_every_pair_at_the_origin(tmp_path: Path) -> None:
    generated = st.generate(st.SubstitutionFamily(), train_tasks=6, eval_tasks=3, seed=2)
    src = st.write_family(generated, tmp_path / "src")
    built = tmp_path / "built"
    argv = ["--input-dir", str(src), "--subsets", "training", "evaluation", "--test-set-name",
            "evaluation", "--split-policy", "strict", "--num-aug", "2",
            "--output-dir", str(built)]  # fmt: skip
    assert run_cli(arc.main, argv) == 0
    out = st.compact_canvas(built, tmp_path / "compact", side=6)
    names = json.loads((out / "identifiers.json").read_text())
    assert names == json.loads((built / "identifiers.json").read_text())
    for split, subset in (("train", "training"), ("test", "evaluation")):
        meta = json.loads((out / split / "dataset.json").read_text())
        assert meta["seq_len"] == 36 and meta["split_policy"] == "strict"
        for field in ("puzzle_identifiers", "puzzle_indices", "group_indices", "num_demos"):
            np.testing.assert_array_equal(np.load(out / split / f"all__{field}.npy"),
                                          np.load(built / split / f"all__{field}.npy"))  # fmt: skip
        inputs, labels = (np.load(out / split / f"all__{k}.npy") for k in ("inputs", "labels"))
        assert inputs.shape[1] == labels.shape[1] == 36 and inputs.dtype == np.uint8
        indices = np.load(out / split / "all__puzzle_indices.npy")
        for p, ident in enumerate(np.load(out / split / "all__puzzle_identifiers.npy")):
            base, undo = inverse_aug(names[ident])
            task = generated.tasks[subset][base]
            pairs = task["train"] + task["test"]
            assert indices[p + 1] - indices[p] == len(pairs)
            for pair, row in zip(pairs, range(indices[p], indices[p + 1]), strict=True):
                grid_in = undo(decode_compact(inputs[row], 6).astype(np.uint8))
                grid_out = undo(decode_compact(labels[row], 6).astype(np.uint8))
                assert grid_in.tolist() == pair["input"] and grid_out.tolist() == pair["output"]
    assert json.loads((out / "test_puzzles.json").read_text()) == generated.tasks["evaluation"]
    with pytest.raises(DatasetBuildError, match="does not fit a 5x5 canvas"):
        st.compact_canvas(built, tmp_path / "small", side=5)
    assert not (tmp_path / "small").exists()


def test_a_grid_at_the_canvas_edge_gets_its_eos_frame() -> None:
    """The builder writes no EOS beyond the 30 × 30 edge; at the origin the frame is whole."""
    canvas_in = np.zeros((30, 30), dtype=np.uint8)
    canvas_out = np.zeros((30, 30), dtype=np.uint8)
    canvas_in[28:, 27:] = [[2, 3, 4], [5, 6, 7]]  # a 2 × 3 grid in the bottom-right corner
    canvas_out[28:, 27:] = [[9, 9, 4], [5, 6, 7]]
    inputs, labels = st._origin_crop(canvas_in.reshape(1, 900), canvas_out.reshape(1, 900), 4, "x")
    assert inputs.reshape(4, 4).tolist() == [[2, 3, 4, 1], [5, 6, 7, 1], [1, 1, 1, 0], [0] * 4]
    assert labels.reshape(4, 4).tolist() == [[9, 9, 4, 1], [5, 6, 7, 1], [1, 1, 1, 0], [0] * 4]
