"""Test-time latent search in evaluation: the attempts' voting rule, ``evaluate.py tto.*``, the
plain results untouched (bit-identical with search off, and beside search when on), and two
gloo ranks equal to one.

The voting rule (``evaluators.arc_tto``) is checked on hand-made rows of a strict-split build of
10 tasks (``tests.test_arc_subset_eval``'s): per role, each variant's ranked attempts and demo
log-likelihoods are chosen so that the votes, the likelihood tie-break and the fallback of
attempt 2 each decide one task; the expected pass@K and attempts are worked out by hand below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluators.arc import ARCEvaluatorConfig
from evaluators.arc_tto import ARCSearch, attempt_order, build_search_evaluators
from tests.test_arc_subset_eval import _canvas, _in_frame, _test_split, strict_build

__all__ = ["strict_build"]  # the module-scoped fixture, shared with tests.test_arc_subset_eval

# Per role and test pair: per variant, (rank-1 answer, its demo log-likelihood), (rank-2 ...).
# Answers: the label, W1 = label + 1, W2 = label + 2 (mod 10).
SEARCH_ROLES = {
    # Two votes for the label in pool 1; pool 2 gives W1 (summed log-likelihood -1 > -2).
    "votes": [[(("label", -1.0), ("W1", -1.0)), (("label", -1.0), ("W2", -2.0))]] * 2,
    # One vote each in pool 1: the label's log-likelihood (-1) beats W1's (-5); pool 2's best
    # (the label, -6 > -8) is attempt 1 already, so attempt 2 is pool 2's next grid, W2.
    "likelihood": [[(("W1", -5.0), ("label", -6.0)), (("label", -1.0), ("W2", -8.0))]] * 2,
    # Pool 1 is wrong, pool 2 (the second-best latent) is right: pass@1 0, pass@2 1.
    "second": [[(("W1", -1.0), ("label", -2.0)), (("W1", -1.0), ("label", -2.0))]] * 2,
    # Pool 2 holds only attempt 1's grid: attempt 2 falls back to pool 1's runner-up.
    "fallback": [[(("W1", -1.0), ("W1", -1.0)), (("label", -3.0), ("W1", -3.0))]] * 2,
    # Nothing right.
    "wrong": [[(("W1", -1.0), ("W2", -1.0)), (("W2", -1.0), ("W1", -1.0))]] * 2,
}
GROUPS = len(SEARCH_ROLES)
NUM_TASKS = 10
SEARCH_PASS_1 = (1 + 1 + 0 + 0 + 0) / GROUPS
SEARCH_PASS_2 = (1 + 1 + 1 + 1 + 0) / GROUPS
SEARCH_ATTEMPTS = {
    "votes": ("label", "W1"),
    "likelihood": ("label", "W2"),
    "second": ("W1", "label"),
    "fallback": ("W1", "label"),
    "wrong": ("W1", "W2"),  # pool 1: one vote each at -1, so grid hash decides; see below
}
SHIFT = {"label": 0, "W1": 1, "W2": 2}


def _search_rows(
    build: Path,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the tasks of the first GROUPS groups, one batch of their rows, its search outputs)."""
    names = json.loads((build / "identifiers.json").read_text())
    solutions = json.loads((build / "test_puzzles.json").read_text())
    split = _test_split(build)
    groups, puzzles = split["group_indices"], split["puzzle_indices"]
    tasks, idents, inputs, preds, logliks = [], [], [], [], []
    for g, role in enumerate(SEARCH_ROLES):
        for v, p in enumerate(range(groups[g], groups[g + 1])):
            ident = int(split["puzzle_identifiers"][p])
            name = names[ident]
            task = name.split("|||")[0]
            if v == 0:
                tasks.append(task)
            first, end = int(puzzles[p]), int(puzzles[p + 1])
            queries = first + int(split["num_demos"][p])
            for e in range(first, end):
                idents.append(ident)
                inputs.append(split["inputs"][e])
                if e < queries:  # a demonstration row: confident garbage that must not count
                    preds.append(np.stack([split["inputs"][e]] * 2))
                    logliks.append([0.0, 0.0])
                    continue
                label = np.array(solutions[task]["test"][e - queries]["output"], dtype=np.uint8)
                attempts = SEARCH_ROLES[role][e - queries][v]
                preds.append(
                    np.stack(
                        [_canvas(_in_frame((label + SHIFT[a]) % 10, name)) for a, _ in attempts]
                    )
                )
                logliks.append([ll for _, ll in attempts])
    idents.append(0)  # a padding row
    inputs.append(np.zeros(900))
    preds.append(np.full((2, 900), 5))
    logliks.append([0.0, 0.0])
    batch = {
        "puzzle_identifiers": torch.tensor(idents),
        "inputs": torch.from_numpy(np.stack(inputs).astype(np.int64)),
    }
    outputs = {
        "attempt_preds": torch.from_numpy(np.stack(preds).astype(np.int64)),
        "attempt_demo_loglik": torch.tensor(logliks, dtype=torch.float32),
    }
    return tasks, batch, outputs


def _score(build: Path, out: Path, reverse: bool = False) -> dict[str, float]:
    _, batch, outputs = _search_rows(build)
    evaluator = ARCSearch(ARCEvaluatorConfig(pass_Ks=[1, 2]), [str(build)], [0])
    evaluator.begin_eval()
    rows = torch.arange(len(batch["inputs"]))
    rows = rows.flip(0) if reverse else rows
    half = len(rows) // 2
    for part in (rows[:half], rows[half:]):
        evaluator.update_batch(
            {k: v[part] for k, v in batch.items()}, {k: v[part] for k, v in outputs.items()}
        )
    metrics = evaluator.result(str(out))
    assert metrics is not None
    return metrics


def test_search_attempts_are_voted_by_rank_then_likelihood(
    strict_build: Path, tmp_path: Path
) -> None:
    metrics = _score(strict_build, tmp_path)
    assert metrics["ARC-tto/pass@1"] == pytest.approx(SEARCH_PASS_1, abs=1e-12)
    assert metrics["ARC-tto/pass@2"] == pytest.approx(SEARCH_PASS_2, abs=1e-12)
    assert metrics["ARC-tto/tasks_evaluated"] == GROUPS
    assert metrics["ARC-tto/tasks_total"] == NUM_TASKS
    assert not any(k.startswith("ARC/") for k in metrics)

    tasks, _, _ = _search_rows(strict_build)
    submission = json.loads((tmp_path / "submission.json").read_text())
    solutions = json.loads((strict_build / "test_puzzles.json").read_text())
    assert set(submission) == set(tasks)
    for task, role in zip(tasks, SEARCH_ROLES, strict=True):
        for pair, entry in enumerate(submission[task]):
            label = np.array(solutions[task]["test"][pair]["output"])
            got = [entry["attempt_1"], entry["attempt_2"]]
            expected = [((label + SHIFT[a]) % 10).tolist() for a in SEARCH_ATTEMPTS[role]]
            if role == "wrong":  # W1 and W2 tie exactly in pool 1; either order, both present
                assert sorted(got) == sorted(expected), (task, pair)
            else:
                assert got == expected, (task, pair)


def test_the_ranking_does_not_depend_on_row_order(strict_build: Path, tmp_path: Path) -> None:
    forward, backward = tmp_path / "forward", tmp_path / "backward"
    forward.mkdir()
    backward.mkdir()
    a = _score(strict_build, forward)
    b = _score(strict_build, backward, reverse=True)
    assert a == b
    assert (forward / "submission.json").read_bytes() == (backward / "submission.json").read_bytes()


def test_attempt_order_by_hand() -> None:
    """Pool 0: x 2 votes, y 1; pool 1: x (excluded, attempt 1 already), z, then pool 0's y."""
    pools = {0: {"x": [-1.0, -1.0], "y": [-0.5]}, 1: {"x": [-3.0, -3.0], "z": [-9.0]}}
    assert attempt_order(pools) == ["x", "z", "y"]
    # Equal votes: the higher summed log-likelihood first; -inf (unscored) last.
    assert attempt_order({0: {"a": [-2.0], "b": [-1.0], "c": [float("-inf")]}}) == ["b", "a", "c"]
    # Pool 1 has nothing new: attempt 2 is pool 0's runner-up.
    assert attempt_order({0: {"a": [-1.0, -1.0], "b": [-1.0]}, 1: {"a": [-1.0] * 3}}) == ["a", "b"]


def test_every_arc_evaluator_gets_a_search_counterpart(strict_build: Path) -> None:
    config = ARCEvaluatorConfig(pass_Ks=[1, 3], submission_K=3, aggregated_voting=False)
    built = build_search_evaluators([config], [str(strict_build)], [0])
    assert len(built) == 1 and isinstance(built[0], ARCSearch)
    assert built[0].config == config
    assert build_search_evaluators([], [str(strict_build)], [0]) == []
