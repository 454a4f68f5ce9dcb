"""``benchmarks.latent_search`` end to end at a smoke size (40 training tasks, 4 steps, hidden
16, 2 search steps): its last line is one JSON object with the figures it promises, and they
keep the invariants that hold whatever the model learned."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import latent_search

SMOKE = ["--seeds", "0", "--train-steps", "4", "--train-tasks", "40", "--eval-tasks", "8",
         "--hidden-size", "16", "--search-steps", "2", "--timing-steps", "1", "3",
         "--rounds", "1"]  # fmt: skip


def test_the_report_line(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latent_search.main(SMOKE)
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["settings"]["tto"]["steps"] == 2
    assert report["settings"]["timing_steps"] == [1, 3]
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
    assert run["etrm_puzzles"] == run["trm_puzzles"]  # the same rows
    assert set(report["summary"]) == set(run) - {"seed"}
    assert report["summary"]["etrm_exact_search"]["mean"] == run["etrm_exact_search"]
