"""The ARC evaluator: crop, voting, pass@K, submission.json, aggregation, gloo gather.

A tiny ARC dataset is built with the real builder (``--num-aug 3``: 4 variants per task). The
predictions are made by hand: for every test row, a chosen answer grid (the label or a known
wrong grid) is encoded in that row's augmented frame by code in this file (explicit numpy
transforms, colour map read from the puzzle name), with a chosen q_halt logit. The expected
metrics and submission are worked out by hand in the comments of ``PLAN``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataset import build_arc_dataset
from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from evaluators.arc import ARC, ARCEvaluatorConfig, _rank, crop, grid_hash
from evaluators.base import (
    EVALUATOR_CONFIGS,
    EVALUATORS,
    Evaluator,
    EvaluatorConfig,
    build_evaluators,
)
from tests.conftest import EXPLICIT

PASS_KS = [1, 2, 3]
NUM_VARIANTS = 4  # the original + 3 augmentations
CPU = torch.device("cpu")
GLOBAL_BATCH = 8  # 36 test rows: the last batch has 4 padded (blank) rows

# Per task and test pair, the prediction of variants 0..3: (answer, q_halt logit), or None for
# no prediction. Answers: "label" (correct), "W1" (label + 1 mod 10), "W2", "W3" (other shapes).
Choice = tuple[str, float] | None
PLAN: dict[str, list[list[Choice]]] = {
    # 3 low-q votes for the label beat 1 high-q vote: ranked label, W1 -> pass@1,2,3 = 1.
    "a_major": [[("label", -2.0), ("label", -2.0), ("label", -1.0), ("W1", 6.0)]],
    # 2 votes each; W1's mean q is higher -> ranked W1, label: pass@1 = 0, pass@2,3 = 1.
    "b_tie": [[("W1", 2.0), ("label", -1.0), ("W1", 1.0), ("label", 0.5)]],
    # Pair 0 right, pair 1 wrong: task score 0.5 at every K.
    "c_half": [[("label", 0.0)] * 4, [("W2", 3.0)] * 4],
    # Pair 0 right, pair 1 has no prediction at all: 0.5, and a fallback in the submission.
    "d_missing": [[("label", 0.0)] * 4, [None] * 4],
    # The label is third: W1 (2 votes), W2 (1 vote, q high), label (1 vote) -> only pass@3 = 1.
    "f_third": [[("W1", 0.0), ("W1", 0.0), ("W2", 4.0), ("label", -4.0)]],
    "e_spare": [[("label", 0.0)] * 4],
    # 2 votes each; now the label's mean q is higher -> pass@1 = 1.
    "g_tie2": [[("W1", -1.0), ("label", 2.0), ("W1", -1.0), ("label", 1.0)]],
}
# Task scores at K = 1, 2, 3: a 1,1,1  b 0,1,1  c .5,.5,.5  d .5,.5,.5  f 0,0,1  e 1,1,1  g 1,1,1
FULL = {
    "ARC/pass@1": 4 / 7,
    "ARC/pass@2": 5 / 7,
    "ARC/pass@3": 6 / 7,
    "ARC/tasks_evaluated": 7.0,
    "ARC/tasks_total": 7.0,
    "ARC/pairs_without_predictions": 1.0,
    "ARC/aggregated_evals": 1.0,
}
# Without e_spare and f_third: the mean over the 5 evaluated tasks, not over all 7.
SUBSET_SKIP = {"e_spare", "f_third"}
SUBSET = {
    "ARC/pass@1": 3 / 5,
    "ARC/pass@2": 4 / 5,
    "ARC/pass@3": 4 / 5,
    "ARC/tasks_evaluated": 5.0,
    "ARC/tasks_total": 7.0,
    "ARC/pairs_without_predictions": 3.0,
    "ARC/aggregated_evals": 1.0,
}
# Submission attempts per task and pair, as answer names.
FULL_SUBMISSION = {
    "a_major": [("label", "W1")],
    "b_tie": [("W1", "label")],
    "c_half": [("label", "label"), ("W2", "W2")],
    "d_missing": [("label", "label"), None],
    "f_third": [("W1", "W2")],
    "e_spare": [("label", "label")],
    "g_tie2": [("label", "W1")],
}


# ----------------------------------------------------------------------------------------------
# The dataset and hand-made predictions
# ----------------------------------------------------------------------------------------------
def _grid(rng: np.random.Generator, h: int, w: int) -> list[list[int]]:
    # Several colours per grid, so 3 distinct augmentations always exist.
    return ((rng.permutation(h * w) % 7) + 1 + rng.integers(0, 3)).reshape(h, w).tolist()


def _tasks(names: list[str], seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    tasks = {}
    for i, name in enumerate(names):
        n_tests = len(PLAN.get(name, [[]]))
        pair = lambda h, w: {"input": _grid(rng, h, w), "output": _grid(rng, w, h + 1)}  # noqa: E731
        tasks[name] = {
            "train": [pair(2, 3)],
            "test": [pair(2 + i % 3 + t, 3 + t) for t in range(n_tests)],
        }
    return tasks


def _build(root: Path, tasks: dict[str, dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    prefix = root / "arc-agi"
    challenges = {
        n: {"train": t["train"], "test": [{"input": p["input"]} for p in t["test"]]}
        for n, t in tasks.items()
    }
    solutions = {n: [p["output"] for p in t["test"]] for n, t in tasks.items()}
    Path(f"{prefix}_evaluation_challenges.json").write_text(json.dumps(challenges))
    Path(f"{prefix}_evaluation_solutions.json").write_text(json.dumps(solutions))
    out = root / "data"
    build_arc_dataset.main(
        [
            "--input-file-prefix", str(prefix), "--output-dir", str(out),
            "--subsets", "evaluation", "--test-set-name", "evaluation", "--num-aug", "3",
        ]
    )  # fmt: skip
    return out


def _answers(tasks: dict[str, dict]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per task and test pair, the label and the three wrong grids (original frame)."""
    out = {}
    for name, task in tasks.items():
        pairs = []
        for p in task["test"]:
            label = np.array(p["output"], dtype=np.uint8)
            h, w = label.shape
            pairs.append(
                {
                    "label": label,
                    "W1": (label + 1) % 10,
                    "W2": np.full((h + 1, 1), 4, np.uint8),
                    "W3": np.full((1, w + 1), 6, np.uint8),
                }
            )
        out[name] = pairs
    return out


def _to_variant(grid: np.ndarray, name: str) -> np.ndarray:
    """Original-frame colours -> the frame of puzzle ``name`` (``task|||t<k>|||<map digits>``)."""
    if "|||" not in name:
        return grid
    _, trans, digits = name.split("|||")
    colour_map = np.array([int(d) for d in digits], dtype=np.uint8)
    return colour_map[EXPLICIT[int(trans[1:])](grid)]


def _encode(grid: np.ndarray) -> np.ndarray:
    """Colours [h, w] -> 900 tokens at the origin: colour + 2, EOS right and below, PAD 0."""
    canvas = np.zeros((30, 30), dtype=np.uint8)
    h, w = grid.shape
    canvas[:h, :w] = grid + 2
    if h < 30:
        canvas[h, :w] = 1
    if w < 30:
        canvas[:h, w] = 1
    return canvas.ravel()


class Predictor:
    """Hand-made outputs for loader batches of one or more ARC datasets (global identifiers)."""

    def __init__(self, paths: list[Path], tasks: dict[str, dict]) -> None:
        self.names: list[str] = []
        for path in paths:  # the loader's offsets: path k's ids follow the earlier paths'
            self.names += json.loads((path / "identifiers.json").read_text())
        self.answers = _answers(tasks)
        variants: dict[str, list[str]] = {}
        for name in self.names[1:]:
            if name != "<blank>":
                variants.setdefault(name.split("|||")[0], []).append(name)
        # (variant name, encoded input) -> (task, pair index, variant index)
        self.index: dict[tuple[str, bytes], tuple[str, int, int]] = {}
        for task, names in variants.items():
            assert len(names) == NUM_VARIANTS, f"{task} has {len(names)} variants"
            for v, name in enumerate(names):
                for p, pair in enumerate(tasks[task]["test"]):
                    grid = _to_variant(np.array(pair["input"], dtype=np.uint8), name)
                    self.index[(name, _encode(grid).tobytes())] = (task, p, v)

    def __call__(
        self, batch: dict[str, torch.Tensor], plan: dict[str, list[list[Choice]]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return the batch (rows without a prediction turned blank) and the model outputs."""
        ids = batch["puzzle_identifiers"].clone()
        preds = torch.zeros_like(batch["inputs"])
        q = torch.zeros(len(ids))
        for r, ident in enumerate(ids.tolist()):
            if ident == 0:
                preds[r] = 7  # padding rows carry garbage; they must be ignored
                q[r] = 10.0
                continue
            name = self.names[ident]
            key = (name, batch["inputs"][r].numpy().astype(np.uint8).tobytes())
            task, p, v = self.index[key]  # KeyError: the builder's encoding differs from ours
            choice = plan[task][p][v] if task in plan else None
            if choice is None:
                ids[r] = 0
                continue
            answer, logit = choice
            grid = _to_variant(self.answers[task][p][answer], name)
            preds[r] = torch.from_numpy(_encode(grid).astype(np.int32))
            q[r] = logit
        return {**batch, "puzzle_identifiers": ids}, {"preds": preds, "q_halt_logits": q}


def _loader(paths: list[Path], rank: int = 0, world: int = 1) -> PuzzleDataset:
    config = PuzzleDatasetConfig(
        seed=0,
        dataset_paths=[str(p) for p in paths],
        global_batch_size=GLOBAL_BATCH,
        test_set_mode=True,
        epochs_per_iter=1,
        rank=rank,
        num_replicas=world,
    )
    return PuzzleDataset(config, split="test")


def _config(**kw: Any) -> ARCEvaluatorConfig:
    return ARCEvaluatorConfig(pass_Ks=PASS_KS, **kw)


def _evaluate(
    evaluator: ARC,
    loader: PuzzleDataset,
    predictor: Predictor,
    plan: dict[str, list[list[Choice]]],
    device: torch.device = CPU,
) -> None:
    evaluator.begin_eval()
    for _set_name, batch, _gbs in loader:
        batch, outputs = predictor(batch, plan)
        evaluator.update_batch(
            {k: v.to(device) for k, v in batch.items()},
            {k: v.to(device) for k, v in outputs.items()},
        )


def _expected_submission(
    tasks: dict[str, dict], answers: dict[str, list[dict[str, np.ndarray]]]
) -> dict[str, list[dict[str, list[list[int]]]]]:
    out = {}
    for task in tasks:
        entries = []
        for p, pick in enumerate(FULL_SUBMISSION[task]):
            grids = [[[0]], [[0]]] if pick is None else [answers[task][p][a].tolist() for a in pick]
            entries.append({"attempt_1": grids[0], "attempt_2": grids[1]})
        out[task] = entries
    return out


@pytest.fixture(scope="module")
def arc_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    tasks = _tasks(list(PLAN), seed=7)
    return _build(tmp_path_factory.mktemp("arc"), tasks), tasks


def _assert_metrics(got: dict[str, float] | None, expected: dict[str, float]) -> None:
    assert got is not None
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# ----------------------------------------------------------------------------------------------
# Crop and hash
# ----------------------------------------------------------------------------------------------
def _crop_loop(tokens: np.ndarray) -> np.ndarray:
    """Upstream's row-by-row scan, written as a plain loop (the reference for ``crop``)."""
    grid = tokens.reshape(30, 30)
    best_area, best = 0, (0, 0)
    num_c = 30
    for num_r in range(1, 31):
        for c in range(1, num_c + 1):
            if not 2 <= grid[num_r - 1, c - 1] <= 11:
                num_c = c - 1
                break
        if num_r * num_c > best_area:
            best_area, best = num_r * num_c, (num_r, num_c)
    return (grid[: best[0], : best[1]] - 2).astype(np.uint8)


def test_crop_hand_written_canvases() -> None:
    grid = np.array([[3, 0, 9], [1, 1, 2]], dtype=np.uint8)
    canvas = np.zeros((30, 30), dtype=np.int32)
    canvas[:2, :3] = grid + 2
    canvas[2, :3] = 1  # EOS row below
    canvas[:2, 3] = 1  # EOS column right
    assert np.array_equal(crop(canvas.ravel()), grid)
    assert crop(canvas.ravel()).dtype == np.uint8

    full = (np.arange(900).reshape(30, 30) % 10).astype(np.uint8)
    assert np.array_equal(crop(full.ravel() + 2), full)

    one = np.zeros(900, dtype=np.int64)
    one[0], one[1], one[30] = 5 + 2, 1, 1
    assert np.array_equal(crop(one), np.array([[5]], dtype=np.uint8))

    assert crop(np.zeros(900, dtype=np.int32)).shape == (0, 0)


def test_crop_takes_the_largest_area_not_the_first_rows() -> None:
    canvas = np.full((30, 30), 1, dtype=np.int32)
    canvas[0, :5] = 4  # row 0: width 5 (area 5)
    canvas[1:4, :2] = 6  # rows 1..3: width 2 -> areas 4, 6, 8
    assert crop(canvas.ravel()).shape == (4, 2)
    canvas[0, :9] = 4  # width 9 now beats 4 rows of width 2
    assert np.array_equal(crop(canvas.ravel()), np.full((1, 9), 2, dtype=np.uint8))


def test_crop_matches_the_scan_on_random_canvases() -> None:
    rng = np.random.default_rng(0)
    for i in range(300):
        colour = rng.integers(2, 12, size=(30, 30))
        stop = rng.random((30, 30)) < [0.0, 0.01, 0.05, 0.3][i % 4]
        canvas = np.where(stop, rng.integers(0, 2, size=(30, 30)), colour)
        expected = _crop_loop(canvas.ravel())
        got = crop(canvas.ravel())
        assert got.shape == expected.shape and np.array_equal(got, expected), i


def test_grid_hash_includes_the_shape() -> None:
    a = np.zeros((2, 3), dtype=np.uint8)
    assert grid_hash(a) != grid_hash(a.reshape(3, 2))
    assert grid_hash(np.rot90(np.arange(6, dtype=np.uint8).reshape(2, 3))) == grid_hash(
        np.array([[2, 5], [1, 4], [0, 3]], dtype=np.uint8)
    )


def test_rank_votes_then_mean_q_then_hash() -> None:
    # Majority beats a more confident minority.
    assert _rank({"a": [0.1, 0.1, 0.1], "b": [0.99]}) == ["a", "b"]
    # Equal votes: the higher mean q wins, whichever hash sorts first.
    assert _rank({"a": [0.2, 0.3], "b": [0.9, 0.8]}) == ["b", "a"]
    assert _rank({"a": [0.9, 0.8], "b": [0.2, 0.3]}) == ["a", "b"]
    # Exact ties are ordered by hash, independent of insertion order.
    assert _rank({"b": [0.5], "a": [0.5]}) == ["a", "b"]


# ----------------------------------------------------------------------------------------------
# Scoring and submission
# ----------------------------------------------------------------------------------------------
def test_full_evaluation_metrics_and_submission(
    arc_data: tuple[Path, dict[str, dict]], tmp_path: Path, device: torch.device
) -> None:
    path, tasks = arc_data
    predictor = Predictor([path], tasks)
    evaluator = ARC(_config(), [str(path)], [0])
    _evaluate(evaluator, _loader([path]), predictor, PLAN, device)
    save = tmp_path / "nested" / "evaluator_ARC_step_1"
    _assert_metrics(evaluator.result(str(save)), FULL)

    assert sorted(p.name for p in save.iterdir()) == ["submission.json"]  # no temp file left
    submission = json.loads((save / "submission.json").read_text())
    test_puzzles = json.loads((path / "test_puzzles.json").read_text())
    assert list(submission) == list(test_puzzles)  # tasks in test_puzzles.json order
    assert submission == _expected_submission(tasks, predictor.answers)
    # The missing pair keeps its index: pair 0 is the label, pair 1 the fallback.
    assert submission["d_missing"][1] == {"attempt_1": [[0]], "attempt_2": [[0]]}


def test_subset_of_tasks_averages_over_evaluated_tasks(
    arc_data: tuple[Path, dict[str, dict]],
) -> None:
    path, tasks = arc_data
    plan = {t: p for t, p in PLAN.items() if t not in SUBSET_SKIP}
    evaluator = ARC(_config(), [str(path)], [0])
    _evaluate(evaluator, _loader([path]), Predictor([path], tasks), plan)
    _assert_metrics(evaluator.result(None), SUBSET)


def test_nothing_evaluated_gives_zero(arc_data: tuple[Path, dict[str, dict]]) -> None:
    path, _ = arc_data
    evaluator = ARC(_config(submission_K=3), [str(path)], [0])
    evaluator.begin_eval()
    metrics = evaluator.result(None)
    assert metrics is not None
    assert metrics["ARC/pass@1"] == 0.0 and metrics["ARC/tasks_evaluated"] == 0.0
    assert metrics["ARC/pairs_without_predictions"] == 9.0


@pytest.mark.parametrize("aggregated", [True, False])
def test_aggregated_voting_pools_evaluations(
    arc_data: tuple[Path, dict[str, dict]], aggregated: bool
) -> None:
    path, tasks = arc_data
    predictor = Predictor([path], tasks)
    evaluator = ARC(_config(aggregated_voting=aggregated), [str(path)], [0])
    # Round 1: all 4 variants vote for the label; round 2: 3 variants vote for W1.
    _evaluate(evaluator, _loader([path]), predictor, {"a_major": [[("label", 0.0)] * 4]})
    first = evaluator.result(None)
    assert first is not None and first["ARC/pass@1"] == 1.0
    round2: dict[str, list[list[Choice]]] = {"a_major": [[("W1", 5.0)] * 3 + [None]]}
    _evaluate(evaluator, _loader([path]), predictor, round2)
    second = evaluator.result(None)
    assert second is not None and second["ARC/tasks_evaluated"] == 1.0
    if aggregated:  # 4 label votes (round 1) beat 3 W1 votes (round 2)
        assert second["ARC/pass@1"] == 1.0 and second["ARC/aggregated_evals"] == 2.0
    else:
        assert second["ARC/pass@1"] == 0.0 and second["ARC/aggregated_evals"] == 1.0


def test_two_data_paths_use_the_loader_offsets(
    arc_data: tuple[Path, dict[str, dict]], tmp_path: Path
) -> None:
    path, tasks = arc_data
    extra_tasks = _tasks(["h_other"], seed=11)
    extra = _build(tmp_path / "extra", extra_tasks)
    loader = _loader([path, extra])
    assert loader.identifier_offsets[1] > 0
    evaluator = ARC(_config(), [str(path), str(extra)], loader.identifier_offsets)
    plan = {**PLAN, "h_other": [[("label", 0.0)] * 4]}
    _evaluate(evaluator, loader, Predictor([path, extra], {**tasks, **extra_tasks}), plan)
    metrics = evaluator.result(str(tmp_path / "out"))
    assert metrics is not None
    assert metrics["ARC/tasks_total"] == 8.0
    assert metrics["ARC/pass@1"] == pytest.approx((4 + 1) / 8)
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert list(submission)[-1] == "h_other"


# ----------------------------------------------------------------------------------------------
# Construction and registry
# ----------------------------------------------------------------------------------------------
def test_missing_or_malformed_files_name_the_file(
    arc_data: tuple[Path, dict[str, dict]], tmp_path: Path
) -> None:
    path, _ = arc_data
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test_puzzles.json").write_text((path / "test_puzzles.json").read_text())
    with pytest.raises(FileNotFoundError) as missing:
        ARC(_config(), [str(broken)], [0])
    assert str(broken / "identifiers.json") in str(missing.value)
    assert "\n" not in str(missing.value)

    (broken / "identifiers.json").write_text((path / "identifiers.json").read_text())
    (broken / "test_puzzles.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"test_puzzles\.json: malformed JSON") as bad:
        ARC(_config(), [str(broken)], [0])
    assert str(broken / "test_puzzles.json") in str(bad.value)
    assert "\n" not in str(bad.value)


def test_unknown_identifier_is_an_error(arc_data: tuple[Path, dict[str, dict]]) -> None:
    path, _ = arc_data
    evaluator = ARC(_config(), [str(path)], [0])
    batch = {
        "inputs": torch.zeros(1, 900, dtype=torch.int32),
        "puzzle_identifiers": torch.tensor([10_000], dtype=torch.int32),
    }
    outputs = {"preds": torch.zeros(1, 900, dtype=torch.int32), "q_halt_logits": torch.zeros(1)}
    with pytest.raises(ValueError, match="puzzle identifier 10000"):
        evaluator.update_batch(batch, outputs)


def test_build_evaluators_from_configs(arc_data: tuple[Path, dict[str, dict]]) -> None:
    path, _ = arc_data
    (evaluator,) = build_evaluators([EvaluatorConfig(name="arc@ARC")], [str(path)], [0])
    assert isinstance(evaluator, ARC) and isinstance(evaluator, Evaluator)
    assert evaluator.config == ARCEvaluatorConfig()
    assert evaluator.required_outputs == {"inputs", "puzzle_identifiers", "q_halt_logits", "preds"}
    with pytest.raises(ValueError, match="identifier offsets"):
        build_evaluators([ARCEvaluatorConfig()], [str(path)], [0, 5])


def test_every_evaluator_config_has_an_evaluator() -> None:
    assert set(EVALUATOR_CONFIGS.names()) <= set(EVALUATORS.names())


# ----------------------------------------------------------------------------------------------
# Two gloo ranks equal one process
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data: str, tasks: dict, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        path = Path(data)
        evaluator = ARC(_config(), [data], [0])
        _evaluate(evaluator, _loader([path], rank, world), Predictor([path], tasks), PLAN)
        votes = sum(
            len(qs) for t in evaluator._votes.values() for c in t.values() for qs in c.values()
        )
        metrics = evaluator.result(str(Path(out) / "dist"))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "votes": votes}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_two_gloo_ranks_equal_one_process(
    arc_data: tuple[Path, dict[str, dict]], tmp_path: Path
) -> None:
    path, tasks = arc_data
    mp.spawn(
        _rank_main,
        args=(2, _free_port(), str(path), tasks, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    single = ARC(_config(), [str(path)], [0])
    _evaluate(single, _loader([path]), Predictor([path], tasks), PLAN)
    expected = single.result(str(tmp_path / "single"))

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["votes"] > 0 for r in ranks)  # both ranks really got rows
    assert ranks[1]["metrics"] is None
    assert ranks[0]["metrics"] == expected
    _assert_metrics(ranks[0]["metrics"], FULL)
    dist_submission = (tmp_path / "dist" / "submission.json").read_text()
    assert dist_submission == (tmp_path / "single" / "submission.json").read_text()
