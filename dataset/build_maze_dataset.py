"""Build the Maze dataset (upstream ``dataset/build_maze_dataset.py``), validated and seeded.

Sources, in order of precedence:

* ``--generate N``: an offline generator of seeded mazes with a shortest-path answer;
* ``--input-dir DIR``: ``DIR/train.csv`` and ``DIR/test.csv``;
* otherwise ``train.csv``/``test.csv`` of the Hugging Face dataset ``--source-repo``
  (default ``sapientinc/maze-30x30-hard-1k``, 1000 train / 1000 test mazes).

CSV rows are ``source,q,a,rating``; ``q`` is the maze and ``a`` the maze with the path drawn in,
both row-major strings of ``n*n`` characters over ``CHARSET = "# SGo"``:
``'#'`` wall, ``' '`` open, ``'S'`` start, ``'G'`` goal, ``'o'`` path. The answer keeps ``S`` and
``G`` and marks the cells strictly between them with ``o``. Characters map to ids 1..5 with
PAD = 0 (vocab 6, seq_len ``n*n``). Every maze (and, with ``--aug``, each of its 8 dihedral
transforms, train split only) is its own puzzle with one example; a group is a maze and its
augmentations; all puzzle identifiers are 0.

Every row is validated before anything is written: a bad row stops the build with one line that
names the file and line (header = line 1), and no output folder is left behind. An existing
``--output-dir`` is replaced only when it holds a dataset built earlier and ``--overwrite`` is
given (``dataset.common.check_output_dir``).

One module per builder, as upstream: its generator, reader, validator and writer stay together
(past 400 lines) so the builder runs as ``python dataset/build_maze_dataset.py``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Script form (`python dataset/build_maze_dataset.py`): make `dataset.common` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from dataset.common import (
    BLANK_IDENTIFIER,
    OVERWRITE_HELP,
    DatasetBuildError,
    atomic_output_dir,
    check_output_dir,
    dihedral_transform,
    flag_aliases,
    run_cli,
    write_identifiers,
    write_single_example_split,
)

CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = CHARSET
CSV_HEADER = ["source", "q", "a", "rating"]
PAD_ID = 0
VOCAB_SIZE = len(CHARSET) + 1
NUM_DIHEDRAL = 8
SPLITS = ("train", "test")
DEFAULT_GRID_SIZE = 30
# Fraction of the walls left standing between lattice cells by the spanning tree that the
# generator removes: it creates loops, so the shortest path is not simply the unique path.
LOOP_FRACTION = 0.1
# The goal is drawn among cells at least this fraction of the farthest BFS distance from S.
FAR_FRACTION = 0.75

_CHAR_TO_ID = np.zeros(256, dtype=np.uint8)
_CHAR_TO_ID[[ord(c) for c in CHARSET]] = np.arange(1, len(CHARSET) + 1, dtype=np.uint8)


@dataclass(frozen=True)
class MazeRow:
    """One maze and its answer, with ``where`` naming its origin for error messages."""

    maze: str
    solution: str
    where: str


# ----------------------------------------------------------------------------------------------
# Pure maze functions
# ----------------------------------------------------------------------------------------------
def grid_side(text: str) -> int | None:
    """Side ``n`` of a row-major square grid string of length ``n*n`` (``None`` if not square)."""
    n = math.isqrt(len(text))
    return n if n > 0 and n * n == len(text) else None


def _neighbours(index: int, side: int) -> list[int]:
    """4-connected neighbours of flat cell ``index`` in a ``side x side`` grid."""
    r, c = divmod(index, side)
    out = []
    if r > 0:
        out.append(index - side)
    if r < side - 1:
        out.append(index + side)
    if c > 0:
        out.append(index - 1)
    if c < side - 1:
        out.append(index + 1)
    return out


def _bfs(passable: Sequence[bool], side: int, source: int) -> tuple[list[int], list[int]]:
    """BFS over passable cells: ``(dist, parent)`` per flat cell, -1 where unreached."""
    dist = [-1] * len(passable)
    parent = [-1] * len(passable)
    dist[source] = 0
    queue = deque([source])
    while queue:
        cell = queue.popleft()
        for nb in _neighbours(cell, side):
            if passable[nb] and dist[nb] < 0:
                dist[nb] = dist[cell] + 1
                parent[nb] = cell
                queue.append(nb)
    return dist, parent


def _cell(index: int, side: int) -> str:
    r, c = divmod(index, side)
    return f"(row {r}, col {c})"


def shortest_path_length(maze: str) -> int | None:
    """Number of moves on a shortest 4-connected path from ``S`` to ``G`` avoiding walls.

    ``maze`` is a square row-major grid string over ``CHARSET`` with one ``S`` and one ``G``.
    Returns ``None`` when ``G`` is unreachable. A drawn answer has ``length - 1`` ``o`` cells.
    """
    side = grid_side(maze)
    if side is None or maze.count(START) != 1 or maze.count(GOAL) != 1:
        raise ValueError("maze must be a square grid with exactly one S and one G")
    dist, _ = _bfs([ch != WALL for ch in maze], side, maze.index(START))
    d = dist[maze.index(GOAL)]
    return d if d >= 0 else None


def validate_solution(maze: str, solution: str) -> str | None:
    """Why ``solution`` is not a valid answer to ``maze``, or ``None`` if it is.

    Both are row-major square grid strings of equal length over ``CHARSET``. The maze holds
    exactly one ``S`` and one ``G`` and no ``o``; the answer equals the maze except open cells
    turned into ``o``; the ``o`` cells plus ``S`` and ``G`` induce a single simple 4-connected
    path from ``S`` to ``G`` (``S`` and ``G`` with one path neighbour, ``o`` cells with two).
    Cells in the returned reason are 0-based (row, col).
    """
    side = grid_side(maze)
    if side is None:
        return f"maze has length {len(maze)}, which is not a square number"
    if len(solution) != len(maze):
        return f"answer has length {len(solution)} but the maze has length {len(maze)}"
    allowed = set(CHARSET)
    for name, text in (("maze", maze), ("answer", solution)):
        for i, ch in enumerate(text):
            if ch not in allowed:
                return f"{name} has character {ch!r} at {_cell(i, side)}, outside {CHARSET!r}"
    if PATH in maze:
        return f"maze already has a path mark {PATH!r} at {_cell(maze.index(PATH), side)}"
    for mark in (START, GOAL):
        if maze.count(mark) != 1:
            return f"maze has {maze.count(mark)} {mark!r} cells, expected exactly one"
    for i, (m, s) in enumerate(zip(maze, solution, strict=True)):
        if m == s or (m == OPEN and s == PATH):
            continue
        if s == PATH:
            return f"answer draws the path through {m!r} at {_cell(i, side)}; only open cells"
        return f"answer changes {m!r} to {s!r} at {_cell(i, side)}; only ' ' may become 'o'"

    on_path = [ch in (START, GOAL, PATH) for ch in solution]
    start, goal = solution.index(START), solution.index(GOAL)
    for i, ch in enumerate(solution):
        if not on_path[i]:
            continue
        degree = sum(on_path[nb] for nb in _neighbours(i, side))
        expected = 2 if ch == PATH else 1
        if degree != expected:
            what = {START: "start S", GOAL: "goal G", PATH: "path cell"}[ch]
            shape = "broken" if degree < expected else "branching or touching itself"
            return (
                f"{what} at {_cell(i, side)} has {degree} path neighbours, expected {expected} "
                f"(the path is {shape})"
            )
    dist, _ = _bfs(on_path, side, start)
    unreached = [i for i, p in enumerate(on_path) if p and dist[i] < 0]
    if unreached:
        # Degrees are right, so S reaches G and the rest are closed loops of 'o'.
        return (
            f"{len(unreached)} path cells, e.g. {_cell(unreached[0], side)}, are not on the "
            f"path from S to G"
        )
    assert dist[goal] >= 0
    return None


def generate_maze(rng: np.random.Generator, size: int = DEFAULT_GRID_SIZE) -> tuple[str, str]:
    """A random ``size x size`` maze and its answer (one BFS shortest path), as grid strings.

    Carves a randomised depth-first spanning tree on the odd lattice (cells at odd row/col,
    walls elsewhere), then knocks out ``LOOP_FRACTION`` of the remaining walls between lattice
    cells so that several routes exist. ``S`` is a random open cell and ``G`` a random open
    cell at BFS distance at least ``FAR_FRACTION`` of the farthest cell from ``S``.
    Returns ``(maze, solution)``, each of length ``size*size`` over ``CHARSET``. Uses only
    ``rng``, so a seeded generator gives the same maze every time.
    """
    if size < 5:
        raise ValueError(f"maze size must be at least 5, got {size}")
    k = (size - 1) // 2  # lattice cells per side, at coordinates 1, 3, ..., 2k - 1
    is_open = [False] * (size * size)

    def flat(r: int, c: int) -> int:
        return r * size + c

    visited = [[False] * k for _ in range(k)]
    first = (int(rng.integers(k)), int(rng.integers(k)))
    visited[first[0]][first[1]] = True
    is_open[flat(2 * first[0] + 1, 2 * first[1] + 1)] = True
    stack = [first]
    while stack:
        i, j = stack[-1]
        options = [
            (i + di, j + dj)
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= i + di < k and 0 <= j + dj < k and not visited[i + di][j + dj]
        ]
        if not options:
            stack.pop()
            continue
        ni, nj = options[int(rng.integers(len(options)))]
        visited[ni][nj] = True
        is_open[flat(2 * ni + 1, 2 * nj + 1)] = True
        is_open[flat(i + ni + 1, j + nj + 1)] = True  # the wall between the two cells
        stack.append((ni, nj))

    between = [flat(2 * i + 1, 2 * j + 2) for i in range(k) for j in range(k - 1)]
    between += [flat(2 * i + 2, 2 * j + 1) for i in range(k - 1) for j in range(k)]
    closed = [w for w in between if not is_open[w]]
    n_knock = round(LOOP_FRACTION * len(closed))
    if n_knock:
        for idx in rng.choice(len(closed), size=n_knock, replace=False):
            is_open[closed[int(idx)]] = True

    open_cells = [i for i, o in enumerate(is_open) if o]
    start = open_cells[int(rng.integers(len(open_cells)))]
    dist, parent = _bfs(is_open, size, start)
    threshold = max(1, math.ceil(FAR_FRACTION * max(dist)))
    far = [i for i in open_cells if dist[i] >= threshold]
    goal = far[int(rng.integers(len(far)))]

    maze = [OPEN if o else WALL for o in is_open]
    maze[start], maze[goal] = START, GOAL
    solution = list(maze)
    cell = parent[goal]
    while cell != start:
        solution[cell] = PATH
        cell = parent[cell]
    return "".join(maze), "".join(solution)


def encode_grids(texts: Sequence[str], side: int) -> np.ndarray:
    """Token ids ``[N, side, side]`` uint8 (``CHARSET`` -> 1..5) of validated grid strings."""
    flat = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8)
    return _CHAR_TO_ID[flat].reshape(len(texts), side, side)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def check_same_size(row: MazeRow, reference: MazeRow) -> None:
    """Raise unless ``row`` has the grid size of ``reference`` (one seq_len per dataset)."""
    if len(row.maze) != len(reference.maze):
        n, m = math.isqrt(len(row.maze)), math.isqrt(len(reference.maze))
        raise DatasetBuildError(
            f"{row.where}: maze is {n}x{n} but {reference.where} is {m}x{m}; "
            f"all mazes must have the same size"
        )


def check_row(row: MazeRow, reference: MazeRow | None = None) -> None:
    """Validate one row's answer and, given a ``reference`` row, its grid size."""
    reason = validate_solution(row.maze, row.solution)
    if reason is not None:
        raise DatasetBuildError(f"{row.where}: {reason}")
    if reference is not None:
        check_same_size(row, reference)


def read_maze_csv(path: Path) -> list[MazeRow]:
    """Rows of a ``source,q,a,rating`` CSV, each validated; errors name the file and line."""
    if not path.is_file():
        raise DatasetBuildError(f"{path}: file not found (expected a CSV source,q,a,rating)")
    rows: list[MazeRow] = []
    last_line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != CSV_HEADER:
                got = "an empty file" if header is None else repr(",".join(header))
                raise DatasetBuildError(
                    f"{path}: line 1: header is {got}, expected {','.join(CSV_HEADER)!r}"
                )
            for record in reader:
                if not record:
                    continue
                last_line = reader.line_num
                where = f"{path}: line {last_line}"
                if len(record) != len(CSV_HEADER):
                    raise DatasetBuildError(
                        f"{where}: {len(record)} fields, expected {len(CSV_HEADER)} "
                        f"({','.join(CSV_HEADER)})"
                    )
                row = MazeRow(maze=record[1], solution=record[2], where=where)
                check_row(row, rows[0] if rows else None)
                rows.append(row)
    except UnicodeDecodeError as e:
        raise DatasetBuildError(
            f"{path}: after line {last_line}: not UTF-8 text ({e.reason})"
        ) from None
    except csv.Error as e:
        raise DatasetBuildError(f"{path}: after line {last_line}: malformed CSV: {e}") from None
    if not rows:
        raise DatasetBuildError(f"{path}: no maze rows after the header")
    return rows


def download_split(repo: str, split: str) -> Path:
    """Local path of ``{split}.csv`` from the Hugging Face dataset ``repo`` (cached)."""
    remedy = "pass --input-dir DIR (with train.csv and test.csv) or --generate N to build offline"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DatasetBuildError(f"huggingface_hub is not installed; {remedy}") from None
    try:
        return Path(hf_hub_download(repo, f"{split}.csv", repo_type="dataset"))
    except Exception as e:  # network, auth or a missing repo: the remedy is the same
        raise DatasetBuildError(
            f"could not download {split}.csv from Hugging Face dataset {repo!r} "
            f"({type(e).__name__}); {remedy}"
        ) from None


def generate_rows(rng: np.random.Generator, count: int, size: int, split: str) -> list[MazeRow]:
    """``count`` generated mazes for ``split``, checked by the same validation as CSV rows."""
    rows: list[MazeRow] = []
    for i in range(count):
        maze, solution = generate_maze(rng, size)
        row = MazeRow(maze, solution, where=f"generated {split} maze {i + 1}")
        check_row(row, rows[0] if rows else None)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def split_arrays(
    rows: Sequence[MazeRow], side: int, aug: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs, labels, group_sizes)`` for one split.

    ``inputs``/``labels`` are ``[N * A, side*side]`` uint8 with ``A = 8`` when ``aug`` (the
    dihedral transforms 0..7 of each maze, consecutive, identity first) and ``A = 1`` otherwise;
    ``group_sizes`` is ``[N]`` of ``A``.
    """
    grids = [
        encode_grids([r.maze for r in rows], side),
        encode_grids([r.solution for r in rows], side),
    ]
    n_aug = NUM_DIHEDRAL if aug else 1
    out = []
    for g_NHW in grids:
        g_NAHW = np.stack([dihedral_transform(g_NHW, t) for t in range(n_aug)], axis=1)
        out.append(g_NAHW.reshape(len(rows) * n_aug, side * side))
    return out[0], out[1], np.full(len(rows), n_aug, dtype=np.int64)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Upstream's flags (``--source-repo``, ``--output-dir``, ``--subsample-size``, ``--aug``)
    plus ``--seed``, ``--input-dir``, ``--generate``, ``--generate-test``, ``--grid-size`` and
    ``--overwrite``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(*flag_aliases("source_repo"), default="sapientinc/maze-30x30-hard-1k")
    p.add_argument(*flag_aliases("output_dir"), default="data/maze-30x30-hard-1k")
    p.add_argument(
        *flag_aliases("subsample_size"),
        type=_positive_int,
        default=None,
        help="keep this many random train mazes (seeded by --seed)",
    )
    p.add_argument(
        *flag_aliases("aug"),
        action=argparse.BooleanOptionalAction,
        default=False,
        help="add the 8 dihedral transforms of every train maze",
    )
    p.add_argument(*flag_aliases("seed"), type=_non_negative_int, default=0)
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        *flag_aliases("input_dir"),
        default=None,
        help="read DIR/train.csv and DIR/test.csv instead of the hub",
    )
    source.add_argument(
        *flag_aliases("generate"),
        type=_positive_int,
        default=None,
        metavar="N",
        help="generate N seeded train mazes offline",
    )
    p.add_argument(
        *flag_aliases("generate_test"),
        type=_positive_int,
        default=None,
        metavar="M",
        help="test mazes for --generate (default max(1, N // 4))",
    )
    p.add_argument(
        *flag_aliases("grid_size"),
        type=int,
        default=None,
        help=f"maze side for --generate (default {DEFAULT_GRID_SIZE})",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args(argv)
    if args.generate is None and (args.generate_test is not None or args.grid_size is not None):
        p.error("--generate-test and --grid-size only apply with --generate N")
    if args.grid_size is not None and args.grid_size < 5:
        p.error(f"--grid-size must be at least 5, got {args.grid_size}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Build ``<output_dir>/{train,test}`` and ``identifiers.json``; see the module docstring."""
    args = parse_args(argv)
    check_output_dir(args.output_dir, overwrite=args.overwrite)  # before downloading
    train_rng, test_rng, subsample_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(3)
    )

    rows: dict[str, list[MazeRow]] = {}
    if args.generate is not None:
        size = args.grid_size or DEFAULT_GRID_SIZE
        n_test = args.generate_test or max(1, args.generate // 4)
        rows["train"] = generate_rows(train_rng, args.generate, size, "train")
        rows["test"] = generate_rows(test_rng, n_test, size, "test")
        source = f"generated {size}x{size} mazes, seed {args.seed}"
    else:
        for split in SPLITS:
            if args.input_dir is not None:
                path = Path(args.input_dir) / f"{split}.csv"
            else:
                path = download_split(args.source_repo, split)
            rows[split] = read_maze_csv(path)
        source = args.input_dir if args.input_dir is not None else args.source_repo
    check_same_size(rows["test"][0], rows["train"][0])
    side = math.isqrt(len(rows["train"][0].maze))

    n_source = len(rows["train"])
    if args.subsample_size is not None and args.subsample_size < n_source:
        keep = subsample_rng.choice(n_source, size=args.subsample_size, replace=False)
        rows["train"] = [rows["train"][int(i)] for i in keep]

    counts = {}
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        for split in SPLITS:
            inputs, labels, group_sizes = split_arrays(
                rows[split], side, aug=args.aug and split == "train"
            )
            write_single_example_split(
                tmp / split,
                inputs,
                labels,
                group_sizes,
                vocab_size=VOCAB_SIZE,
                pad_id=PAD_ID,
                ignore_label_id=PAD_ID,
            )
            counts[split] = (len(group_sizes), inputs.shape[0])
        write_identifiers(tmp, [BLANK_IDENTIFIER])

    mean_len = np.mean([r.solution.count(PATH) + 1 for r in rows["train"]])
    print(
        f"maze: wrote {args.output_dir} from {source}: "
        f"train {counts['train'][0]} mazes -> {counts['train'][1]} puzzles"
        f"{' (8 dihedral augmentations)' if args.aug else ''}, "
        f"test {counts['test'][1]} puzzles; {side}x{side} grid, seq_len {side * side}, "
        f"vocab {VOCAB_SIZE}; mean train path length {mean_len:.1f}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
