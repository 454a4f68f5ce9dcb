"""ARC evaluator: vote over augmented variants, pass@K per test pair, ARC Prize submission.

Upstream's semantics (its ``evaluators/arc.py``, class ``ARC``: ``update_batch`` and ``result``).
Every row of the test split is one augmented variant of one test pair. Its input and prediction are
cropped from the 30×30 canvas (``crop``), mapped back to the original frame with the variant's
inverse transform (``dataset.common.inverse_aug``) and hashed (``grid_hash``). Per (task, input
hash) the distinct predicted grids are ranked by (votes, mean sigmoid(q_halt)) descending: majority
vote, the model's mean halting confidence as tie-break. A pair is solved at pass@K when its label is
among the top K; a task scores the fraction of its test pairs solved; ``ARC/pass@K`` averages the
task scores over the tasks evaluated. The submission lists, per evaluated task and test pair in
source order, the top ``submission_K`` distinct grids as ``{"attempt_1": grid, "attempt_2":
grid}``, padded by repeating attempt 1.

Deliberate differences from upstream (also in ``docs/DECISIONS.md``):

* Works in a single process: the gather goes through ``utils.distributed.gather_objects``
  (upstream called ``dist.gather_object`` unconditionally, so a plain ``python`` run crashed).
* A test pair without any prediction keeps its place in ``submission.json`` with the fallback
  grid ``[[0]]`` for every attempt and is counted in ``ARC/pairs_without_predictions``
  (upstream skipped it, shifting every later pair of the task onto the wrong index).
* ``ARC/pass@K`` averages over the tasks that received at least one prediction. When every task
  of ``test_puzzles.json`` did, this is upstream's number (its denominator is all tasks); when
  only a subset was evaluated (``max_eval_groups``, a partial test split, a debugging run)
  upstream's number would count the missing tasks as failed, so ours is the score on what was
  evaluated, and ``ARC/tasks_evaluated`` / ``ARC/tasks_total`` say how much that was. ETRM
  divided by all 400 tasks while evaluating 32 (before its ``f08a4fa``), which deflated every
  subset score by 32/400.
* ``submission.json`` holds exactly the evaluated tasks (upstream listed every task, those
  without predictions as empty lists), so a subset's submission is the subset's.
* Exact ties in (votes, mean q) are ordered by grid hash, and the q values are summed with
  ``math.fsum``: the ranking no longer depends on how rows were spread over ranks (upstream
  kept arrival order, which changes with the world size).
* Only predictions for known test pairs are kept (rows of demonstration pairs, present in the
  test split with ``--split-policy strict``, can never be scored), and each distinct grid's hash
  is stored once per pair with the list of its q values rather than once per row, which shrinks
  the gather.
* Several data paths: identifier ``i`` of path ``k`` is global id ``i + identifier_offsets[k]``
  (the loader's offsets), and the paths' ``test_puzzles.json`` are merged.

``aggregated_voting`` keeps upstream's default True: ``begin_eval`` then does not clear the
votes, so every evaluation of a run adds its predictions to the same pool and the final
evaluation ensembles the checkpoints of all earlier ones (TRM#35). ``ARC/aggregated_evals``
reports how many evaluations are pooled; set ``aggregated_voting: False`` to score each
checkpoint on its own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from dataset.common import DataError, inverse_aug
from evaluators.base import EVALUATOR_CONFIGS, EVALUATORS, EvaluatorConfig
from utils.atomic import write_text_atomically
from utils.distributed import gather_objects

CANVAS = 30  # ARC grids live on a 30×30 canvas of seq_len 900
PAD_ID, EOS_ID = 0, 1
COLOUR_OFFSET = 2  # colour c is token c + 2, so colour tokens are 2..11
NUM_COLOURS = 10
BLANK_IDENTIFIER_ID = 0  # padded rows of the loader carry this puzzle identifier
FALLBACK_GRID: list[list[int]] = [[0]]


# ----------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------
def _crop_shapes(canvases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the top-left grid of each canvas in ``canvases`` [B, 30, 30]."""
    is_colour = (canvases >= COLOUR_OFFSET) & (canvases < COLOUR_OFFSET + NUM_COLOURS)
    # First non-colour column of each row; CANVAS when the whole row is colour.
    first_bad = np.where(is_colour.all(axis=2), CANVAS, np.argmin(is_colour, axis=2))
    # Upstream scans row by row and shrinks the column bound at the first non-colour token.
    widths = np.minimum.accumulate(first_bad, axis=1)  # [B, 30]
    areas = widths * np.arange(1, CANVAS + 1)
    best = np.argmax(areas, axis=1)  # the first maximum, as upstream's strict `area > max_area`
    index = np.arange(len(canvases))
    found = areas[index, best] > 0
    return np.where(found, best + 1, 0), np.where(found, widths[index, best], 0)


def crop(tokens: np.ndarray) -> np.ndarray:
    """The grid at the top-left of a canvas, as colours.

    ``tokens``: 900 (or 30×30) token ids, PAD 0, EOS 1, colours 2..11. Returns uint8
    [rows, cols] with values 0..9: the largest-area rectangle anchored at the origin whose
    cells are all colour tokens (upstream's ``_crop``); [0, 0] when the origin is not a colour.
    """
    canvas = np.asarray(tokens).reshape(1, CANVAS, CANVAS)
    rows, cols = _crop_shapes(canvas)
    return _colours(canvas[0], rows[0], cols[0])


def _colours(canvas: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return (canvas[:rows, :cols] - COLOUR_OFFSET).astype(np.uint8)


def grid_hash(grid: np.ndarray) -> str:
    """Upstream's grid identity: SHA-256 hex of the shape bytes then the uint8 cells (C order)."""
    assert grid.ndim == 2 and grid.dtype == np.uint8, (grid.ndim, grid.dtype)
    return hashlib.sha256(bytes(grid.shape) + grid.tobytes()).hexdigest()


def _grid_from_json(value: Any, where: str) -> np.ndarray:
    if not (isinstance(value, list) and value and all(isinstance(r, list) and r for r in value)):
        raise DataError(f"{where} is not a non-empty list of non-empty rows")
    if len({len(r) for r in value}) != 1:
        raise DataError(f"{where} is not rectangular")
    try:
        arr = np.array(value, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{where} holds values that are not integers") from None
    if arr.shape[0] > CANVAS or arr.shape[1] > CANVAS or arr.min() < 0 or arr.max() > 9:
        raise DataError(f"{where} must be at most {CANVAS}×{CANVAS} with colours 0..9")
    return arr.astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Dataset files
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    hint = "rebuild the dataset with python -m dataset.build_arc_dataset"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; the ARC evaluator needs it ({hint})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); {hint}") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}; {hint}"
        ) from None


def _load_identifiers(data_paths: list[str], identifier_offsets: list[int]) -> list[str | None]:
    """Global identifier → puzzle name (None where no path defines the id)."""
    names: list[str | None] = []
    for path, offset in zip(data_paths, identifier_offsets, strict=True):
        file = Path(path) / "identifiers.json"
        local = _read_json(file)
        if not isinstance(local, list) or not all(isinstance(n, str) for n in local):
            raise DataError(f"{file}: expected a list of puzzle names indexed by identifier")
        end = offset + len(local)
        names.extend([None] * max(0, end - len(names)))
        if offset < 0 or any(n is not None for n in names[offset:end]):
            raise DataError(
                f"{file}: identifiers {offset}..{end - 1} overlap another data path's; pass "
                "the loader's identifier_offsets (PuzzleDataset.identifier_offsets)"
            )
        names[offset:end] = local
    return names


def _load_test_puzzles(data_paths: list[str]) -> dict[str, Any]:
    """The merged ``test_puzzles.json`` of every path, in path order then file order."""
    merged: dict[str, Any] = {}
    for path in data_paths:
        file = Path(path) / "test_puzzles.json"
        puzzles = _read_json(file)
        if not isinstance(puzzles, dict):
            raise DataError(f"{file}: expected an object keyed by task id")
        for task, puzzle in puzzles.items():
            if task in merged and merged[task] != puzzle:
                raise DataError(f"{file}: task {task} differs from the same task in another path")
            merged.setdefault(task, puzzle)
    return merged


# ----------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------
@EVALUATOR_CONFIGS.register("arc", aliases=["arc@ARC"])
class ARCEvaluatorConfig(EvaluatorConfig):
    """ARC voting evaluator options (upstream ``evaluators/arc.py``, class ``ARC``)."""

    name: str = Field("arc", description="evaluator: arc (upstream's name arc@ARC is an alias)")
    submission_K: int = Field(2, ge=1, description="attempts per test pair in submission.json")
    pass_Ks: list[int] = Field(
        default_factory=lambda: [1, 2, 5, 10, 100, 1000], description="K of the pass@K metrics"
    )
    aggregated_voting: bool = Field(
        True, description="pool the votes of every evaluation of a run (upstream)"
    )


@EVALUATORS.register("arc")
class ARC:
    """Majority vote over augmented variants, pass@K and ``submission.json``, as upstream's ``ARC``.

    ``config``: ``submission_K`` attempts per test pair, ``pass_Ks``, ``aggregated_voting``.
    ``data_paths``: dataset folders holding ``identifiers.json`` and ``test_puzzles.json``;
    ``identifier_offsets[k]`` is added to path k's identifiers by the loader.
    """

    submission_file = "submission.json"  # under save_path; an instance may name another

    def __init__(
        self, config: ARCEvaluatorConfig, data_paths: list[str], identifier_offsets: list[int]
    ) -> None:
        if any(k < 1 for k in config.pass_Ks):
            raise DataError(f"pass_Ks must all be >= 1, got {config.pass_Ks}")
        self.config = config
        self.required_outputs = {"inputs", "puzzle_identifiers", "q_halt_logits", "preds"}
        self.identifier_names = _load_identifiers(data_paths, identifier_offsets)
        self.test_puzzles = _load_test_puzzles(data_paths)
        # Per task, its test pairs in source order as (input hash, label hash).
        self._pairs: dict[str, list[tuple[str, str]]] = {}
        for task, puzzle in self.test_puzzles.items():
            where = f"test_puzzles.json: task {task}"
            tests = puzzle.get("test") if isinstance(puzzle, dict) else None
            if not isinstance(tests, list) or not tests:
                raise DataError(f"{where}: expected an object with a non-empty 'test' list")
            pairs = []
            for i, pair in enumerate(tests):
                if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                    raise DataError(f"{where}: test pair {i} needs 'input' and 'output'")
                grid_in = _grid_from_json(pair["input"], f"{where}: test pair {i} input")
                grid_out = _grid_from_json(pair["output"], f"{where}: test pair {i} output")
                pairs.append((grid_hash(grid_in), grid_hash(grid_out)))
            self._pairs[task] = pairs
        self._test_inputs = {task: {ih for ih, _ in pairs} for task, pairs in self._pairs.items()}
        # votes[task][input hash][pred hash] = sigmoid(q_halt) of every row that predicted it.
        self._votes: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._grids: dict[str, np.ndarray] = {}
        self._evals = 0

    def begin_eval(self) -> None:
        """Start an evaluation; the votes are cleared only when ``aggregated_voting`` is False."""
        if not self.config.aggregated_voting:
            self._votes, self._grids, self._evals = {}, {}, 0
        self._evals += 1

    def update_batch(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        """Record a batch's votes.

        ``batch``: ``inputs`` [B, 900] tokens and ``puzzle_identifiers`` [B] (blank rows
        ignored); ``outputs``: ``preds`` [B, 900] tokens and ``q_halt_logits`` [B]. A key found
        in both is taken from ``outputs``, as upstream.
        """
        merged = {**batch, **outputs}
        missing = self.required_outputs - merged.keys()
        if missing:
            raise KeyError(f"ARC evaluator needs {sorted(missing)} in the batch or the outputs")
        ids = merged["puzzle_identifiers"].detach().cpu().numpy()
        inputs = merged["inputs"].detach().cpu().numpy()
        preds = merged["preds"].detach().cpu().numpy()
        q = merged["q_halt_logits"].detach().to("cpu", torch.float64).sigmoid().numpy()
        for key, arr in (("inputs", inputs), ("preds", preds)):
            if arr.ndim != 2 or arr.shape[1] != CANVAS * CANVAS or len(arr) != len(ids):
                raise DataError(
                    f"ARC evaluator: {key} must be [{len(ids)}, {CANVAS * CANVAS}], got "
                    f"{list(arr.shape)}"
                )
        for row, task, input_hash, (pred_hash,) in self._test_rows(ids, inputs, preds[:, None]):
            task_votes = self._votes.setdefault(task, {}).setdefault(input_hash, {})
            task_votes.setdefault(pred_hash, []).append(float(q[row]))

    def _test_rows(
        self, ids: np.ndarray, inputs: np.ndarray, preds: np.ndarray
    ) -> Iterator[tuple[int, str, str, list[str]]]:
        """The rows whose de-augmented input is a known test input of their task.

        ``ids`` [B], ``inputs`` [B, 900] and ``preds`` [B, A, 900] tokens (A predictions per
        row). Yields ``(row, task, input_hash, pred_hashes)``: each prediction cropped, mapped back
        to the task's frame and its grid stored, by hash, the A hashes in order. Blank rows, rows of
        unknown tasks and demonstration rows (strict split) are skipped.
        """
        rows = np.flatnonzero(ids != BLANK_IDENTIFIER_ID)
        if rows.size == 0:
            return
        A = preds.shape[1]
        in_canvas = inputs[rows].reshape(-1, CANVAS, CANVAS)
        in_rows, in_cols = _crop_shapes(in_canvas)
        pred_canvas = preds[rows].reshape(-1, CANVAS, CANVAS)
        pred_rows, pred_cols = (c.reshape(-1, A) for c in _crop_shapes(pred_canvas))
        pred_canvas = pred_canvas.reshape(-1, A, CANVAS, CANVAS)
        for j, row in enumerate(rows):
            task, undo = inverse_aug(self._name(int(ids[row])))
            wanted = self._test_inputs.get(task)
            if wanted is None:
                continue
            input_hash = grid_hash(undo(_colours(in_canvas[j], in_rows[j], in_cols[j])))
            if input_hash not in wanted:
                continue

            pred_hashes = []
            for a in range(A):
                pred = undo(_colours(pred_canvas[j, a], pred_rows[j, a], pred_cols[j, a]))
                in_range = pred.size == 0 or int(pred.max()) < NUM_COLOURS
                assert in_range, f"{task}: colour out of 0..9"
                pred_hash = grid_hash(pred)
                self._grids.setdefault(pred_hash, np.ascontiguousarray(pred))
                pred_hashes.append(pred_hash)
            yield int(row), task, input_hash, pred_hashes

    def _name(self, identifier: int) -> str:
        names = self.identifier_names
        name = names[identifier] if 0 <= identifier < len(names) else None
        if name is None:
            raise DataError(
                f"puzzle identifier {identifier} is not in any identifiers.json of the data paths; "
                "the evaluator and the loader must use the same data_paths"
            )
        return name

    def result(self, save_path: str | None, *, group: Any = None) -> dict[str, float] | None:
        """Gather every rank's votes to rank 0 and score them. Collective.

        Returns on rank 0 ``ARC/pass@K`` for each K (the mean task score over the tasks with
        predictions), ``ARC/tasks_evaluated``, ``ARC/tasks_total``,
        ``ARC/pairs_without_predictions`` (in every task, evaluated or not) and
        ``ARC/aggregated_evals``; None on other ranks. With ``save_path``, rank 0 writes
        ``save_path/<submission_file>`` (``submission.json``) for the evaluated tasks.
        """
        gathered = gather_objects((self._grids, self._votes), dst=0, group=group)
        if gathered is None:
            return None
        grids: dict[str, np.ndarray] = {}
        votes: dict[str, dict[str, dict[str, list[float]]]] = {}
        for rank_grids, rank_votes in gathered:
            for h, grid in rank_grids.items():
                grids.setdefault(h, grid)
            for task, by_input in rank_votes.items():
                for input_hash, candidates in by_input.items():
                    pooled = votes.setdefault(task, {}).setdefault(input_hash, {})
                    for pred_hash, qs in candidates.items():
                        pooled.setdefault(pred_hash, []).extend(qs)

        ranked = {
            task: {input_hash: _rank(candidates) for input_hash, candidates in by_input.items()}
            for task, by_input in votes.items()
        }
        return score_and_submit(
            self._pairs, ranked, grids, self.config, save_path, self.submission_file, "ARC",
            self._evals,
        )  # fmt: skip


def score_and_submit(
    pairs: dict[str, list[tuple[str, str]]],
    ranked: dict[str, dict[str, list[str]]],
    grids: dict[str, np.ndarray],
    config: ARCEvaluatorConfig,
    save_path: str | None,
    submission_file: str,
    prefix: str,
    evals: int,
) -> dict[str, float]:
    """pass@K and the submission from each test pair's ranked candidate hashes.

    ``pairs[task]``: (input hash, label hash) per test pair in source order; ``ranked[task]
    [input hash]``: distinct predicted grid hashes, best first (a task is evaluated when it is
    in ``ranked``); ``grids``: hash → grid. Writes ``save_path/submission_file`` when
    ``save_path`` is given; returns ``{prefix}/pass@K``, ``/tasks_evaluated``,
    ``/tasks_total``, ``/pairs_without_predictions`` and ``/aggregated_evals``.
    """
    Ks, K_sub = config.pass_Ks, config.submission_K
    scores = np.zeros(len(Ks))
    submission: dict[str, list[dict[str, list[list[int]]]]] = {}
    tasks_evaluated = pairs_missing = 0
    for task, task_pairs in pairs.items():
        task_ranked = ranked.get(task, {})
        solved = np.zeros(len(Ks))
        attempts = []
        for input_hash, label_hash in task_pairs:
            order = task_ranked.get(input_hash, [])
            if not order:
                pairs_missing += 1
                attempts.append({f"attempt_{i + 1}": FALLBACK_GRID for i in range(K_sub)})
                continue
            solved += [label_hash in order[:k] for k in Ks]
            top = order[:K_sub] + [order[0]] * (K_sub - len(order[:K_sub]))
            attempts.append({f"attempt_{i + 1}": grids[h].tolist() for i, h in enumerate(top)})
        if task_ranked:
            submission[task] = attempts
            tasks_evaluated += 1
            scores += solved / len(task_pairs)

    if save_path is not None:
        write_text_atomically(Path(save_path) / submission_file, json.dumps(submission))
    # Over the tasks with predictions: upstream's all-task mean when every task has some.
    means = scores / max(tasks_evaluated, 1)
    metrics = {f"{prefix}/pass@{k}": float(m) for k, m in zip(Ks, means, strict=True)}
    metrics[f"{prefix}/tasks_evaluated"] = float(tasks_evaluated)
    metrics[f"{prefix}/tasks_total"] = float(len(pairs))
    metrics[f"{prefix}/pairs_without_predictions"] = float(pairs_missing)
    metrics[f"{prefix}/aggregated_evals"] = float(evals)
    return metrics


def _rank(candidates: dict[str, list[float]]) -> list[str]:
    """Candidate hashes by votes, then mean q, descending; exact ties by hash."""
    stats = [(-len(qs), -math.fsum(qs) / len(qs), h) for h, qs in candidates.items()]
    return [h for *_, h in sorted(stats)]
