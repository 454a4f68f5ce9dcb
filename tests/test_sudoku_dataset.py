"""Tests for ``dataset/build_sudoku_dataset.py``: transforms, generator, layout, CLI, errors.

Every expectation is computed independently of the module: Sudoku validity with plain sets,
solution counts with an exact-cover (Algorithm X) solver written here, token ids from the CSV
characters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dataset import build_sudoku_dataset as sudoku
from dataset.common import run_cli

REPO_ROOT = Path(__file__).resolve().parent.parent
HEADER = "source,q,a,rating"
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
# Damages the CSVs in a folder; returns the file the error must name and its line (None: no line).
Corrupt = Callable[[Path], tuple[str, int | None]]


# ----------------------------------------------------------------------------------------------
# Independent helpers
# ----------------------------------------------------------------------------------------------
def is_sudoku_solution(grid: np.ndarray) -> bool:
    """Rows, columns and boxes each hold 1..9 exactly once (plain-Python check)."""
    g = np.asarray(grid).reshape(9, 9).tolist()
    units = [g[r] for r in range(9)]
    units += [[g[r][c] for r in range(9)] for c in range(9)]
    units += [
        [g[3 * br + i][3 * bc + j] for i in range(3) for j in range(3)]
        for br in range(3)
        for bc in range(3)
    ]
    return all(sorted(u) == list(range(1, 10)) for u in units)


Candidate = tuple[int, int, int]


def _select(x: dict, y: dict, cand: Candidate) -> list[set]:
    removed = []
    for col in y[cand]:
        for other in x[col]:
            for other_col in y[other]:
                if other_col != col:
                    x[other_col].remove(other)
        removed.append(x.pop(col))
    return removed


def _deselect(x: dict, y: dict, cand: Candidate, removed: list[set]) -> None:
    for col in reversed(y[cand]):
        x[col] = removed.pop()
        for other in x[col]:
            for other_col in y[other]:
                if other_col != col:
                    x[other_col].add(other)


def _exact_cover(x: dict, y: dict) -> Iterator[None]:
    if not x:
        yield None
        return
    col = min(x, key=lambda k: len(x[k]))
    for cand in list(x[col]):
        removed = _select(x, y, cand)
        yield from _exact_cover(x, y)
        _deselect(x, y, cand, removed)


def exact_cover_count(board: np.ndarray, limit: int) -> int:
    """Solutions of ``board`` (81 values, 0 blank) up to ``limit``, by Knuth's Algorithm X."""
    y: dict[Candidate, list[tuple[str, int, int]]] = {}
    for r in range(9):
        for c in range(9):
            for d in range(1, 10):
                box = (r // 3) * 3 + c // 3
                y[(r, c, d)] = [("cell", r, c), ("row", r, d), ("col", c, d), ("box", box, d)]
    x: dict[tuple[str, int, int], set[Candidate]] = {}
    for cand, cols in y.items():
        for col in cols:
            x.setdefault(col, set()).add(cand)
    g = np.asarray(board).reshape(9, 9)
    for r in range(9):
        for c in range(9):
            if g[r, c]:
                cand = (r, c, int(g[r, c]))
                if any(col not in x for col in y[cand]):
                    return 0
                _select(x, y, cand)
    count = 0
    for _ in _exact_cover(x, y):
        count += 1
        if count >= limit:
            break
    return count


def base_solution() -> np.ndarray:
    """A valid solution from the shifted-row pattern, ``[9, 9]``."""
    return np.array([[(r * 3 + r // 3 + c) % 9 + 1 for c in range(9)] for r in range(9)])


def random_solution(rng: np.random.Generator) -> np.ndarray:
    """A valid solution: relabelled (and maybe transposed) base pattern, ``[9, 9]``."""
    grid = np.concatenate([[0], rng.permutation(9) + 1])[base_solution()]
    return grid.T if rng.random() < 0.5 else grid


def make_rows(n: int, seed: int) -> list[list[str]]:
    """``n`` valid CSV rows ``[source, q, a, rating]`` with rating = row index."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        a = random_solution(rng).reshape(81)
        blank = rng.random(81) < 0.5
        blank_char = np.where(rng.random(81) < 0.5, ".", "0")
        q = "".join(ch if b else str(v) for b, ch, v in zip(blank, blank_char, a, strict=True))
        rows.append([f"src{k}", q, "".join(map(str, a)), str(k)])
    return rows


def write_csv(path: Path, rows: list[list[str]], header: str = HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")


def encode(s: str) -> list[int]:
    """Token ids of a CSV board string: blank ('.' or '0') -> 1, digit d -> d + 1."""
    return [1 if ch in ".0" else int(ch) + 1 for ch in s]


def load_split(out: Path, split: str) -> dict[str, np.ndarray]:
    return {f: np.load(out / split / f"all__{f}.npy") for f in FIELDS}


def file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_csv(src / "train.csv", make_rows(6, seed=1))
    write_csv(src / "test.csv", make_rows(3, seed=2))
    return src


def build(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = run_cli(sudoku.main, argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------
def _transform(
    digit_map: list[int] | None = None,
    transpose: bool = False,
    row_perm: list[int] | None = None,
    col_perm: list[int] | None = None,
) -> sudoku.SudokuTransform:
    return sudoku.SudokuTransform(
        digit_map=np.array(digit_map if digit_map is not None else list(range(10))),
        transpose=transpose,
        row_perm=np.array(row_perm if row_perm is not None else list(range(9))),
        col_perm=np.array(col_perm if col_perm is not None else list(range(9))),
    )


def test_transform_hand_checked() -> None:
    x = (np.arange(81) % 10).reshape(9, 9)
    assert np.array_equal(sudoku.apply_sudoku_transform(x, _transform()), x)
    assert np.array_equal(sudoku.apply_sudoku_transform(x, _transform(transpose=True)), x.T)
    bands = [3, 4, 5, 0, 1, 2, 6, 7, 8]
    assert np.array_equal(sudoku.apply_sudoku_transform(x, _transform(row_perm=bands)), x[bands])
    cols = [2, 1, 0, 3, 4, 5, 8, 7, 6]
    assert np.array_equal(sudoku.apply_sudoku_transform(x, _transform(col_perm=cols)), x[:, cols])
    swap12 = [0, 2, 1, 3, 4, 5, 6, 7, 8, 9]
    out = sudoku.apply_sudoku_transform(x, _transform(digit_map=swap12))
    assert out[0].tolist() == [0, 2, 1, 3, 4, 5, 6, 7, 8]
    # Transpose happens before the permutation: out[r, c] = x[col_perm[c], row_perm[r]].
    out = sudoku.apply_sudoku_transform(
        x, _transform(transpose=True, row_perm=bands, col_perm=cols)
    )
    assert out[0, 0] == x[2, 3]
    assert out[1, 6] == x[8, 4]
    expected = [[x[cols[c], bands[r]] for c in range(9)] for r in range(9)]
    assert out.tolist() == expected


@pytest.mark.parametrize("seed", range(20))
def test_random_transform_structure(seed: int) -> None:
    t = sudoku.random_sudoku_transform(np.random.default_rng(seed))
    assert t.digit_map[0] == 0
    assert sorted(t.digit_map[1:].tolist()) == list(range(1, 10))
    for perm in (t.row_perm, t.col_perm):
        assert sorted(perm.tolist()) == list(range(9))
        for k in range(3):
            assert len(set((perm[3 * k : 3 * k + 3] // 3).tolist())) == 1


def test_transpose_flag_varies() -> None:
    flags = {sudoku.random_sudoku_transform(np.random.default_rng(s)).transpose for s in range(40)}
    assert flags == {False, True}


def test_shuffle_keeps_puzzles_valid() -> None:
    rng = np.random.default_rng(0)
    solution = base_solution()
    board = np.where(np.random.default_rng(1).random((9, 9)) < 0.6, 0, solution)
    outputs = set()
    for _ in range(50):
        aug_board, aug_solution = sudoku.shuffle_sudoku(board, solution, rng)
        assert aug_board.shape == aug_solution.shape == (9, 9)
        assert is_sudoku_solution(aug_solution)
        assert ((aug_board == 0) | (aug_board == aug_solution)).all()
        assert (aug_board == 0).sum() == (board == 0).sum()
        outputs.add(aug_board.tobytes())
    assert len(outputs) > 40


def test_shuffle_is_seeded() -> None:
    solution = base_solution()
    board = np.where(np.eye(9, dtype=bool), 0, solution)
    a = sudoku.shuffle_sudoku(board, solution, np.random.default_rng(5))
    b = sudoku.shuffle_sudoku(board, solution, np.random.default_rng(5))
    c = sudoku.shuffle_sudoku(board, solution, np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


# ----------------------------------------------------------------------------------------------
# Rules and solution counting
# ----------------------------------------------------------------------------------------------
def test_is_valid_solution() -> None:
    grid = base_solution()
    assert sudoku.is_valid_solution(grid) and sudoku.is_valid_solution(grid.reshape(81))
    swapped = grid.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # the row stays a permutation, columns break
    assert not sudoku.is_valid_solution(swapped)
    band_swap = grid[[1, 0, 2, 3, 4, 5, 6, 7, 8]]  # rows swapped inside a band: still valid
    assert sudoku.is_valid_solution(band_swap) and is_sudoku_solution(band_swap)
    with_blank = grid.copy()
    with_blank[4, 4] = 0
    assert not sudoku.is_valid_solution(with_blank)
    assert not sudoku.is_valid_solution(grid.reshape(81)[:80])


def test_count_solutions_matches_exact_cover() -> None:
    rng = np.random.default_rng(3)
    outcomes = set()
    for k in range(24):
        solution = random_solution(rng).reshape(81)
        board = solution.copy()
        board[rng.permutation(81)[: 40 + k]] = 0
        expected = exact_cover_count(board, limit=2)
        assert sudoku.count_solutions(board) == expected
        outcomes.add(expected)
    assert outcomes == {1, 2}


def test_count_solutions_edge_cases() -> None:
    full = base_solution()
    assert sudoku.count_solutions(full) == 1
    empty = np.zeros((9, 9), dtype=np.int64)
    assert sudoku.count_solutions(empty) == 2
    assert sudoku.count_solutions(empty, limit=5) == 5
    clash = np.zeros(81, dtype=np.int64)
    clash[[0, 8]] = 7  # same digit twice in row 1
    assert sudoku.count_solutions(clash) == 0 == exact_cover_count(clash, limit=2)
    dead_end = np.zeros((9, 9), dtype=np.int64)
    dead_end[0, 1:] = range(2, 10)
    dead_end[3, 0] = 1  # no clash between givens, but cell (1, 1) has no candidate left
    assert sudoku.count_solutions(dead_end) == 0 == exact_cover_count(dead_end, limit=2)


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------
def test_generated_puzzles_are_unique_and_valid() -> None:
    boards, solutions = sudoku.generate_puzzles(6, np.random.default_rng(0))
    assert boards.shape == solutions.shape == (6, 81)
    assert boards.dtype == solutions.dtype == np.uint8
    for board, solution in zip(boards, solutions, strict=True):
        assert is_sudoku_solution(solution)
        assert ((board == 0) | (board == solution)).all()
        assert (board == 0).sum() >= 40
        assert exact_cover_count(board, limit=2) == 1
    # Minimal: blanking any remaining given of a puzzle makes it ambiguous.
    board = boards[0]
    for cell in np.flatnonzero(board):
        looser = board.copy()
        looser[cell] = 0
        assert exact_cover_count(looser, limit=2) == 2


def test_generator_is_seeded() -> None:
    a = sudoku.generate_puzzles(3, np.random.default_rng(11))
    b = sudoku.generate_puzzles(3, np.random.default_rng(11))
    c = sudoku.generate_puzzles(3, np.random.default_rng(12))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


# ----------------------------------------------------------------------------------------------
# Built dataset
# ----------------------------------------------------------------------------------------------
def test_layout_without_augmentation(
    csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    rc, stdout, _ = build(["--input-dir", str(csv_dir), "--output-dir", str(out)], capsys)
    assert rc == 0
    assert str(out) in stdout and "train" in stdout and "test" in stdout
    assert json.loads((out / "identifiers.json").read_text()) == ["<blank>"]
    for split, n_rows in (("train", 6), ("test", 3)):
        rows = make_rows(n_rows, seed=1 if split == "train" else 2)
        arrays = load_split(out, split)
        assert arrays["inputs"].dtype == arrays["labels"].dtype == np.uint8
        assert arrays["inputs"].shape == arrays["labels"].shape == (n_rows, 81)
        assert arrays["inputs"].tolist() == [encode(r[1]) for r in rows]
        assert arrays["labels"].tolist() == [encode(r[2]) for r in rows]
        for field in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
            assert arrays[field].dtype == np.int32
        assert arrays["puzzle_identifiers"].tolist() == [0] * n_rows
        assert arrays["puzzle_indices"].tolist() == list(range(n_rows + 1))
        assert arrays["group_indices"].tolist() == list(range(n_rows + 1))
        assert json.loads((out / split / "dataset.json").read_text()) == {
            "pad_id": 0,
            "ignore_label_id": 0,
            "blank_identifier_id": 0,
            "vocab_size": 11,
            "seq_len": 81,
            "num_puzzle_identifiers": 1,
            "total_groups": n_rows,
            "mean_puzzle_examples": 1.0,
            "total_puzzles": n_rows,
            "sets": ["all"],
        }


def test_num_aug_multiplies_train_only(
    csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain, aug = tmp_path / "plain", tmp_path / "aug"
    assert build(["--input-dir", str(csv_dir), "--output-dir", str(plain)], capsys)[0] == 0
    argv = ["--input-dir", str(csv_dir), "--output-dir", str(aug), "--num-aug", "3"]
    assert build(argv, capsys)[0] == 0

    originals = load_split(plain, "train")
    train = load_split(aug, "train")
    assert train["inputs"].shape == (24, 81)
    assert train["group_indices"].tolist() == [0, 4, 8, 12, 16, 20, 24]
    assert train["puzzle_indices"].tolist() == list(range(25))
    assert train["puzzle_identifiers"].tolist() == [0] * 24
    meta = json.loads((aug / "train" / "dataset.json").read_text())
    assert (meta["total_groups"], meta["total_puzzles"]) == (6, 24)
    for g in range(6):
        first = 4 * g
        assert np.array_equal(train["inputs"][first], originals["inputs"][g])
        assert np.array_equal(train["labels"][first], originals["labels"][g])
        blanks = (originals["inputs"][g] == 1).sum()
        for k in range(first + 1, first + 4):
            board, solution = train["inputs"][k].astype(int) - 1, train["labels"][k].astype(int) - 1
            assert is_sudoku_solution(solution)
            assert ((board == 0) | (board == solution)).all()
            assert (board == 0).sum() == blanks
            assert not np.array_equal(train["labels"][k], originals["labels"][g])
    assert file_bytes(plain / "test") == file_bytes(aug / "test")


def test_min_difficulty_filters_both_splits(
    csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    argv = ["--input-dir", str(csv_dir), "--output-dir", str(out), "--min_difficulty", "2"]
    assert build(argv, capsys)[0] == 0
    train_rows, test_rows = make_rows(6, seed=1), make_rows(3, seed=2)
    assert load_split(out, "train")["labels"].tolist() == [encode(r[2]) for r in train_rows[2:]]
    assert load_split(out, "test")["labels"].tolist() == [encode(test_rows[2][2])]


def test_subsample_is_seeded_and_train_only(
    csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def subsample(seed: int, name: str) -> Path:
        out = tmp_path / name
        argv = ["--input-dir", str(csv_dir), "--output-dir", str(out)]
        argv += ["--subsample-size", "3", "--seed", str(seed)]
        assert build(argv, capsys)[0] == 0
        return out

    first, again, other = subsample(0, "a"), subsample(0, "b"), subsample(1, "c")
    assert file_bytes(first) == file_bytes(again)
    all_labels = [encode(r[2]) for r in make_rows(6, seed=1)]
    picks = []
    for out in (first, other):
        labels = load_split(out, "train")["labels"].tolist()
        assert len(labels) == 3
        picks.append([all_labels.index(row) for row in labels])
        assert len(set(picks[-1])) == 3
        assert load_split(out, "test")["labels"].shape == (3, 81)
    assert picks[0] != picks[1]

    everything = tmp_path / "all"
    argv = ["--input-dir", str(csv_dir), "--output-dir", str(everything), "--subsample-size", "9"]
    assert build(argv, capsys)[0] == 0
    assert load_split(everything, "train")["labels"].tolist() == all_labels


def test_underscored_flags_match_dashed(
    csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dashed, under = tmp_path / "dashed", tmp_path / "under"
    common = ["2", "--seed", "4", "--subsample-size", "4"]
    argv = ["--input-dir", str(csv_dir), "--output-dir", str(dashed), "--num-aug", *common]
    assert build(argv, capsys)[0] == 0
    argv = ["--input_dir", str(csv_dir), "--output_dir", str(under), "--num_aug", *common]
    assert build(argv, capsys)[0] == 0
    assert file_bytes(dashed) == file_bytes(under)


def test_generate_is_deterministic_and_goes_through_filters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def generate(name: str, *extra: str) -> Path:
        out = tmp_path / name
        assert build(["--generate", "10", "--output-dir", str(out), *extra], capsys)[0] == 0
        return out

    first = generate("a", "--num-aug", "2")
    assert file_bytes(first) == file_bytes(generate("b", "--num-aug", "2"))
    assert file_bytes(first) != file_bytes(generate("c", "--num-aug", "2", "--seed", "1"))
    train, test = load_split(first, "train"), load_split(first, "test")
    assert train["inputs"].shape == (30, 81) and test["inputs"].shape == (2, 81)
    for board, solution in zip(test["inputs"], test["labels"], strict=True):
        assert exact_cover_count(board.astype(int) - 1, limit=2) == 1
        assert is_sudoku_solution(solution.astype(int) - 1)

    # The rating of a generated row is its number of blanks.
    plain = load_split(generate("plain"), "train")
    blanks = (plain["inputs"] == 1).sum(axis=1)
    threshold = int(np.median(blanks))
    filtered = load_split(generate("hard", "--min-difficulty", str(threshold)), "train")
    assert filtered["inputs"].tolist() == plain["inputs"][blanks >= threshold].tolist()
    assert 0 < len(filtered["inputs"]) < 10
    more_test = load_split(generate("t", "--generate-test", "5"), "test")
    assert more_test["inputs"].shape == (5, 81)


class _FakeHub:
    """Stands in for ``huggingface_hub``: serves local files or fails like a dead network."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.calls: list[tuple[str, str, str]] = []

    def hf_hub_download(self, repo_id: str, filename: str, repo_type: str) -> str:
        self.calls.append((repo_id, filename, repo_type))
        if self.folder is None:
            raise OSError("Name or service not known\nsecond line of detail")
        return str(self.folder / filename)


def _install_fake_hub(monkeypatch: pytest.MonkeyPatch, hub: _FakeHub) -> None:
    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = hub.hf_hub_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_hub_source(
    csv_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hub = _FakeHub(csv_dir)
    _install_fake_hub(monkeypatch, hub)
    out, ref = tmp_path / "hub", tmp_path / "ref"
    assert build(["--output-dir", str(out), "--source-repo", "me/sudoku"], capsys)[0] == 0
    assert hub.calls == [
        ("me/sudoku", "train.csv", "dataset"),
        ("me/sudoku", "test.csv", "dataset"),
    ]
    assert build(["--input-dir", str(csv_dir), "--output-dir", str(ref)], capsys)[0] == 0
    assert file_bytes(out) == file_bytes(ref)

    _install_fake_hub(monkeypatch, _FakeHub(None))
    failed = tmp_path / "build" / "failed"
    rc, _, err = build(["--output-dir", str(failed)], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "train.csv" in err and "--input-dir" in err and "--generate" in err
    assert not (tmp_path / "build").exists() or list((tmp_path / "build").iterdir()) == []


def _missing_test(src: Path) -> tuple[str, int | None]:
    (src / "test.csv").unlink()
    return "test.csv", None


def _empty_file(src: Path) -> tuple[str, int | None]:
    (src / "train.csv").write_text("")
    return "train.csv", 1


def _bad_header(src: Path) -> tuple[str, int | None]:
    write_csv(src / "train.csv", make_rows(6, seed=1), header="source,question,a,rating")
    return "train.csv", 1


def _edit_row(file: str, row: int, column: int, value: str) -> Corrupt:
    """Replace one field of data row ``row`` (0-based; file line ``row + 2``)."""

    def edit(src: Path) -> tuple[str, int | None]:
        rows = make_rows(6 if file == "train.csv" else 3, seed=1 if file == "train.csv" else 2)
        rows[row][column] = value
        write_csv(src / file, rows)
        return file, row + 2

    return edit


def _short_q(src: Path) -> tuple[str, int | None]:
    return _edit_row("train.csv", 1, 1, "." * 80)(src)


def _long_a(src: Path) -> tuple[str, int | None]:
    return _edit_row("test.csv", 0, 2, "1" * 82)(src)


def _bad_char_q(src: Path) -> tuple[str, int | None]:
    q = make_rows(6, seed=1)[2][1]
    return _edit_row("train.csv", 2, 1, q[:40] + "x" + q[41:])(src)


def _blank_in_a(src: Path) -> tuple[str, int | None]:
    a = make_rows(3, seed=2)[1][2]
    return _edit_row("test.csv", 1, 2, "0" + a[1:])(src)


def _bad_rating(src: Path) -> tuple[str, int | None]:
    return _edit_row("train.csv", 4, 3, "hard")(src)


def _too_few_columns(src: Path) -> tuple[str, int | None]:
    rows = make_rows(6, seed=1)
    rows[3] = rows[3][:3]
    write_csv(src / "train.csv", rows)
    return "train.csv", 5


def _rule_breaking_solution(src: Path) -> tuple[str, int | None]:
    rows = make_rows(3, seed=2)
    a = list(rows[1][2])
    a[0], a[1] = a[1], a[0]  # row 1 stays a permutation, columns 1 and 2 break
    rows[1][2] = "".join(a)
    rows[1][1] = ".." + rows[1][1][2:]  # no given contradicts the new solution
    write_csv(src / "test.csv", rows)
    return "test.csv", 3


def _contradicted_given(src: Path) -> tuple[str, int | None]:
    rows = make_rows(6, seed=1)
    a = rows[3][2]
    wrong = str(int(a[10]) % 9 + 1)
    rows[3][1] = rows[3][1][:10] + wrong + rows[3][1][11:]
    write_csv(src / "train.csv", rows)
    return "train.csv", 5


@pytest.mark.parametrize(
    "corrupt",
    [
        _missing_test,
        _empty_file,
        _bad_header,
        _short_q,
        _long_a,
        _bad_char_q,
        _blank_in_a,
        _bad_rating,
        _too_few_columns,
        _rule_breaking_solution,
        _contradicted_given,
    ],
)
def test_bad_input_is_one_line_error(
    corrupt: Corrupt, csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, line = corrupt(csv_dir)
    parent = tmp_path / "build"
    out = parent / "data"
    rc, _, err = build(["--input-dir", str(csv_dir), "--output-dir", str(out)], capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(csv_dir / file) in err
    if line is not None:
        assert f"{file}:{line}: " in err
    assert not out.exists()
    assert not parent.exists() or list(parent.iterdir()) == []


def test_bad_input_error_messages(csv_dir: Path, tmp_path: Path) -> None:
    messages = {}
    for name, corrupt in (
        ("char", _bad_char_q),
        ("rules", _rule_breaking_solution),
        ("given", _contradicted_given),
    ):
        src = tmp_path / name
        src.mkdir()
        write_csv(src / "train.csv", make_rows(6, seed=1))
        write_csv(src / "test.csv", make_rows(3, seed=2))
        corrupt(src)
        with pytest.raises(sudoku.DatasetBuildError) as excinfo:
            sudoku.main(["--input-dir", str(src), "--output-dir", str(tmp_path / "out")])
        messages[name] = str(excinfo.value)
    assert "'x' at position 41" in messages["char"]
    assert "column 1 is not a permutation" in messages["rules"]
    assert "disagrees with the given at row 2, column 2" in messages["given"]


def test_failed_build_keeps_previous_dataset(
    csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    assert build(["--input-dir", str(csv_dir), "--output-dir", str(out)], capsys)[0] == 0
    before = file_bytes(out)
    _contradicted_given(csv_dir)
    assert build(["--input-dir", str(csv_dir), "--output-dir", str(out)], capsys)[0] == 2
    assert file_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--generate-test", "3"],
        ["--generate", "3", "--input-dir", "x"],
        ["--generate", "0"],
        ["--num-aug", "-1"],
        ["--subsample-size", "0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        sudoku.main(argv)
    assert excinfo.value.code == 2
    capsys.readouterr()


def test_module_and_script_forms(csv_dir: Path, tmp_path: Path) -> None:
    module_out, script_out = tmp_path / "module", tmp_path / "script"
    flags = ["--input-dir", str(csv_dir), "--num-aug", "1"]
    module = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataset.build_sudoku_dataset",
            *flags,
            "--output-dir",
            str(module_out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert module.returncode == 0, module.stderr
    script = REPO_ROOT / "dataset" / "build_sudoku_dataset.py"
    run = subprocess.run(
        [sys.executable, str(script), *flags, "--output-dir", str(script_out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert str(script_out) in run.stdout
    assert file_bytes(module_out) == file_bytes(script_out)

    (csv_dir / "test.csv").unlink()
    failed = subprocess.run(
        [sys.executable, str(script), *flags, "--output-dir", str(tmp_path / "failed")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and "test.csv" in failed.stderr
    assert not (tmp_path / "failed").exists()
