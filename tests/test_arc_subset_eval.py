"""pass@K over a subset of the test set is divided by the tasks evaluated, and the submission
holds exactly those tasks (ETRM divided by all 400 while evaluating 32: every subset score was
deflated by 32/400).

A strict-split build of 10 hand-made evaluation tasks (2 demonstration and 2 test pairs each,
2 variants per task). As ``max_eval_groups=4`` does, only the first 4 task groups of the test
split are fed to the evaluator: their query rows with hand-chosen predictions, encoded in each
variant's frame by code in this file, plus their demonstration rows with confident garbage
(which must not count) and a blank padding row. Scores are worked out by hand below.

``evaluate.py max_eval_groups=2`` on a tiny ETRM checkpoint then goes through the few-shot
evaluation loader: 2 tasks evaluated of 3, and the submission holds those 2. On a tiny TRM
checkpoint it goes through the sequential loader, which passes the first 2 groups' rows only,
with the outputs the full evaluation gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import build_arc_dataset
from evaluate import EvaluateConfig
from evaluate import run as run_evaluate
from evaluators.arc import ARC, ARCEvaluatorConfig
from tests.conftest import EXPLICIT
from tests.test_pretrained_decoder import ETRM, build_arc
from tests.test_training import make_config, train
from utils.distributed import DistInfo

NUM_TASKS, SUBSET = 10, 4
# Roles of the first four groups, per test pair: (answer, q_halt logit) of variant 0 and 1.
# Answers: the label, W1 = label + 1 (mod 10), W2 = label + 2 (mod 10).
ROLES = {
    # Both pairs right by both variants: task score 1 at K = 1 and 2.
    "all_right": [[("label", 0.0), ("label", 0.0)]] * 2,
    # One vote each, W1's mean q is higher: ranked W1, label -> pass@1 0, pass@2 1.
    "tie_lost": [[("W1", 2.0), ("label", -1.0)]] * 2,
    # Pair 0 right, pair 1 wrong: 0.5 at K = 1 and 2.
    "half": [[("label", 0.0), ("label", 0.0)], [("W1", 0.0), ("W1", 0.0)]],
    # Two wrong candidates: 0 at both K.
    "wrong": [[("W1", 1.0), ("W2", 0.0)]] * 2,
}
PASS_1 = (1 + 0 + 0.5 + 0) / SUBSET  # 0.375; ETRM's denominator of 10 gave 0.15
PASS_2 = (1 + 1 + 0.5 + 0) / SUBSET  # 0.625; ETRM's gave 0.25
# The submission's two attempts per pair, as answer names (a single candidate is repeated).
ATTEMPTS = {
    "all_right": [("label", "label")] * 2,
    "tie_lost": [("W1", "label")] * 2,
    "half": [("label", "label"), ("W1", "W1")],
    "wrong": [("W1", "W2")] * 2,
}


def _grid(rng: np.random.Generator, h: int, w: int) -> list[list[int]]:
    return rng.integers(0, 10, size=(h, w)).tolist()


def _task(rng: np.random.Generator) -> dict:
    pair = lambda: {"input": _grid(rng, 3, 4), "output": _grid(rng, 2, 3)}  # noqa: E731
    return {"train": [pair(), pair()], "test": [pair(), pair()]}


@pytest.fixture(scope="module")
def strict_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("subset")
    rng = np.random.default_rng(3)
    subsets = {
        "training": {f"tr{i}": _task(rng) for i in range(2)},
        "evaluation": {f"ev{i:02d}": _task(rng) for i in range(NUM_TASKS)},
    }
    for subset, tasks in subsets.items():
        challenges = {
            n: {"train": t["train"], "test": [{"input": p["input"]} for p in t["test"]]}
            for n, t in tasks.items()
        }
        solutions = {n: [p["output"] for p in t["test"]] for n, t in tasks.items()}
        (root / f"arc_{subset}_challenges.json").write_text(json.dumps(challenges))
        (root / f"arc_{subset}_solutions.json").write_text(json.dumps(solutions))
    out = root / "data"
    build_arc_dataset.main(
        ["--input-file-prefix", str(root / "arc"), "--output-dir", str(out),
         "--subsets", "training", "evaluation", "--test-set-name", "evaluation",
         "--num-aug", "1", "--split-policy", "strict"]
    )  # fmt: skip
    return out


def _in_frame(grid: np.ndarray, name: str) -> np.ndarray:
    """A grid in original colours drawn in the frame of variant ``name``."""
    if "|||" not in name:
        return grid
    _, trans, digits = name.split("|||")
    return np.array([int(d) for d in digits], dtype=np.uint8)[EXPLICIT[int(trans[1:])](grid)]


def _canvas(grid: np.ndarray) -> np.ndarray:
    """900 tokens: colours + 2 at the origin, EOS after the last row and column, PAD 0."""
    out = np.zeros((30, 30), dtype=np.int64)
    h, w = grid.shape
    out[:h, :w] = grid + 2
    out[h, : w + 1] = 1
    out[:h, w] = 1
    return out.ravel()


def _test_split(build: Path) -> dict[str, np.ndarray]:
    return {
        field: np.load(build / "test" / f"all__{field}.npy")
        for field in (
            "inputs",
            "puzzle_identifiers",
            "puzzle_indices",
            "group_indices",
            "num_demos",
        )
    }


def _first_groups(
    build: Path,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the tasks of the first SUBSET groups, one batch of their rows, its outputs)."""
    names = json.loads((build / "identifiers.json").read_text())
    solutions = json.loads((build / "test_puzzles.json").read_text())
    split = _test_split(build)
    groups, puzzles = split["group_indices"], split["puzzle_indices"]
    tasks, rows = [], []
    for g in range(SUBSET):
        role = list(ROLES)[g]
        for v, p in enumerate(range(groups[g], groups[g + 1])):
            ident = int(split["puzzle_identifiers"][p])
            name = names[ident]
            task = name.split("|||")[0]
            if v == 0:
                tasks.append(task)
            first, end = int(puzzles[p]), int(puzzles[p + 1])
            queries = first + int(split["num_demos"][p])
            for e in range(first, end):
                if e < queries:  # a demonstration row: a confident wrong answer
                    rows.append((ident, split["inputs"][e], split["inputs"][e], 9.0))
                    continue
                label = np.array(solutions[task]["test"][e - queries]["output"], dtype=np.uint8)
                answer, q = ROLES[role][e - queries][v]
                shift = {"label": 0, "W1": 1, "W2": 2}[answer]
                grid = _in_frame((label + shift) % 10, name)
                rows.append((ident, split["inputs"][e], _canvas(grid), q))
    rows.append((0, np.zeros(900), np.full(900, 5), 9.0))  # padding
    batch = {
        "puzzle_identifiers": torch.tensor([r[0] for r in rows]),
        "inputs": torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64)),
    }
    outputs = {
        "preds": torch.from_numpy(np.stack([r[2] for r in rows]).astype(np.int64)),
        "q_halt_logits": torch.tensor([r[3] for r in rows]),
    }
    return tasks, batch, outputs


def test_subset_pass_at_k_and_submission(strict_build: Path, tmp_path: Path) -> None:
    tasks, batch, outputs = _first_groups(strict_build)
    assert len(set(tasks)) == SUBSET
    evaluator = ARC(ARCEvaluatorConfig(pass_Ks=[1, 2]), [str(strict_build)], [0])
    evaluator.begin_eval()
    half = len(batch["inputs"]) // 2  # two batches, as a loader would give them
    for part in (slice(0, half), slice(half, None)):
        evaluator.update_batch(
            {k: v[part] for k, v in batch.items()}, {k: v[part] for k, v in outputs.items()}
        )
    metrics = evaluator.result(str(tmp_path))
    assert metrics is not None
    assert metrics["ARC/pass@1"] == pytest.approx(PASS_1, abs=1e-12)
    assert metrics["ARC/pass@2"] == pytest.approx(PASS_2, abs=1e-12)
    assert metrics["ARC/tasks_evaluated"] == SUBSET and metrics["ARC/tasks_total"] == NUM_TASKS

    submission = json.loads((tmp_path / "submission.json").read_text())
    solutions = json.loads((strict_build / "test_puzzles.json").read_text())
    assert set(submission) == set(tasks)
    for task, role in zip(tasks, ROLES, strict=True):
        entries = submission[task]
        assert len(entries) == 2
        for pair, (entry, picks) in enumerate(zip(entries, ATTEMPTS[role], strict=True)):
            assert set(entry) == {"attempt_1", "attempt_2"}
            label = np.array(solutions[task]["test"][pair]["output"])
            shift = {"label": 0, "W1": 1, "W2": 2}
            expected = [((label + shift[a]) % 10).tolist() for a in picks]
            assert [entry["attempt_1"], entry["attempt_2"]] == expected, (task, pair)


def test_evaluate_py_on_an_etrm_checkpoint_with_max_eval_groups(tmp_path: Path) -> None:
    data = build_arc(tmp_path, "strict")
    run_dir = tmp_path / "run"
    outcome = train(make_config(data, run_dir, *ETRM, "evaluators=[{name: arc}]", "max_steps=2"))
    assert outcome.eval_metrics["ARC/tasks_evaluated"] == 3  # the run's: every group
    assert outcome.last_checkpoint is not None

    out = tmp_path / "eval"
    ecfg = EvaluateConfig(
        checkpoint=str(outcome.last_checkpoint), max_eval_groups=2, output_dir=str(out)
    )
    metrics = run_evaluate(ecfg, DistInfo())
    assert metrics["ARC/tasks_evaluated"] == 2 and metrics["ARC/tasks_total"] == 3
    assert 0 <= metrics["ARC/pass@1"] <= metrics["ARC/pass@2"] <= 1
    assert metrics["provenance/contaminated_decoder"] == 0.0  # trained on strict data only

    names = json.loads((data / "identifiers.json").read_text())
    split = _test_split(data)
    groups = split["group_indices"]
    first = {
        names[int(split["puzzle_identifiers"][p])].split("|||")[0]
        for g in range(2)
        for p in range(groups[g], groups[g + 1])
    }
    submission = json.loads((out / "submission.json").read_text())
    solutions = json.loads((data / "test_puzzles.json").read_text())
    assert set(submission) == first
    for task, entries in submission.items():
        assert len(entries) == len(solutions[task]["test"])
        assert all(set(e) == {"attempt_1", "attempt_2"} for e in entries)
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["max_eval_groups"] == 2
    assert summary["provenance"]["contaminated_decoder"] is False


def test_evaluate_py_on_a_trm_checkpoint_with_max_eval_groups(tmp_path: Path) -> None:
    """TRM reads no demos, so its test loader is the sequential one: ``max_eval_groups=2``
    passes the rows of the first 2 groups (demonstration and query rows alike), the same rows
    with the same outputs as the full evaluation's first ones."""
    data = build_arc(tmp_path, "strict")
    outcome = train(make_config(data, tmp_path / "run", "evaluators=[{name: arc}]", "max_steps=2"))
    assert outcome.last_checkpoint is not None
    keys = ["puzzle_identifiers", "inputs", "preds", "q_halt_logits"]
    runs = {}
    for groups in (None, 2):
        out = tmp_path / f"eval_{groups}"
        ecfg = EvaluateConfig(checkpoint=str(outcome.last_checkpoint), max_eval_groups=groups,
                              output_dir=str(out), eval_save_outputs=keys)  # fmt: skip
        metrics = run_evaluate(ecfg, DistInfo())
        runs[groups] = metrics, torch.load(out / "eval_outputs.pt", weights_only=True), out

    split = _test_split(data)
    puzzles, groups = split["puzzle_indices"], split["group_indices"]
    first_rows = int(puzzles[groups[2]])
    assert 0 < first_rows < len(split["inputs"])
    (full, full_out, _), (subset, sub_out, sub_dir) = runs[None], runs[2]
    assert len(full_out["inputs"]) == len(split["inputs"])
    sizes = np.diff(puzzles[: groups[2] + 1])  # the examples of each puzzle of groups 0 and 1
    expected_ids = np.repeat(split["puzzle_identifiers"][: groups[2]], sizes)
    assert sub_out["puzzle_identifiers"].tolist() == expected_ids.tolist()
    assert torch.equal(sub_out["inputs"], torch.from_numpy(split["inputs"][:first_rows]).long())
    for key in keys:
        assert torch.equal(sub_out[key], full_out[key][:first_rows]), key

    assert full["ARC/tasks_evaluated"] == 3 == full["ARC/tasks_total"]
    assert subset["ARC/tasks_evaluated"] == 2 and subset["ARC/tasks_total"] == 3
    names = json.loads((data / "identifiers.json").read_text())
    first = {names[int(i)].split("|||")[0] for i in split["puzzle_identifiers"][: groups[2]]}
    assert len(first) == 2
    assert set(json.loads((sub_dir / "submission.json").read_text())) == first
