"""Run naming, W&B mode choice, JSON-lines metrics, logger fan-out and the progress bar."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from utils.logging import (
    JsonlLogger,
    MultiLogger,
    NullLogger,
    RunLogger,
    WandbLogger,
    build_logger,
    default_project_name,
    default_run_name,
    progress_bar,
    resolve_wandb_mode,
)

_WANDB_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "NETRC")


@pytest.fixture
def no_wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No W&B credentials or mode in the environment, and every home/cache folder in tmp_path."""
    for name in _WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


@pytest.fixture
def wandb_session(no_wandb_env: Path) -> Iterator[None]:
    """Tear wandb's process-wide session down afterwards so the next test's env is read afresh."""
    yield
    import wandb

    wandb.teardown()


def test_default_project_name() -> None:
    assert default_project_name(["data/arc-aug-1000"]) == "Arc-aug-1000-ACT-torch"
    assert (
        default_project_name(["data/sudoku-extreme-1k-aug-1000/", "data/other"])
        == "Sudoku-extreme-1k-aug-1000-ACT-torch"
    )
    assert default_project_name(["/abs/Maze-30x30-Hard-1k"]) == "Maze-30x30-hard-1k-ACT-torch"
    with pytest.raises(ValueError, match="data_paths"):
        default_project_name([])


def test_default_run_name_seeded() -> None:
    name = default_run_name("TinyRecursiveReasoningModel_ACTV1", random.Random(0))
    assert re.fullmatch(r"TinyRecursiveReasoningModel_ACTV1 [a-z]+-[a-z]+", name), name
    assert default_run_name("TinyRecursiveReasoningModel_ACTV1", random.Random(0)) == name
    others = {default_run_name("M", random.Random(seed)) for seed in range(1, 6)}
    assert len(others) > 1
    # The module-level generator is restored: unseeded names still vary.
    assert re.fullmatch(r"M [a-z]+-[a-z]+", default_run_name("M"))


def test_jsonl_logger_lines_and_append(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"train/lm_loss": 0.5, "train/count": 7}, step=1)
    # Flushed at once: readable before finish().
    assert json.loads(path.read_text().splitlines()[0]) == {
        "step": 1,
        "train/lm_loss": 0.5,
        "train/count": 7,
    }
    logger.log({"train/lm_loss": float("nan"), "a": float("inf"), "b": -math.inf}, step=2)
    logger.finish()

    resumed = JsonlLogger(path)
    resumed.log({"train/lm_loss": 0.25}, step=3)
    resumed.finish()

    lines = path.read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1] == {"step": 2, "train/lm_loss": "NaN", "a": "Infinity", "b": "-Infinity"}
    assert math.isnan(float(records[1]["train/lm_loss"])) and float(records[1]["b"]) == -math.inf
    assert records[2]["train/lm_loss"] == 0.25

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    for line in lines:
        json.loads(line, parse_constant=reject)


def test_jsonl_logger_config_merges(tmp_path: Path) -> None:
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log_config({"lr": 1e-4, "arch": {"name": "trm"}})
    logger.log_config({"num_params": 12})
    logger.finish()
    config = json.loads((tmp_path / "metrics.config.json").read_text())
    assert config == {"lr": 1e-4, "arch": {"name": "trm"}, "num_params": 12}


def test_resolve_wandb_mode(no_wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_wandb_mode("none") == "disabled"
    assert resolve_wandb_mode("disabled") == "disabled"
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="API key"):
        resolve_wandb_mode("online")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_wandb_mode("cloud")

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("offline") == "offline"

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode("online") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ValueError, match="API key"):
        resolve_wandb_mode("offline")
    assert resolve_wandb_mode("none") == "disabled"


def test_resolve_wandb_mode_reads_netrc(no_wandb_env: Path) -> None:
    netrc_path = no_wandb_env / ".netrc"
    netrc_path.write_text("machine example.com login user password secret\n")
    netrc_path.chmod(0o600)
    assert resolve_wandb_mode("auto") == "offline"
    netrc_path.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_wandb_mode("auto") == "online"


def test_build_logger_non_main_is_null(tmp_path: Path) -> None:
    for kind in ("wandb", "wandb_offline", "none"):
        logger = build_logger(
            kind, project="P", run_name="R", config={}, run_dir=tmp_path / "run", is_main=False
        )
        assert isinstance(logger, NullLogger)
        logger.log({"x": 1.0}, step=1)
        logger.log_config({"y": 2})
        logger.finish()
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="choose one of"):
        build_logger(
            "tensorboard", project="P", run_name="R", config={}, run_dir=tmp_path, is_main=True
        )


def test_build_logger_none_writes_jsonl(no_wandb_env: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    logger = build_logger(
        "none", project="P", run_name="R", config={"lr": 0.1}, run_dir=run_dir, is_main=True
    )
    assert isinstance(logger, MultiLogger) and isinstance(logger, RunLogger)
    assert [type(inner) for inner in logger.loggers] == [JsonlLogger]
    logger.log({"train/accuracy": 0.75}, step=5)
    logger.finish()
    assert json.loads((run_dir / "metrics.jsonl").read_text()) == {
        "step": 5,
        "train/accuracy": 0.75,
    }
    assert json.loads((run_dir / "metrics.config.json").read_text()) == {"lr": 0.1}
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.config.json", "metrics.jsonl"]


def test_build_logger_wandb_disabled_by_env(
    wandb_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = build_logger(
        "wandb", project="P", run_name="R", config={}, run_dir=tmp_path / "run", is_main=True
    )
    assert isinstance(logger, MultiLogger)
    assert [type(inner) for inner in logger.loggers] == [JsonlLogger]
    logger.finish()


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_wandb_logger_disabled_end_to_end(wandb_session: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    logger = WandbLogger("Arc-aug-1000-ACT-torch", "M a-b", {"lr": 1e-4}, run_dir, "disabled")
    logger.log({"train/lm_loss": 1.5}, step=1)
    logger.log_config({"num_params": 10})
    assert logger.run.config["num_params"] == 10
    logger.finish()
    assert _files_under(run_dir) == set()
    with pytest.raises(ValueError, match="choose one of"):
        WandbLogger("P", "R", {}, run_dir, "auto")


def test_wandb_logger_offline_run_folder(
    wandb_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    logger = build_logger(
        "wandb", project="P", run_name="M a-b", config={"lr": 0.1}, run_dir=run_dir, is_main=True
    )
    assert isinstance(logger, MultiLogger)
    assert [type(inner) for inner in logger.loggers] == [JsonlLogger, WandbLogger]
    logger.log({"train/lm_loss": 2.0}, step=1)
    logger.log({"train/lm_loss": 1.0}, step=2)
    logger.finish()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(10, is_main=False) as bar:
        assert bar.disabled
        bar.update(3, loss=1.0, ex_per_s=100.0)
    assert capsys.readouterr().err == ""

    bar = progress_bar(10, is_main=True, initial=2)
    assert not bar.disabled
    bar.update(3, loss=0.5)
    assert bar.bar.n == 5
    assert bar.bar.postfix is not None and "loss" in bar.bar.postfix
    bar.close()
