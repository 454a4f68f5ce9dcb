"""``benchmarks.latent_search`` end to end at a smoke size (40 training tasks, 4 steps, hidden
16, 2 search steps, 3 fine-tuning steps): its last line is one JSON object with the figures it
promises, and they keep the invariants that hold whatever the model learned; TRM's fine-tuning
baseline trained only the puzzle embedding, on the held-out tasks' demonstrations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import latent_search
from training.checkpointing import evaluation_weights
from utils.checkpoint import PUZZLE_EMB_KEY, load_checkpoint_files

SMOKE = ["--seeds", "0", "--train-steps", "4", "--train-tasks", "40", "--eval-tasks", "8",
         "--hidden-size", "16", "--search-steps", "2", "--timing-steps", "1", "3",
         "--rounds", "1", "--finetune-steps", "3"]  # fmt: skip
EVAL_TASKS = 8


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (step,) = sorted(run_dir.glob("step_*"))
    shared, _ = load_checkpoint_files(step, rank=0)
    return evaluation_weights(shared, use_ema=True)


def test_the_report_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latent_search.main([*SMOKE, "--workdir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["settings"]["tto"]["steps"] == 2
    assert report["settings"]["timing_steps"] == [1, 3]
    assert report["settings"]["finetune_steps"] == 3
    (run,) = report["runs"]
    assert run == json.loads(lines[-2])  # each seed's line comes before the report
    assert run["seed"] == 0
    for arch in ("etrm", "trm"):
        figure = {k.removeprefix(f"{arch}_"): v for k, v in run.items() if k.startswith(arch)}
        assert figure["puzzles"] >= 8  # every evaluation task's test pairs, one row each
        assert 0 <= figure["exact_search"] <= figure["pass@2_search"] <= 1
        assert figure["pass@2_no_search"] == figure["exact_no_search"]
        # The best latent is chosen over a trajectory that includes the start.
        assert figure["demo_loglik_start"] <= figure["demo_loglik_best"] < 0
        assert 0 <= figure["best_is_start"] <= 1
        assert figure["seconds_per_puzzle@1"] > 0 and figure["seconds_per_puzzle@3"] > 0
        # Every step costs the same demo forward and backward, so FLOPs grow with the steps.
        assert figure["flops_per_puzzle@3"] > figure["flops_per_puzzle@1"] > 0
        assert figure["search_seconds"] > 0
    assert run["etrm_puzzles"] == run["trm_puzzles"]  # the same rows
    # TRM alone gets the fine-tuning baseline, in the same line.
    assert 0 <= run["trm_finetune_exact"] <= 1 and run["trm_finetune_seconds"] > 0
    assert not any(k.startswith("etrm_finetune") for k in run)
    # It trained the puzzle embedding only: every dense weight is the trained TRM's, and the
    # table (the held-out tasks and the blank row) moved away from the mean row it started at.
    seed = tmp_path / "seed0"
    trained, tuned = _weights(seed / "trm"), _weights(seed / "trm_finetune")
    assert tuned.keys() == trained.keys()
    for key in trained:
        if key != PUZZLE_EMB_KEY:
            assert torch.equal(tuned[key], trained[key]), key
    table = tuned[PUZZLE_EMB_KEY]
    assert table.shape == (EVAL_TASKS + 1, trained[PUZZLE_EMB_KEY].shape[1])
    start = trained[PUZZLE_EMB_KEY].mean(dim=0)
    assert not torch.allclose(table[1:], start.expand_as(table[1:]))
    # Its data: the held-out tasks alone, their demos the train split, their queries the test.
    evaluated = json.loads((seed / "compact" / "test_puzzles.json").read_text())
    tuned_on = seed / "finetune_compact"
    assert json.loads((tuned_on / "test_puzzles.json").read_text()) == evaluated
    train_meta = json.loads((tuned_on / "train" / "dataset.json").read_text())
    test_meta = json.loads((tuned_on / "test" / "dataset.json").read_text())
    demos = sum(len(t["train"]) for t in evaluated.values())
    queries = sum(len(t["test"]) for t in evaluated.values())
    assert train_meta["split_policy"] == test_meta["split_policy"] == "trm"
    for meta, examples in ((train_meta, demos), (test_meta, queries)):
        assert meta["total_groups"] == meta["total_puzzles"] == EVAL_TASKS
        assert meta["total_puzzles"] * meta["mean_puzzle_examples"] == pytest.approx(examples)
    assert run["trm_puzzles"] == queries and demos == 2 * EVAL_TASKS
    assert set(report["summary"]) == set(run) - {"seed"}
    assert report["summary"]["etrm_exact_search"]["mean"] == run["etrm_exact_search"]
