"""Build the Sudoku-Extreme dataset in the on-disk puzzle format (``dataset.common``).

It follows upstream's ``dataset/build_sudoku_dataset.py`` (``convert_subset``, ``shuffle_sudoku``).

Upstream command lines keep working, e.g.::

    python dataset/build_sudoku_dataset.py --output-dir data/sudoku-extreme-1k-aug-1000 \
        --subsample-size 1000 --num-aug 1000

Rows come from ``sapientinc/sudoku-extreme`` on the Hugging Face hub (``train.csv`` and
``test.csv`` with the header ``source,q,a,rating``), from a local folder (``--input-dir``), or
from a seeded offline generator of unique-solution puzzles (``--generate N``). All three go
through the same parser, validation, ``--min-difficulty`` filter, ``--subsample-size`` draw
(train only) and ``--num-aug`` augmentation (train only).

Layout: every (augmented) board is its own puzzle with one example, all puzzle identifiers are 0,
and a group is one source board plus its augmentations. Cells are 0 (blank) or 1..9 and are
stored +1 (PAD 0, blank 1, digits 2..10), so ``vocab_size`` is 11 and ``seq_len`` 81.

Deliberate divergences from upstream: the subsample and the augmentations use seeded
``np.random.Generator`` streams (``--seed``) instead of the unseeded global NumPy RNG, inputs are
validated (one-line errors naming the file and line), ``total_puzzles`` counts puzzles (upstream
wrote the number of groups there), a failed build leaves nothing on disk, and an existing
``--output-dir`` is replaced only when it holds a dataset built earlier and ``--overwrite`` is
given (upstream wrote into any folder; ``dataset.common.check_output_dir``).

One module per builder, as upstream: its generator, reader, validator and writer stay together
(past 400 lines) so the builder runs as ``python dataset/build_sudoku_dataset.py``.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    # `python dataset/build_sudoku_dataset.py` puts dataset/ (not the repo root) on sys.path.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.common import (
    BLANK_IDENTIFIER,
    OVERWRITE_HELP,
    DatasetBuildError,
    atomic_output_dir,
    check_output_dir,
    flag_aliases,
    run_cli,
    write_identifiers,
    write_single_example_split,
)

CSV_HEADER = ("source", "q", "a", "rating")
SPLITS = ("train", "test")
SEQ_LEN = 81
VOCAB_SIZE = 11  # PAD + cell values 0 (blank) .. 9, stored +1
PAD_ID = 0
IGNORE_LABEL_ID = 0  # PAD never occurs in labels, so every cell counts in the loss

_Q_CHARS = ".0123456789"
_A_CHARS = "123456789"
_Q_PATTERN = re.compile(r"[.0-9]{81}")
_A_PATTERN = re.compile(r"[1-9]{81}")
_FULL = 0b11_1111_1110  # bits 1..9: every digit present in a row/column/box
_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_UNITS = (
    [[r * 9 + c for c in range(9)] for r in range(9)]
    + [[r * 9 + c for r in range(9)] for c in range(9)]
    + [[i for i in range(81) if _BOX[i] == b] for b in range(9)]
)
_VALIDATE_CHUNK = 1 << 16

# Independent RNG streams per purpose, so that e.g. changing --num-aug never changes which puzzles
# are generated or subsampled.
_STREAM_GENERATE = {"train": 0, "test": 1}
_STREAM_SUBSAMPLE = 2
_STREAM_AUGMENT = 3


# ----------------------------------------------------------------------------------------------
# Sudoku rules and solution counting
# ----------------------------------------------------------------------------------------------
def _solution_violation(grid: np.ndarray) -> str | None:
    """Describe the first rule a complete grid breaks, or ``None`` if it is a valid solution."""
    g = np.asarray(grid).reshape(9, 9)
    digits = set(range(1, 10))
    for r in range(9):
        if set(g[r].tolist()) != digits:
            return f"row {r + 1} is not a permutation of 1..9"
    for c in range(9):
        if set(g[:, c].tolist()) != digits:
            return f"column {c + 1} is not a permutation of 1..9"
    for b in range(9):
        box = g[(b // 3) * 3 : (b // 3) * 3 + 3, (b % 3) * 3 : (b % 3) * 3 + 3]
        if set(box.flatten().tolist()) != digits:
            return f"box {b + 1} is not a permutation of 1..9"
    return None


def is_valid_solution(grid: np.ndarray) -> bool:
    """Whether ``grid`` (81 values, shape ``[9, 9]`` or ``[81]``) is a complete, valid Sudoku.

    Valid means every row, column and 3×3 box holds each digit 1..9 exactly once.
    """
    g = np.asarray(grid)
    if g.size != SEQ_LEN:
        return False
    return _solution_violation(g) is None


def _constraint_masks(cells: list[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Digit bitmasks per row, column and box; ``None`` if two givens clash."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(cells):
        if v:
            bit = 1 << v
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return rows, cols, boxes


def _count(
    cells: list[int],
    rows: list[int],
    cols: list[int],
    boxes: list[int],
    empties: list[int],
    limit: int,
) -> int:
    """Count completions of ``cells`` up to ``limit``.

    Propagates naked singles (a cell with one candidate) and hidden singles (a digit with one
    possible cell in a row, column or box) before branching on the cell with the fewest
    candidates; without the hidden singles, proving uniqueness of a sparse puzzle takes many times
    more branches. ``cells`` (truthy = filled) and the masks are mutated during the search and
    restored before returning.
    """
    ROW, COL, BOX, FULL, UNITS = _ROW, _COL, _BOX, _FULL, _UNITS
    trail: list[int] = []
    cand = [0] * SEQ_LEN
    found = 0
    dead = False
    while True:
        best, best_mask, best_n = -1, 0, 10
        placed = False
        for i in empties:
            if cells[i]:
                continue
            r, c, b = ROW[i], COL[i], BOX[i]
            mask = FULL & ~(rows[r] | cols[c] | boxes[b])
            if mask & (mask - 1) == 0:
                if not mask:
                    dead = True
                    break
                cells[i] = mask
                rows[r] |= mask
                cols[c] |= mask
                boxes[b] |= mask
                trail.append(i)
                placed = True
            elif not placed:
                cand[i] = mask
                n = mask.bit_count()
                if n < best_n:
                    best, best_mask, best_n = i, mask, n
        if dead:
            break
        if placed:
            empties = [i for i in empties if not cells[i]]
            continue
        if best < 0:
            break
        for u, unit in enumerate(UNITS):
            once = twice = 0
            for i in unit:
                if not cells[i]:
                    m = cand[i]
                    twice |= once & m
                    once |= m
            used = rows[u] if u < 9 else cols[u - 9] if u < 18 else boxes[u - 18]
            if (once | used) != FULL:
                dead = True
                break
            hidden = once & ~twice & ~used
            if not hidden:
                continue
            for i in unit:
                bit = cand[i] & hidden
                if not bit or cells[i]:
                    continue
                r, c, b = ROW[i], COL[i], BOX[i]
                if bit & (bit - 1) or (rows[r] | cols[c] | boxes[b]) & bit:
                    dead = True
                    break
                cells[i] = bit
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                trail.append(i)
                placed = True
            if dead:
                break
        if dead or not placed:
            break
        empties = [i for i in empties if not cells[i]]
    if not dead:
        if best < 0:
            found = 1
        else:
            r, c, b = ROW[best], COL[best], BOX[best]
            rest = [i for i in empties if i != best]
            while best_mask and found < limit:
                bit = best_mask & -best_mask
                best_mask ^= bit
                cells[best] = bit
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                found += _count(cells, rows, cols, boxes, rest, limit - found)
                rows[r] ^= bit
                cols[c] ^= bit
                boxes[b] ^= bit
                cells[best] = 0
    for i in trail:
        bit = cells[i]
        rows[ROW[i]] ^= bit
        cols[COL[i]] ^= bit
        boxes[BOX[i]] ^= bit
        cells[i] = 0
    return found


def count_solutions(board: np.ndarray, limit: int = 2) -> int:
    """Number of solutions of ``board`` (81 values, 0 = blank), counted up to ``limit``.

    Args:
        board: shape ``[9, 9]`` or ``[81]``, values 0..9.
        limit: stop once this many solutions are found (2 answers "is it unique?").

    Returns:
        ``min(number of solutions, limit)``; 0 when the givens already clash.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    cells = [int(v) for v in np.asarray(board).reshape(SEQ_LEN)]
    if any(v < 0 or v > 9 for v in cells):
        raise ValueError("board values must be in 0..9")
    masks = _constraint_masks(cells)
    if masks is None:
        return 0
    empties = [i for i in range(SEQ_LEN) if cells[i] == 0]
    return _count(cells, *masks, empties, limit)


# ----------------------------------------------------------------------------------------------
# Offline generator
# ----------------------------------------------------------------------------------------------
def _random_solution(rng: np.random.Generator) -> list[int]:
    """A random complete grid: backtracking on the most-constrained cell, digits in random order."""
    # One draw up front: the order in which each cell tries the digits 1..9.
    digit_order = (rng.random((SEQ_LEN, 9)).argsort(axis=1) + 1).tolist()
    cells = [0] * SEQ_LEN
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9

    def fill() -> bool:
        best, best_mask, best_n = -1, 0, 10
        for i in range(SEQ_LEN):
            if cells[i]:
                continue
            mask = _FULL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            n = mask.bit_count()
            if n < best_n:
                if n == 0:
                    return False
                best, best_mask, best_n = i, mask, n
        if best < 0:
            return True
        r, c, b = _ROW[best], _COL[best], _BOX[best]
        for d in digit_order[best]:
            bit = 1 << d
            if not best_mask & bit:
                continue
            cells[best] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            if fill():
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            cells[best] = 0
        return False

    if not fill():
        raise AssertionError("an empty Sudoku grid always has a completion")
    return cells


def _carve(solution: list[int], order: Sequence[int]) -> list[int]:
    """Blank cells of ``solution`` in ``order``, keeping a blank only if the puzzle stays unique.

    The known solution is one completion, so the puzzle stays unique exactly when no completion
    puts a different digit in the blanked cell; that single search is much cheaper than counting.
    """
    cells = list(solution)
    rows, cols, boxes = [_FULL] * 9, [_FULL] * 9, [_FULL] * 9
    for i in order:
        v = cells[i]
        bit = 1 << v
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        cells[i] = 0
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        alternatives = _FULL & ~(rows[r] | cols[c] | boxes[b]) & ~bit
        empties = [j for j in range(SEQ_LEN) if cells[j] == 0 and j != i]
        unique = True
        while alternatives and unique:
            alt = alternatives & -alternatives
            alternatives ^= alt
            cells[i] = alt.bit_length() - 1
            rows[r] |= alt
            cols[c] |= alt
            boxes[b] |= alt
            unique = _count(cells, rows, cols, boxes, empties, 1) == 0
            rows[r] ^= alt
            cols[c] ^= alt
            boxes[b] ^= alt
            cells[i] = 0
        if not unique:
            cells[i] = v
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return cells


def generate_puzzles(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` Sudoku puzzles with a unique solution.

    Each puzzle is a random complete grid from which cells are blanked in random order, a blank
    being kept only if the solution stays unique. The result is minimal: blanking any remaining
    given would make the solution ambiguous.

    Returns:
        ``(boards, solutions)``, both uint8 ``[n, 81]`` in row-major order; boards hold 0 for a
        blank and the solution's digit for a given.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    boards = np.zeros((n, SEQ_LEN), dtype=np.uint8)
    solutions = np.zeros((n, SEQ_LEN), dtype=np.uint8)
    for k in range(n):
        solution = _random_solution(rng)
        order = rng.permutation(SEQ_LEN).tolist()
        boards[k] = _carve(solution, order)
        solutions[k] = solution
    return boards, solutions


def generated_csv_text(boards: np.ndarray, solutions: np.ndarray) -> str:
    """Format generated puzzles as a Sudoku-Extreme CSV (rating = number of blanks).

    Args:
        boards: ``[N, 81]`` values 0..9 (0 = blank, written as '.').
        solutions: ``[N, 81]`` values 1..9.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for board, solution in zip(boards, solutions, strict=True):
        q = "".join("." if v == 0 else str(v) for v in board.tolist())
        a = "".join(str(v) for v in solution.tolist())
        writer.writerow(["generated", q, a, int((board == 0).sum())])
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SudokuTransform:
    """A validity-preserving Sudoku symmetry (upstream's ``shuffle_sudoku`` parameters).

    ``digit_map`` is ``[10]`` with ``digit_map[0] == 0`` (blanks stay blank) and a permutation of
    1..9 after it; ``row_perm``/``col_perm`` are ``[9]`` permutations that move whole bands/stacks
    and rows/columns within them; ``transpose`` is applied before the row/column permutation.
    """

    digit_map: np.ndarray
    transpose: bool
    row_perm: np.ndarray
    col_perm: np.ndarray


def random_sudoku_transform(rng: np.random.Generator) -> SudokuTransform:
    """Draw a transform the way upstream's ``shuffle_sudoku`` does, from a seeded ``rng``."""
    digit_map = np.concatenate([[0], rng.permutation(np.arange(1, 10))])
    transpose = bool(rng.random() < 0.5)
    bands = rng.permutation(3)
    row_perm = np.concatenate([b * 3 + rng.permutation(3) for b in bands])
    stacks = rng.permutation(3)
    col_perm = np.concatenate([s * 3 + rng.permutation(3) for s in stacks])
    return SudokuTransform(digit_map, transpose, row_perm, col_perm)


def apply_sudoku_transform(x: np.ndarray, t: SudokuTransform) -> np.ndarray:
    """Apply ``t`` to a ``[9, 9]`` grid of values 0..9; returns a new ``[9, 9]`` grid.

    Cell ``(r, c)`` of the result is ``digit_map[src[row_perm[r], col_perm[c]]]`` with
    ``src = x.T if transpose else x`` (upstream's flat ``mapping[i] = row_perm[i // 9] * 9 +
    col_perm[i % 9]``).
    """
    src = x.T if t.transpose else x
    mapping = (t.row_perm[:, None] * 9 + t.col_perm[None, :]).reshape(SEQ_LEN)
    return t.digit_map[src.reshape(SEQ_LEN)[mapping]].reshape(9, 9).astype(x.dtype)


def shuffle_sudoku(
    board: np.ndarray, solution: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random validity-preserving transform to a board and its solution.

    Args:
        board: ``[9, 9]`` values 0..9 (0 = blank).
        solution: ``[9, 9]`` values 1..9.
        rng: the seeded generator the transform is drawn from.

    Returns:
        The transformed ``(board, solution)``, each ``[9, 9]`` with the input's dtype.
    """
    t = random_sudoku_transform(rng)
    return apply_sudoku_transform(board, t), apply_sudoku_transform(solution, t)


def augment_rows(
    boards: np.ndarray, solutions: np.ndarray, num_aug: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand every row into a group: the original followed by ``num_aug`` shuffled copies.

    Args:
        boards, solutions: ``[N, 81]`` values 0..9.

    Returns:
        ``(inputs, labels, group_sizes)``: ``[N * (1 + num_aug), 81]`` uint8 values 0..9 with
        each group's rows consecutive, and ``[N]`` int64 sizes (all ``1 + num_aug``).
    """
    n = boards.shape[0]
    per_group = 1 + num_aug
    inputs = np.empty((n * per_group, SEQ_LEN), dtype=np.uint8)
    labels = np.empty((n * per_group, SEQ_LEN), dtype=np.uint8)
    for k in range(n):
        board, solution = boards[k].reshape(9, 9), solutions[k].reshape(9, 9)
        base = k * per_group
        inputs[base], labels[base] = board.reshape(SEQ_LEN), solution.reshape(SEQ_LEN)
        for j in range(1, per_group):
            aug_board, aug_solution = shuffle_sudoku(board, solution, rng)
            inputs[base + j] = aug_board.reshape(SEQ_LEN)
            labels[base + j] = aug_solution.reshape(SEQ_LEN)
    return inputs, labels, np.full(n, per_group, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Reading and validating rows
# ----------------------------------------------------------------------------------------------
@dataclass
class SudokuRows:
    """The parsed rows of one CSV.

    ``boards`` ``[N, 81]`` uint8 0..9 (0 = blank), ``solutions`` ``[N, 81]`` uint8 1..9,
    ``ratings`` ``[N]`` int64, ``lines`` ``[N]`` int64 (1-based file line of each row, header =
    line 1); ``name`` is the file named in error messages.
    """

    name: str
    boards: np.ndarray
    solutions: np.ndarray
    ratings: np.ndarray
    lines: np.ndarray


def _field_problem(field: str, value: str, allowed: str) -> str:
    """Why ``value`` is not 81 characters from ``allowed``."""
    if len(value) != SEQ_LEN:
        return f"{field} has {len(value)} characters, expected {SEQ_LEN}"
    pos, ch = next((pos, ch) for pos, ch in enumerate(value) if ch not in allowed)
    return f"{field} has invalid character {ch!r} at position {pos + 1}, expected one of {allowed}"


def parse_sudoku_csv(lines: Iterable[str], name: str) -> SudokuRows:
    """Parse a ``source,q,a,rating`` CSV; syntax problems raise a one-line ``DatasetBuildError``.

    ``q`` is 81 characters from ``.0123456789`` ('.' and '0' are blanks), ``a`` 81 digits 1..9,
    ``rating`` an integer. Empty lines are skipped. Sudoku rules are checked separately by
    ``validate_sudoku_rows``.
    """
    reader = csv.reader(lines)
    q_buf, a_buf = bytearray(), bytearray()
    ratings: list[int] = []
    line_numbers: list[int] = []
    expected_header = ",".join(CSV_HEADER)
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetBuildError(f"{name}:1: empty file, expected the header {expected_header}")
        if [h.strip() for h in header] != list(CSV_HEADER):
            raise DatasetBuildError(
                f"{name}:1: header is {','.join(header)!r}, expected {expected_header}"
            )
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(CSV_HEADER):
                raise DatasetBuildError(
                    f"{name}:{line}: expected {len(CSV_HEADER)} columns ({expected_header}), "
                    f"got {len(row)}"
                )
            _, q, a, rating = row
            if not _Q_PATTERN.fullmatch(q):
                problem = _field_problem("q", q, _Q_CHARS)
                raise DatasetBuildError(f"{name}:{line}: {problem}")
            if not _A_PATTERN.fullmatch(a):
                problem = _field_problem("a", a, _A_CHARS)
                raise DatasetBuildError(f"{name}:{line}: {problem}")
            try:
                ratings.append(int(rating))
            except ValueError:
                raise DatasetBuildError(
                    f"{name}:{line}: rating {rating!r} is not an integer"
                ) from None
            q_buf += q.encode("ascii")
            a_buf += a.encode("ascii")
            line_numbers.append(line)
    except csv.Error as e:
        raise DatasetBuildError(f"{name}:{reader.line_num}: malformed CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise DatasetBuildError(
            f"{name}:{reader.line_num + 1}: not UTF-8 text ({e.reason})"
        ) from None

    q_bytes = np.frombuffer(bytes(q_buf), dtype=np.uint8).reshape(-1, SEQ_LEN)
    boards = np.where(q_bytes == ord("."), 0, q_bytes - ord("0")).astype(np.uint8)
    solutions = (np.frombuffer(bytes(a_buf), dtype=np.uint8) - ord("0")).reshape(-1, SEQ_LEN)
    return SudokuRows(
        name=name,
        boards=boards,
        solutions=solutions.astype(np.uint8),
        ratings=np.asarray(ratings, dtype=np.int64),
        lines=np.asarray(line_numbers, dtype=np.int64),
    )


def read_sudoku_csv(path: Path) -> SudokuRows:
    """Parse the CSV file at ``path`` (see ``parse_sudoku_csv``); a missing file is an error."""
    if not path.is_file():
        raise DatasetBuildError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        return parse_sudoku_csv(f, str(path))


def _invalid_rows(boards: np.ndarray, solutions: np.ndarray) -> np.ndarray:
    """``[N]`` bool: the solution breaks a rule or contradicts a given (inputs ``[N, 81]``)."""
    n = boards.shape[0]
    bits = np.left_shift(np.uint16(1), solutions.astype(np.uint16)).reshape(n, 9, 9)
    boxes = bits.reshape(n, 3, 3, 3, 3).transpose(0, 1, 3, 2, 4).reshape(n, 9, 9)
    broken = (
        (np.bitwise_or.reduce(bits, axis=2) != _FULL).any(axis=1)
        | (np.bitwise_or.reduce(bits, axis=1) != _FULL).any(axis=1)
        | (np.bitwise_or.reduce(boxes, axis=2) != _FULL).any(axis=1)
    )
    contradicts = ((boards != 0) & (boards != solutions)).any(axis=1)
    return broken | contradicts


def validate_sudoku_rows(rows: SudokuRows) -> None:
    """Check every solution is a valid Sudoku that agrees with its puzzle's givens.

    Raises ``DatasetBuildError`` naming the first offending file line.
    """
    n = rows.boards.shape[0]
    for start in range(0, n, _VALIDATE_CHUNK):
        stop = min(start + _VALIDATE_CHUNK, n)
        bad = np.flatnonzero(_invalid_rows(rows.boards[start:stop], rows.solutions[start:stop]))
        if bad.size == 0:
            continue
        k = start + int(bad[0])
        where = f"{rows.name}:{int(rows.lines[k])}"
        violation = _solution_violation(rows.solutions[k])
        if violation is not None:
            raise DatasetBuildError(f"{where}: solution breaks the Sudoku rules ({violation})")
        cell = int(np.flatnonzero((rows.boards[k] != 0) & (rows.boards[k] != rows.solutions[k]))[0])
        raise DatasetBuildError(
            f"{where}: solution disagrees with the given at row {cell // 9 + 1}, column "
            f"{cell % 9 + 1} (q has {rows.boards[k, cell]}, a has {rows.solutions[k, cell]})"
        )


def select_rows(
    rows: SudokuRows,
    *,
    min_difficulty: int | None,
    subsample_size: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Indices of the rows to keep, in output order.

    Rows with ``rating >= min_difficulty`` are kept; then, if ``subsample_size`` is smaller than
    what is left, ``subsample_size`` of them are drawn without replacement (upstream's
    ``np.random.choice`` order, but from the seeded ``rng``).
    """
    keep = np.arange(rows.ratings.shape[0])
    if min_difficulty is not None:
        keep = keep[rows.ratings >= min_difficulty]
    if subsample_size is not None and subsample_size < keep.shape[0]:
        keep = keep[rng.choice(keep.shape[0], size=subsample_size, replace=False)]
    return keep


def encode_cells(values: np.ndarray) -> np.ndarray:
    """Token ids for cell values 0..9: value + 1 (PAD 0, blank 1, digits 2..10), uint8."""
    return (values.astype(np.uint8) + 1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def _split_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _download(repo: str, filename: str) -> Path:
    """Fetch ``filename`` from the hub dataset ``repo``; any failure becomes a one-line error."""
    hint = "pass --input-dir DIR (with train.csv and test.csv) or --generate N to build offline"
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    # Network, authentication and hub errors all mean the same thing here: no file.
    except Exception as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetBuildError(
            f"could not download {filename} from the hub dataset {repo} "
            f"({type(e).__name__}: {detail}); {hint}"
        ) from None


def load_rows(args: argparse.Namespace) -> dict[str, SudokuRows]:
    """Parse and validate both splits from the source the command line names."""
    if args.generate is not None:
        sizes = {"train": args.generate, "test": args.generate_test}
        rows = {}
        for split in SPLITS:
            boards, solutions = generate_puzzles(
                sizes[split], _split_rng(args.seed, _STREAM_GENERATE[split])
            )
            text = generated_csv_text(boards, solutions)
            rows[split] = parse_sudoku_csv(io.StringIO(text), f"<generated {split}.csv>")
    else:
        if args.input_dir is not None:
            paths = {split: Path(args.input_dir) / f"{split}.csv" for split in SPLITS}
            for path in paths.values():
                if not path.is_file():
                    raise DatasetBuildError(
                        f"{path}: file not found (--input-dir needs train.csv and test.csv)"
                    )
        else:
            paths = {split: _download(args.source_repo, f"{split}.csv") for split in SPLITS}
        rows = {split: read_sudoku_csv(path) for split, path in paths.items()}
    for split_rows in rows.values():
        validate_sudoku_rows(split_rows)
    return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line: upstream's flags (dashed or underscored) plus the offline sources."""
    p = argparse.ArgumentParser(
        prog="build_sudoku_dataset",
        description="Build the Sudoku-Extreme puzzle dataset (train + test splits).",
    )
    p.add_argument(
        *flag_aliases("source_repo"),
        dest="source_repo",
        default="sapientinc/sudoku-extreme",
        help="Hugging Face dataset repo with train.csv and test.csv",
    )
    p.add_argument(
        *flag_aliases("output_dir"), dest="output_dir", default="data/sudoku-extreme-full"
    )
    p.add_argument(
        *flag_aliases("subsample_size"),
        dest="subsample_size",
        type=_int_at_least(1),
        default=None,
        help="keep this many random train puzzles (drawn with --seed)",
    )
    p.add_argument(
        *flag_aliases("min_difficulty"),
        dest="min_difficulty",
        type=int,
        default=None,
        help="keep rows with rating >= this (both splits)",
    )
    p.add_argument(
        *flag_aliases("num_aug"),
        dest="num_aug",
        type=_int_at_least(0),
        default=0,
        help="shuffled copies per train puzzle",
    )
    p.add_argument(*flag_aliases("seed"), dest="seed", type=_int_at_least(0), default=0)
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        *flag_aliases("input_dir"),
        dest="input_dir",
        default=None,
        help="read DIR/train.csv and DIR/test.csv instead of downloading",
    )
    source.add_argument(
        *flag_aliases("generate"),
        dest="generate",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="generate N unique-solution train puzzles offline (seeded by --seed)",
    )
    p.add_argument(
        *flag_aliases("generate_test"),
        dest="generate_test",
        type=_int_at_least(1),
        default=None,
        metavar="M",
        help="test puzzles to generate with --generate (default max(1, N // 4))",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check the command line (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate_test is not None and args.generate is None:
        parser.error("--generate-test needs --generate")
    if args.generate is not None and args.generate_test is None:
        args.generate_test = max(1, args.generate // 4)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Build ``<output-dir>/{train,test}`` and ``identifiers.json``; see the module docstring."""
    args = parse_args(argv)
    check_output_dir(args.output_dir, overwrite=args.overwrite)  # before downloading
    rows = load_rows(args)

    splits = {}
    for split in SPLITS:
        split_rows = rows[split]
        keep = select_rows(
            split_rows,
            min_difficulty=args.min_difficulty,
            subsample_size=args.subsample_size if split == "train" else None,
            rng=_split_rng(args.seed, _STREAM_SUBSAMPLE),
        )
        if keep.size == 0:
            reason = "" if args.min_difficulty is None else f" with rating >= {args.min_difficulty}"
            raise DatasetBuildError(f"{split_rows.name}: no puzzles{reason}")
        splits[split] = augment_rows(
            split_rows.boards[keep],
            split_rows.solutions[keep],
            args.num_aug if split == "train" else 0,
            _split_rng(args.seed, _STREAM_AUGMENT),
        )

    summary = []
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as out:
        for split, (inputs, labels, group_sizes) in splits.items():
            metadata = write_single_example_split(
                out / split,
                encode_cells(inputs),
                encode_cells(labels),
                group_sizes,
                vocab_size=VOCAB_SIZE,
                pad_id=PAD_ID,
                ignore_label_id=IGNORE_LABEL_ID,
            )
            summary.append(
                f"{split}: {rows[split].boards.shape[0]} rows read, "
                f"{metadata.total_groups} groups, {metadata.total_puzzles} puzzles"
            )
        write_identifiers(out, [BLANK_IDENTIFIER])
    print("\n".join(summary))
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
