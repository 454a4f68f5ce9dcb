"""What the entry points answer to input mistakes: one ``error:`` line, exit code 2, and
nothing created in the working directory or the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataset.common import DataError
from tests.test_training import FAST, _cli, make_config
from training.config import load_pretrain_config
from training.data import create_dataloader
from utils.config import ConfigError, compose, lenient_overrides
from utils.distributed import DistInfo
from utils.logging import build_logger


def test_an_unknown_key_without_plus_gets_the_validation_answer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(compose(overrides=["+lrr=1"]))
    expected = f"error: {info.value}"
    assert expected.startswith("error: lrr: unknown key; allowed keys here: aggregator, ")
    assert expected.endswith("; did you mean lr?")
    bad = _cli("pretrain.py", "lrr=1", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []  # no outputs/DATE/TIME from Hydra


def test_close_matches_are_named_for_nested_keys() -> None:
    with pytest.raises(ConfigError, match=r"arch\.hiden_size: unknown key; .*; did you mean "
                       r"hidden_size\?$"):  # fmt: skip
        load_pretrain_config(compose(overrides=["+arch.hiden_size=3"]))


def test_lenient_overrides_touch_only_plain_value_overrides() -> None:
    args = [
        "lrr=1", "arch.L_cycles=4", "data_paths=[a,b]", "arch=trm", "+run_name=x",
        "++ema=True", "~evaluators", "hydra.run.dir=x", "hydra/job_logging=none",
        "objective@x=sum", "-cn", "cfg_pretrain", "-sc", "install=bash", "-m", "lr=1,2",
    ]  # fmt: skip
    assert lenient_overrides(args) == [
        "++lrr=1", "++arch.L_cycles=4", "++data_paths=[a,b]", "arch=trm", "+run_name=x",
        "++ema=True", "~evaluators", "hydra.run.dir=x", "hydra/job_logging=none",
        "objective@x=sum", "-cn", "cfg_pretrain", "-sc", "install=bash", "-m", "++lr=1,2",
    ]  # fmt: skip
    # For keys that exist, ++ is a plain override.
    overrides = ["arch.L_cycles=4", "lr=0.5", "arch=hrm"]
    plain = load_pretrain_config(compose(overrides=overrides))
    forced = load_pretrain_config(compose(overrides=lenient_overrides(overrides)))
    assert forced == plain and forced.arch.name == "hrm" and forced.lr == 0.5


def test_a_missing_data_path_creates_nothing(tmp_path: Path) -> None:
    cwd, run = tmp_path / "cwd", tmp_path / "cwd" / "run"
    cwd.mkdir()
    bad = _cli("pretrain.py", *FAST, "logger=wandb_offline", f"data_paths=[{tmp_path / 'nope'}]",
               f"+checkpoint_path={run}", cwd=cwd)  # fmt: skip
    assert bad.returncode == 2
    (line,) = bad.stderr.splitlines()
    assert line.startswith(f"error: no 'train' split in {tmp_path / 'nope'}: ")
    assert line.endswith("fix data_paths (data_paths_test for the evaluation data)")
    assert list(cwd.iterdir()) == []  # no run folder, no metrics files, no Hydra outputs


def test_evaluate_creates_no_hydra_folder(tmp_path: Path) -> None:
    bad = _cli("evaluate.py", f"checkpoint={tmp_path / 'nothing'}", cwd=tmp_path)
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr
    assert list(tmp_path.iterdir()) == []


def test_evaluate_answers_a_typo_before_the_missing_checkpoint(tmp_path: Path) -> None:
    typo = _cli("evaluate.py", "chekpoint=x", cwd=tmp_path)
    assert typo.returncode == 2
    (line,) = typo.stderr.strip().splitlines()
    assert line.startswith("error: chekpoint: unknown key;") and line.endswith(
        "did you mean checkpoint?"
    )
    missing = _cli("evaluate.py", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: checkpoint: required; give checkpoint=PATH (a step_N folder or an upstream "
        "state-dict file)"
    ]


def test_a_batch_larger_than_the_data_is_refused(data: Path, tmp_path: Path) -> None:
    config = make_config(data, tmp_path / "run", "global_batch_size=64", "evaluators=[]")
    with pytest.raises(DataError) as info:
        create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    # 6 groups, 25 examples over 11 puzzles: about 14 examples per epoch, 27 per iteration.
    assert str(info.value) == (
        f"global_batch_size 64 is larger than what the training data {data} yields: about 14 "
        "examples per epoch, 27 per iteration of 2 epochs (eval_interval), so no step would "
        "run; lower global_batch_size"
    )
    create_dataloader(config.model_copy(update={"global_batch_size": 8}), "train", DistInfo(),
                      test_set_mode=False)  # fmt: skip
    create_dataloader(config, "test", DistInfo(), test_set_mode=True)  # a short window is fine


def test_the_run_logger_creates_its_files_at_the_first_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    logger = build_logger(
        "none", project="P", run_name="R", config={"lr": 0.1}, run_dir=run, is_main=True
    )
    logger.finish()
    assert not run.exists()
    logger = build_logger(
        "none", project="P", run_name="R", config={"lr": 0.1}, run_dir=run, is_main=True
    )
    logger.log({"model/num_params": 10.0}, step=0)
    logger.finish()
    assert json.loads((run / "metrics.config.json").read_text()) == {"lr": 0.1}
    assert json.loads((run / "metrics.jsonl").read_text()) == {"step": 0, "model/num_params": 10}
