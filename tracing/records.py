"""Trace records: the captured steps of one row turned into the task's own frame.

A row of the test split is one augmented copy of one test input of a task. Its predictions
are cropped from the canvas and de-augmented with the ARC evaluator's helpers
(``evaluators.arc.crop``, ``dataset.common.inverse_aug``), then written as compact grids:
rows of digits joined by ``|`` (``"012|340"``), ``""`` for an empty grid.

With test-time latent search on (``tto.steps > 0``), the clean record of a searched row also
holds ``search`` (``search_entry``): the options, every candidate's demo log-likelihood at every
step of the search, the start's, whether the best point is a start, and the A attempts (the
query's predictions under the A best distinct points, cropped and de-augmented as the steps'
grids) with their demo log-likelihoods; perturbed variants and rows not searched hold null.
Without search the key is absent, so such a record is exactly what it was before search
existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataset.common import PUZZLE_ID_SEPARATOR, DataError, inverse_aug
from evaluators.arc import BLANK_IDENTIFIER_ID, crop, grid_hash
from tracing.config import Perturbation
from tracing.record import StepCapture
from training.latent_search import SearchOutput, TTOConfig

SCHEMA = "trm-trace/v1"
CLEAN = "clean"


def grid_string(grid: np.ndarray) -> str:
    """uint8 [rows, cols] colours → ``"012|340"``; ``""`` for an empty grid."""
    if grid.size == 0:
        return ""
    return "|".join("".join(str(int(c)) for c in row) for row in grid)


def parse_grid(text: str) -> np.ndarray:
    """The inverse of ``grid_string``: uint8 [rows, cols]."""
    if not text:
        return np.zeros((0, 0), dtype=np.uint8)
    return np.array([[int(c) for c in row] for row in text.split("|")], dtype=np.uint8)


def aug_label(name: str) -> str:
    """``"identity"`` for an original puzzle name, ``"t<k>_c<colour map>"`` for the variant
    ``task|||t<k>|||<colour map>``."""
    if PUZZLE_ID_SEPARATOR not in name:
        return "identity"
    trans, digits = name.split(PUZZLE_ID_SEPARATOR)[-2:]
    return f"{trans}_c{digits}"


def _json_grid(value: Any, where: str) -> np.ndarray:
    try:
        grid = np.array(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: not a rectangular grid of integers") from None
    if grid.ndim != 2 or grid.size == 0 or grid.min() < 0 or grid.max() > 9:
        raise DataError(f"{where}: expected a non-empty grid of colours 0..9")
    return grid.astype(np.uint8)


@dataclass
class TaskInfo:
    """One task of ``test_puzzles.json``: test inputs by hash → test index, the targets and
    the demonstration pairs (compact grids, original frame)."""

    inputs: dict[str, int]
    targets: list[np.ndarray]
    demos: list[dict[str, str]]


@dataclass
class RowKey:
    """Which record a batch row is: task, test index, augmentation, the map back to the
    task's frame, and the identity its perturbation noise is seeded from."""

    task: str
    test_index: int
    aug: str
    undo: Callable[[np.ndarray], np.ndarray]
    input_grid: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.task}\x1f{self.test_index}\x1f{self.aug}"

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """A predicted canvas (tokens [S]) cropped and mapped back to the task's frame."""
        return np.ascontiguousarray(self.undo(crop(tokens)))


@dataclass
class TaskFrames:
    """Identifier names and the tasks of the evaluated data (from an ``evaluators.arc.ARC``'s
    ``identifier_names`` and ``test_puzzles``); ``order`` is the tasks in source order."""

    names: list[str | None]
    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    @classmethod
    def from_files(cls, names: list[str | None], test_puzzles: dict[str, Any]) -> TaskFrames:
        frames = cls(names=names)
        for task, puzzle in test_puzzles.items():
            where = f"test_puzzles.json: task {task}"
            inputs, targets = {}, []
            for i, pair in enumerate(puzzle["test"]):
                inputs.setdefault(grid_hash(_json_grid(pair["input"], f"{where} test {i}")), i)
                targets.append(_json_grid(pair["output"], f"{where} test {i} output"))
            demos = [
                {
                    "input": grid_string(_json_grid(p["input"], f"{where} train {i}")),
                    "output": grid_string(_json_grid(p["output"], f"{where} train {i}")),
                }
                for i, p in enumerate(puzzle.get("train", []))
            ]
            frames.tasks[task] = TaskInfo(inputs, targets, demos)
            frames.order.append(task)
        return frames

    def row_key(self, identifier: int, input_tokens: np.ndarray) -> RowKey | None:
        """The record of a batch row, or None for a blank row or a row that is no test input
        (the demonstration rows of a strict-split build)."""
        if identifier == BLANK_IDENTIFIER_ID or not 0 <= identifier < len(self.names):
            return None
        name = self.names[identifier]
        if name is None:
            return None
        task, undo = inverse_aug(name)
        info = self.tasks.get(task)
        if info is None:
            return None
        grid = undo(crop(input_tokens))
        test_index = info.inputs.get(grid_hash(np.ascontiguousarray(grid)))
        if test_index is None:
            return None
        return RowKey(task, test_index, aug_label(name), undo, grid)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def build_record(
    frames: TaskFrames,
    row: RowKey,
    r: int,
    steps: Sequence[StepCapture],
    variant: str,
    perturbation: Perturbation | None,
) -> dict[str, Any]:
    """The shard record (``trm-trace/v1``, without its ``id``) of recorded row ``r``."""
    info = frames.tasks[row.task]
    target = info.targets[row.test_index]
    decode = row.decode
    out_steps: list[dict[str, Any]] = []
    previous: np.ndarray | None = None
    for t, cap in enumerate(steps, start=1):
        pred = decode(cap.preds[r])
        changed: int | None = None
        if previous is not None:
            same = previous.shape == pred.shape
            changed = int((previous != pred).sum()) if same else int(pred.size)
        exact = bool(pred.shape == target.shape and np.array_equal(pred, target))
        q_halt = float(cap.q_halt[r])
        out_steps.append(
            {
                "act_step": t,
                "pred": grid_string(pred),
                "q_halt": q_halt,
                "q_continue": float(cap.q_continue[r]),
                "halt_prob": 1.0 / (1.0 + math.exp(-q_halt)) if q_halt > -700 else 0.0,
                "would_halt": bool(cap.would_halt[r]),
                "h_cos_dist": _num(cap.h_cos_dist[r]),
                "l_cos_dist": _num(cap.l_cos_dist[r]),
                "dz_rel_h": _num(cap.dz_rel_h[r]),
                "dz_rel_l": _num(cap.dz_rel_l[r]),
                "cells_changed": changed,
                "token_acc": float(cap.token_acc[r]) if cap.has_labels[r] else None,
                "exact": exact,
                "h_cycles": [
                    {
                        "pred": grid_string(decode(c.preds[r])),
                        "l_probes": [grid_string(decode(p[r])) for p in c.probes],
                    }
                    for c in cap.h_cycles
                ],
            }
        )
        previous = pred
    record = {
        "schema": SCHEMA,
        "puzzle_id": row.task,
        "test_index": row.test_index,
        "aug": row.aug,
        "demos": info.demos,
        "input": grid_string(row.input_grid),
        "target": grid_string(target),
        "variant": variant,
        "perturbation": None if perturbation is None else perturbation.as_json(),
        "steps": out_steps,
    }
    record.update(summarise(out_steps))
    return record


@dataclass(frozen=True)
class SearchCapture:
    """The search of the R recorded rows in host memory (``SearchOutput`` of those rows):
    ``preds`` int [R, A, S], ``demo_loglik`` float [R, A], ``loglik_start`` float [R],
    ``trajectory`` float [R, C, steps + 1] (NaN for candidates a row does not have),
    ``best_is_start`` and ``searched`` bool [R]."""

    preds: np.ndarray
    demo_loglik: np.ndarray
    loglik_start: np.ndarray
    trajectory: np.ndarray
    best_is_start: np.ndarray
    searched: np.ndarray

    @classmethod
    def from_output(cls, found: SearchOutput) -> SearchCapture:
        return cls(
            preds=found.preds.cpu().numpy(),
            demo_loglik=found.demo_loglik.cpu().numpy(),
            loglik_start=found.loglik_start.cpu().numpy(),
            trajectory=found.loglik_trajectory.cpu().numpy(),
            best_is_start=found.best_is_start.cpu().numpy(),
            searched=found.searched.cpu().numpy(),
        )


def search_options(config: TTOConfig) -> dict[str, Any]:
    """The options a record's ``search`` states: every ``tto`` key that decides the search
    (``count_flops`` only measures it)."""
    return config.model_dump(mode="json", exclude={"count_flops"})


def search_entry(
    row: RowKey, capture: SearchCapture, r: int, options: dict[str, Any]
) -> dict[str, Any] | None:
    """A clean record's ``search`` object for recorded row ``r``, None when the row was not
    searched (no demos).

    ``{"options": {...tto keys}, "loglik_start": float, "best_is_start": bool,
    "loglik_trajectory": [[float | null] * (steps + 1)] per candidate the row has (step 0 is the
    start), "attempts": [{"pred": G, "demo_loglik": float | null}] * A}``; log-likelihoods are
    demo log-likelihoods (mean over demos of the mean per-token log-probability, nats), null
    where not finite.
    """
    if not bool(capture.searched[r]):
        return None
    trajectory = capture.trajectory[r]
    own = ~np.isnan(trajectory).all(axis=1)  # a batch pads every row to its most candidates
    return {
        "options": options,
        "loglik_start": _finite(capture.loglik_start[r]),
        "best_is_start": bool(capture.best_is_start[r]),
        "loglik_trajectory": [[_finite(v) for v in c] for c in trajectory[own]],
        "attempts": [
            {"pred": grid_string(row.decode(p)), "demo_loglik": _finite(ll)}
            for p, ll in zip(capture.preds[r], capture.demo_loglik[r], strict=True)
        ],
    }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarise(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``first_halt_step``, ``first_correct_step``, ``final_exact``, ``solved_then_lost`` of a
    record's steps (the exact flags null when the target is unknown)."""
    halts = [s["act_step"] for s in steps if s["would_halt"]]
    known = all(s["exact"] is not None for s in steps)
    correct = [s["act_step"] for s in steps if s["exact"]]
    final = bool(steps[-1]["exact"]) if known else None
    return {
        "first_halt_step": halts[0] if halts else None,
        "first_correct_step": (correct[0] if correct else None) if known else None,
        "final_exact": final,
        "solved_then_lost": (bool(correct) and not final) if known else None,
    }
