"""Tests for ``dataset/build_maze_dataset.py``: generator, validation, encoding, layout, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from dataset import build_maze_dataset as maze_mod
from dataset.build_maze_dataset import (
    FAR_FRACTION,
    generate_maze,
    main,
    shortest_path_length,
    validate_solution,
)
from dataset.common import run_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
HEADER = "source,q,a,rating"

# Hand-written 4x4 mazes (rows joined) and their answers.
M1_Q = "S  #" + "## #" + "G  #" + "####"
M1_A = "Soo#" + "##o#" + "Goo#" + "####"
M2_Q = "#G  " + "#  #" + "# S#" + "####"
M2_A = "#G  " + "#o #" + "#oS#" + "####"
# '#'->1, ' '->2, 'S'->3, 'G'->4, 'o'->5, written out by hand.
M1_Q_IDS = [3, 2, 2, 1, 1, 1, 2, 1, 4, 2, 2, 1, 1, 1, 1, 1]
M1_A_IDS = [3, 5, 5, 1, 1, 1, 5, 1, 4, 5, 5, 1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# Independent reference helpers
# ----------------------------------------------------------------------------------------------
def grid_rows(text: str) -> list[str]:
    side = round(len(text) ** 0.5)
    return [text[r * side : (r + 1) * side] for r in range(side)]


def bfs_from(text: str, char: str) -> dict[tuple[int, int], int]:
    """Distances from the cell holding ``char`` over every non-wall cell."""
    rows = grid_rows(text)
    side = len(rows)
    src = next((r, c) for r in range(side) for c in range(side) if rows[r][c] == char)
    dist = {src: 0}
    queue = deque([src])
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < side and 0 <= nc < side and rows[nr][nc] != "#" and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                queue.append((nr, nc))
    return dist


def find(text: str, char: str) -> tuple[int, int]:
    side = round(len(text) ** 0.5)
    return divmod(text.index(char), side)


def walk_drawn_path(solution: str) -> int | None:
    """Follow the drawn path from S; the number of moves to G, or None if it is not a chain."""
    rows = grid_rows(solution)
    side = len(rows)
    pos, seen, moves = find(solution, "S"), set(), 0
    while rows[pos[0]][pos[1]] != "G":
        seen.add(pos)
        r, c = pos
        nxt = [
            (nr, nc)
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1))
            if 0 <= nr < side and 0 <= nc < side and rows[nr][nc] in "oG" and (nr, nc) not in seen
        ]
        if len(nxt) != 1:
            return None
        pos, moves = nxt[0], moves + 1
    return moves


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [f"test,{q},{a},0" for q, a in rows]
    path.write_text("\n".join(lines) + "\n")


def load_split(out: Path, split: str) -> dict[str, np.ndarray]:
    return {f: np.load(out / split / f"all__{f}.npy") for f in FIELDS}


def all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "count"), [(30, 20), (5, 10), (6, 10), (7, 10), (12, 10)])
def test_generated_mazes_are_valid_shortest_and_far(size: int, count: int) -> None:
    rng = np.random.default_rng(1234 + size)
    for _ in range(count):
        maze, solution = generate_maze(rng, size)
        assert len(maze) == len(solution) == size * size
        assert set(maze) <= set("# SG") and maze.count("S") == maze.count("G") == 1
        assert validate_solution(maze, solution) is None
        dist = bfs_from(maze, "S")
        d_goal = dist[find(maze, "G")]
        # Shortest: the drawn path has d_goal - 1 'o' cells and walks S -> G in d_goal moves.
        assert solution.count("o") + 1 == d_goal
        assert walk_drawn_path(solution) == d_goal
        assert shortest_path_length(maze) == d_goal
        # Far apart, and every open cell is reachable (one connected maze).
        assert d_goal >= FAR_FRACTION * max(dist.values())
        assert len(dist) == sum(ch != "#" for ch in maze)


def test_generated_30x30_mazes_have_loops_and_long_paths() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        maze, solution = generate_maze(rng, 30)
        rows = grid_rows(maze)
        open_cells = [(r, c) for r in range(30) for c in range(30) if rows[r][c] != "#"]
        edges = sum(
            1
            for r, c in open_cells
            for nr, nc in ((r + 1, c), (r, c + 1))
            if nr < 30 and nc < 30 and rows[nr][nc] != "#"
        )
        # A connected graph with at least as many edges as vertices has a cycle: routes differ.
        assert edges >= len(open_cells)
        assert solution.count("o") + 1 >= 30


def test_generate_maze_is_deterministic_per_seed() -> None:
    a = [generate_maze(np.random.default_rng(3), 30) for _ in range(2)]
    b = generate_maze(np.random.default_rng(4), 30)
    assert a[0] == a[1]
    assert b != a[0]


def test_shortest_path_length_hand_mazes() -> None:
    assert shortest_path_length(M1_Q) == 6
    assert shortest_path_length(M2_Q) == 3
    assert shortest_path_length("S#G" + "###" + "###") is None
    assert shortest_path_length("SG  " + "    " + "    " + "    ") == 1


def test_validate_solution_accepts_hand_answers() -> None:
    assert validate_solution(M1_Q, M1_A) is None
    assert validate_solution(M2_Q, M2_A) is None
    # Adjacent S and G: nothing in between is marked.
    assert validate_solution("SG#" + "###" + "###", "SG#" + "###" + "###") is None


@pytest.mark.parametrize(
    ("maze", "solution", "needle"),
    [
        (M1_Q, "Soo#" + "#oo#" + "Goo#" + "####", "through '#'"),  # path through a wall
        (M1_Q, "Soo#" + "## #" + "Goo#" + "####", "broken"),  # gap in the path
        (M1_Q, "Soo#" + "##o#" + "Goo " + "####", "changes '#' to ' '"),  # label edits a wall
        (M1_Q, "ooo#" + "##o#" + "Goo#" + "####", "through 'S'"),  # S overwritten
        (M1_Q, M1_Q, "broken"),  # no path drawn at all
        (M1_Q, M1_A[:-1], "length"),
        (M1_Q[:-1], M1_A[:-1], "not a square"),
        (M1_Q.replace("G", "x"), M1_A, "'x'"),
        (M1_Q.replace("G", " "), M1_A.replace("G", "o"), "expected exactly one"),
        # A 2x2 loop of 'o' cells beside a valid S-G path: degrees fit, connectivity does not.
        ("SG  " + "    " * 3, "SG  " + "    " + "  oo" + "  oo", "not on the path"),
        # A detour that touches itself is not a simple induced path.
        ("S   " + "    " + "G   " + "####", "Soo " + "ooo " + "G   " + "####", "neighbours"),
    ],
)
def test_validate_solution_rejects(maze: str, solution: str, needle: str) -> None:
    reason = validate_solution(maze, solution)
    assert reason is not None and needle in reason
    assert "\n" not in reason


# ----------------------------------------------------------------------------------------------
# Building from CSV
# ----------------------------------------------------------------------------------------------
def build(argv: list[str]) -> int:
    return run_cli(main, argv)


def test_encoding_layout_and_metadata(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_csv(src / "train.csv", [(M1_Q, M1_A), (M2_Q, M2_A)])
    write_csv(src / "test.csv", [(M1_Q, M1_A)])
    assert build(["--input-dir", str(src), "--output-dir", str(out)]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["identifiers.json", "test", "train"]
    assert json.loads((out / "identifiers.json").read_text()) == ["<blank>"]
    for split, n in (("train", 2), ("test", 1)):
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == sorted([f"all__{f}.npy" for f in FIELDS] + ["dataset.json"])
        arrays = load_split(out, split)
        assert arrays["inputs"].dtype == np.uint8 and arrays["inputs"].shape == (n, 16)
        assert arrays["labels"].dtype == np.uint8 and arrays["labels"].shape == (n, 16)
        for f in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
            assert arrays[f].dtype == np.int32
        assert arrays["puzzle_identifiers"].tolist() == [0] * n
        assert arrays["puzzle_indices"].tolist() == list(range(n + 1))
        assert arrays["group_indices"].tolist() == list(range(n + 1))
        assert arrays["inputs"][0].tolist() == M1_Q_IDS
        assert arrays["labels"][0].tolist() == M1_A_IDS
        meta = json.loads((out / split / "dataset.json").read_text())
        assert meta == {
            "pad_id": 0,
            "ignore_label_id": 0,
            "blank_identifier_id": 0,
            "vocab_size": 6,
            "seq_len": 16,
            "num_puzzle_identifiers": 1,
            "total_groups": n,
            "mean_puzzle_examples": 1.0,
            "total_puzzles": n,
            "sets": ["all"],
        }


def explicit_dihedral(g: np.ndarray) -> list[np.ndarray]:
    """Upstream's order: identity, rot90 x1..3, fliplr, flipud, transpose, anti-transpose."""
    return [
        g,
        np.rot90(g, 1),
        np.rot90(g, 2),
        np.rot90(g, 3),
        np.fliplr(g),
        np.flipud(g),
        g.T,
        np.fliplr(np.rot90(g, 1)),
    ]


def test_aug_adds_eight_dihedral_rows_on_train_only(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_csv(src / "train.csv", [(M1_Q, M1_A), (M2_Q, M2_A)])
    write_csv(src / "test.csv", [(M2_Q, M2_A), (M1_Q, M1_A)])
    assert build(["--input-dir", str(src), "--output-dir", str(out), "--aug"]) == 0

    train, test = load_split(out, "train"), load_split(out, "test")
    assert train["inputs"].shape == (16, 16)
    assert train["group_indices"].tolist() == [0, 8, 16]
    assert train["puzzle_indices"].tolist() == list(range(17))
    assert test["inputs"].shape == (2, 16)
    assert test["group_indices"].tolist() == [0, 1, 2]
    meta = json.loads((out / "train" / "dataset.json").read_text())
    assert (meta["total_groups"], meta["total_puzzles"]) == (2, 16)

    for m, (q, a) in enumerate([(M1_Q, M1_A), (M2_Q, M2_A)]):
        for field, text in (("inputs", q), ("labels", a)):
            grid = np.array(["# SGo".index(ch) + 1 for ch in text]).reshape(4, 4)
            for t, expected in enumerate(explicit_dihedral(grid)):
                assert train[field][8 * m + t].tolist() == expected.reshape(-1).tolist()
        # Augmented answers still solve their augmented mazes.
        for t in range(8):
            chars = "".join(" # SGo"[i] for i in train["inputs"][8 * m + t])
            sol = "".join(" # SGo"[i] for i in train["labels"][8 * m + t])
            assert validate_solution(chars, sol) is None
    assert len({bytes(r) for r in train["inputs"][:8]}) == 8  # M1 has no symmetry


def test_subsample_is_seeded_and_train_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mazes = [generate_maze(rng, 7) for _ in range(6)]
    assert len(set(mazes)) == 6
    src = tmp_path / "src"
    write_csv(src / "train.csv", mazes)
    write_csv(src / "test.csv", mazes[:2])
    encoded = {bytes(np.frombuffer(q.encode(), np.uint8)): i for i, (q, _) in enumerate(mazes)}
    to_chars = np.frombuffer(b"\0# SGo", np.uint8)

    picks = []
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        args = ["--input-dir", str(src), "--output-dir", str(out), "--subsample-size", "3"]
        assert build([*args, "--seed", str(seed)]) == 0
        train = load_split(out, "train")
        assert train["inputs"].shape == (3, 49)
        chosen = [encoded[bytes(to_chars[row])] for row in train["inputs"]]
        assert len(set(chosen)) == 3
        picks.append(chosen)
        assert load_split(out, "test")["inputs"].shape == (2, 49)
    again = tmp_path / "again"
    assert (
        build(["--input-dir", str(src), "--output-dir", str(again), "--subsample-size", "3"]) == 0
    )
    assert all_bytes(again) == all_bytes(tmp_path / "out0")
    assert len({tuple(p) for p in picks}) > 1
    # A subsample at least as large as the data keeps every row (upstream's rule).
    full = tmp_path / "full"
    assert build(["--input-dir", str(src), "--output-dir", str(full), "--subsample-size", "9"]) == 0
    assert load_split(full, "train")["inputs"].shape == (6, 49)


def test_hub_download_is_used_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_csv(src / "train.csv", [(M1_Q, M1_A)])
    write_csv(src / "test.csv", [(M2_Q, M2_A)])
    calls = []

    def fake_download(repo_id: str, filename: str, repo_type: str) -> str:
        calls.append((repo_id, filename, repo_type))
        return str(src / filename)

    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = fake_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    assert build(["--output-dir", str(out)]) == 0
    assert calls == [
        ("sapientinc/maze-30x30-hard-1k", "train.csv", "dataset"),
        ("sapientinc/maze-30x30-hard-1k", "test.csv", "dataset"),
    ]
    assert load_split(out, "test")["inputs"].shape == (1, 16)


def test_hub_failure_is_one_line_with_offline_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_download(repo_id: str, filename: str, repo_type: str) -> str:
        raise OSError("Connection refused\nretry later")

    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = failing_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    out = tmp_path / "out"
    assert build(["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "train.csv" in err and "--input-dir" in err and "--generate" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Generator through the CLI, determinism, invocation forms
# ----------------------------------------------------------------------------------------------
def test_generate_is_deterministic_and_valid(tmp_path: Path) -> None:
    args = ["--generate", "8", "--grid-size", "9", "--aug"]
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs[name] = tmp_path / name
        assert build([*args, "--seed", str(seed), "--output-dir", str(outs[name])]) == 0
    assert all_bytes(outs["a"]) == all_bytes(outs["b"])
    assert all_bytes(outs["a"]) != all_bytes(outs["c"])

    train, test = load_split(outs["a"], "train"), load_split(outs["a"], "test")
    assert train["inputs"].shape == (64, 81) and test["inputs"].shape == (2, 81)  # 8 // 4
    for split in (train, test):
        for q_ids, a_ids in zip(split["inputs"], split["labels"], strict=True):
            q = "".join(" # SGo"[i] for i in q_ids)
            a = "".join(" # SGo"[i] for i in a_ids)
            assert walk_drawn_path(a) == bfs_from(q, "S")[find(q, "G")]


def test_generate_test_count_and_default(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert build(["--generate", "3", "--generate-test", "5", "--output-dir", str(out)]) == 0
    assert load_split(out, "train")["inputs"].shape == (3, 900)
    assert load_split(out, "test")["inputs"].shape == (5, 900)
    # The train mazes do not depend on how many test mazes are drawn.
    other = tmp_path / "other"
    assert build(["--generate", "3", "--output-dir", str(other)]) == 0
    assert (out / "train" / "all__inputs.npy").read_bytes() == (
        other / "train" / "all__inputs.npy"
    ).read_bytes()
    assert load_split(other, "test")["inputs"].shape == (1, 900)


def test_script_form_matches_module_form(tmp_path: Path) -> None:
    script_out, module_out = tmp_path / "script", tmp_path / "module"
    proc = subprocess.run(
        [
            sys.executable,
            "dataset/build_maze_dataset.py",
            "--generate",
            "3",
            "--grid_size",
            "7",
            "--seed",
            "5",
            "--output_dir",
            str(script_out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train 3 mazes" in proc.stdout
    argv = ["--generate", "3", "--grid-size", "7", "--seed", "5", "--output-dir", str(module_out)]
    assert build(argv) == 0
    assert all_bytes(script_out) == all_bytes(module_out)


@pytest.mark.parametrize(
    "argv",
    [
        ["--grid-size", "9"],
        ["--generate-test", "2"],
        ["--generate", "2", "--input-dir", "x"],
        ["--generate", "0"],
        ["--generate", "2", "--grid-size", "4"],
        ["--subsample-size", "0"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        build([*argv, "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Bad inputs: one line naming file and line, exit 2, nothing left on disk
# ----------------------------------------------------------------------------------------------
GOOD = f"test,{M1_Q},{M1_A},0"
BAD_INPUTS = {
    "bad_char": (f"test,{M1_Q.replace('G', 'x')},{M1_A},0", 3, "'x'"),
    "non_square": (f"test,{M1_Q[:-1]},{M1_A[:-1]},0", 3, "not a square"),
    "size_mismatch": ("test,S G######,SoG######,0", 3, "is 4x4"),
    "path_through_wall": (f"test,{M1_Q},{'Soo#' + '#oo#' + 'Goo#' + '####'},0", 3, "through"),
    "broken_path": (f"test,{M1_Q},{'Soo#' + '## #' + 'Goo#' + '####'},0", 3, "broken"),
    "disconnected_path": (
        f"test,{M2_Q},{'#G o' + '#o #' + '#oS#' + '####'},0",
        3,
        "(row 0, col 3)",
    ),
    "label_changes_wall": (f"test,{M1_Q},{'Soo#' + '##o#' + 'Goo#' + '### '},0", 3, "'#' to ' '"),
    "field_count": (f"test,{M1_Q},{M1_A}", 3, "fields"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_rows_fail_cleanly(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_row, line, needle = BAD_INPUTS[case]
    src, out = tmp_path / "src", tmp_path / "build" / "out"
    src.mkdir()
    (src / "train.csv").write_text("\n".join([HEADER, GOOD, bad_row, GOOD]) + "\n")
    write_csv(src / "test.csv", [(M1_Q, M1_A)])
    assert build(["--input-dir", str(src), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert "train.csv" in err and f"line {line}:" in err and needle in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_header_missing_file_and_test_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_csv(src / "train.csv", [(M1_Q, M1_A)], header="source,question,answer,rating")
    assert build(["--input-dir", str(src), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.csv" in err and "line 1:" in err and "header" in err

    write_csv(src / "train.csv", [(M1_Q, M1_A)])
    assert build(["--input-dir", str(src), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "test.csv" in err and "not found" in err

    # An error in the test split names test.csv; a grid size differing from train is caught too.
    write_csv(src / "test.csv", [(M1_Q, M1_A), (M1_Q, "S" + M1_A[1:].replace("G", "o"))])
    assert build(["--input-dir", str(src), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "test.csv" in err and "line 3:" in err
    write_csv(src / "test.csv", [("SG#" + "###" + "###", "SG#" + "###" + "###")])
    assert build(["--input-dir", str(src), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "test.csv" in err and "line 2:" in err and "same size" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_build_keeps_previous_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_csv(src / "train.csv", [(M1_Q, M1_A)])
    write_csv(src / "test.csv", [(M2_Q, M2_A)])
    assert build(["--input-dir", str(src), "--output-dir", str(out)]) == 0
    before = all_bytes(out)
    write_csv(src / "train.csv", [(M1_Q, M1_Q)])
    assert build(["--input-dir", str(src), "--output-dir", str(out), "--aug", "--overwrite"]) == 2
    assert "train.csv: line 2:" in capsys.readouterr().err
    assert all_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    capsys.readouterr()


def test_module_exposes_documented_api() -> None:
    for name in ("generate_maze", "shortest_path_length", "validate_solution", "main"):
        fn = getattr(maze_mod, name)
        assert fn.__doc__ and fn.__annotations__
