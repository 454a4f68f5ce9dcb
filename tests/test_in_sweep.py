"""The JD fork's run-level switches: ``+in_sweep=True`` (a trial of its W&B sweep, started by
``wandb agent``), and ``+no_wandb`` and ``+dropout`` on a ``pretrain.py`` command line.

W&B is a fake module in ``sys.modules``: no network, no account.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sweeps.in_sweep import NOT_AN_AGENT, apply_sweep_values, join_sweep_run
from tests.test_puzzle_dataset import write_split
from tests.test_run_files import TINY as RUN_FILES_TINY
from training.config import PretrainConfig, load_pretrain_config
from utils.config import compose, lenient_overrides
from utils.distributed import DistInfo
from utils.logging import build_logger
from utils.schema import ConfigError

# The run-file tests' tiny run, logging to an offline W&B run.
TINY = [o for o in RUN_FILES_TINY if not o.startswith("logger=")] + ["logger=wandb_offline"]


class FakeRunConfig(dict):
    """``run.config``: a dict with W&B's ``update(..., allow_val_change=...)``."""

    def update(self, other: Mapping[str, Any] = (), /, allow_val_change: bool = False) -> None:
        super().update(other)


class FakeRun:
    """A started W&B run that records what it is sent."""

    def __init__(self, project: str, name: str) -> None:
        self.project, self.name = project, name
        self.config = FakeRunConfig()
        self.logged: list[tuple[dict[str, Any], int]] = []
        self.code: list[tuple[str, Any]] = []
        self.finished: list[int | None] = []

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.logged.append((dict(metrics), step))

    def log_code(self, root: str, include_fn: Any = None) -> None:
        self.code.append((root, include_fn))

    def finish(self, exit_code: int | None = None) -> None:
        self.finished.append(exit_code)


def fake_wandb(
    monkeypatch: pytest.MonkeyPatch, sampled: Mapping[str, Any], agent: bool = True
) -> types.ModuleType:
    """A ``wandb`` module whose ``config`` holds an agent's ``sampled`` values; ``init`` records
    its keyword arguments and returns a ``FakeRun``."""
    fake = types.ModuleType("wandb")
    fake.config = dict(sampled)  # type: ignore[attr-defined]
    fake.init_calls = []  # type: ignore[attr-defined]
    fake.runs = []  # type: ignore[attr-defined]
    fake.Settings = lambda **kwargs: dict(kwargs)  # type: ignore[attr-defined]
    fake.Table = lambda **kwargs: dict(kwargs)  # type: ignore[attr-defined]
    fake.plot = types.SimpleNamespace(line_series=lambda **kwargs: dict(kwargs))  # type: ignore[attr-defined]

    def init(**kwargs: Any) -> FakeRun:
        fake.init_calls.append(kwargs)  # type: ignore[attr-defined]
        run = FakeRun("Fork-sweep", f"swept-run-{len(fake.runs) + 1}")  # type: ignore[attr-defined]
        fake.runs.append(run)  # type: ignore[attr-defined]
        fake.run = run  # type: ignore[attr-defined]
        return run

    fake.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    if agent:
        monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
        monkeypatch.setenv("WANDB_RUN_ID", "run42")
    else:
        monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return fake


def sweep_config(*overrides: str) -> PretrainConfig:
    return load_pretrain_config(
        compose(overrides=[*TINY, "data_paths=[data/base]", "+in_sweep=True", *overrides])
    )


# ----------------------------------------------------------------------------------------------
# +in_sweep=True
# ----------------------------------------------------------------------------------------------
def test_fork_names_and_dotted_keys_are_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    sampled = {"data": "arc2eval-aug-400", "H_cycles": 4, "L_cycles": 3, "halt_max_steps": 8,
               "lr": 2e-4, "arch.hidden_size": 32, "lr_warmup_steps": 5,
               "_wandb": {"cli_version": "0.31"}}  # fmt: skip
    fake = fake_wandb(monkeypatch, sampled)
    base = sweep_config()
    merged, run = join_sweep_run(base)
    # wandb.init() as the fork calls it: no project, name or config (the agent names the run).
    assert fake.init_calls == [{"settings": {"x_disable_stats": True}}]
    assert run is fake.runs[0]
    assert merged.data_paths == ["data/arc2eval-aug-400"]
    arch = merged.arch
    assert (arch.H_cycles, arch.L_cycles, arch.halt_max_steps, arch.hidden_size) == (4, 3, 8, 32)
    assert (merged.lr, merged.lr_warmup_steps) == (2e-4, 5)
    assert (merged.project_name, merged.run_name) == ("Fork-sweep", "swept-run-1")
    # Nothing else moved.
    changed = {"data_paths", "lr", "lr_warmup_steps", "project_name", "run_name", "arch"}
    before, after = base.model_dump(), merged.model_dump()
    assert {k: v for k, v in after.items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed
    }
    arch_changed = {"H_cycles", "L_cycles", "halt_max_steps", "hidden_size"}
    assert {k: v for k, v in after["arch"].items() if k not in arch_changed} == {
        k: v for k, v in before["arch"].items() if k not in arch_changed
    }
    assert run.finished == []


def test_names_given_on_the_command_line_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_wandb(monkeypatch, {"lr": 1e-3})
    merged, _ = join_sweep_run(sweep_config("+project_name=mine", "+run_name=trial"))
    assert (merged.project_name, merged.run_name, merged.lr) == ("mine", "trial", 1e-3)


def test_a_refused_sampled_value_fails_as_any_config(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_wandb(monkeypatch, {"H_cycles": 3, "arch.hidden_size": 33})  # 2 heads
    with pytest.raises(ConfigError) as info:
        join_sweep_run(sweep_config())
    message = str(info.value)
    assert "\n" not in message and message.startswith("in_sweep: the sampled values")
    assert "arch.hidden_size=33" in message and "divisible by num_heads" in message
    assert fake.runs[0].finished == [2]  # the agent's run ends as failed
    with pytest.raises(ConfigError, match=r"lr.*greater than or equal to 0"):
        apply_sweep_values(sweep_config(), {"lr": -1.0})


@pytest.mark.parametrize("key", ["H_cycle", "arch.no_such_key", "data_paths.0", "objective.x"])
def test_an_unknown_sweep_key_is_named(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    fake = fake_wandb(monkeypatch, {"lr": 1e-3, key: 3})
    with pytest.raises(ConfigError) as info:
        join_sweep_run(sweep_config())
    message = str(info.value)
    assert "\n" not in message and f"W&B sweep parameter {key!r}" in message
    assert "rename it in the sweep definition" in message
    assert fake.runs[0].finished == [2]


def test_without_a_wandb_agent_nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_wandb(monkeypatch, {"lr": 1e-3}, agent=False)
    with pytest.raises(ConfigError) as info:
        join_sweep_run(sweep_config())
    assert str(info.value) == (
        "in_sweep=True: not started by `wandb agent` (no WANDB_SWEEP_ID); launch the trial "
        "with `wandb agent <sweep>` or drop +in_sweep"
    )
    assert str(info.value) == NOT_AN_AGENT and fake.init_calls == []


def test_the_logger_logs_into_the_joined_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = fake_wandb(monkeypatch, {"lr": 1e-3})
    config, run = join_sweep_run(sweep_config())
    logger = build_logger(
        config.logger, project="p", run_name="r", config={"lr": config.lr, "arch": {"x": 1}},
        run_dir=tmp_path / "run", is_main=True, wandb_run=run,
    )  # fmt: skip
    logger.log({"train/lm_loss": 0.5}, step=3)
    logger.log_code(tmp_path / "run" / "code")
    logger.finish()
    assert len(fake.init_calls) == 1  # the join's only: no second wandb.init
    assert run.logged == [({"train/lm_loss": 0.5}, 3)]
    assert run.config == {"lr": 1e-3, "arch": {"x": 1}}
    assert [root for root, _ in run.code] == [str(tmp_path / "run" / "code")]
    include = run.code[0][1]
    assert [include(p) for p in ("a/b.py", "config/x.yaml", "git.txt", "m.pyc", "w.pt")] == [
        True, True, True, False, False,
    ]  # fmt: skip
    assert run.finished == [None]
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # the JSON lines beside W&B, as always


def test_a_sweep_trial_trains_into_the_agents_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``pretrain.launch`` end to end: the sampled values reach the run, the run folder and its
    record are named after the W&B run, and every metric goes to that one run."""
    import pretrain

    for split in ("train", "test"):
        write_split(tmp_path / "data" / "swept", split)
    monkeypatch.chdir(tmp_path)  # the fork's data key is a folder under data/
    fake = fake_wandb(monkeypatch, {"data": "swept", "H_cycles": 1, "lr": 3e-3})
    pretrain.launch(sweep_config(), DistInfo())
    assert len(fake.init_calls) == 1
    run = fake.runs[0]
    run_dir = tmp_path / "checkpoints" / "Fork-sweep" / "swept-run-1"
    saved = yaml.safe_load((run_dir / "all_config.yaml").read_text())
    assert saved["data_paths"] == ["data/swept"]
    assert (saved["arch"]["H_cycles"], saved["lr"], saved["in_sweep"]) == (1, 3e-3, True)
    steps = [step for _, step in run.logged]
    assert steps and steps == sorted(steps) and steps[-1] >= 1
    assert any("train/lm_loss" in metrics for metrics, _ in run.logged)
    assert run.config["arch"]["H_cycles"] == 1  # the merged config, added to the agent's run
    assert [Path(root).resolve() for root, _ in run.code] == [run_dir / "code"]
    assert run.finished == [None]


# ----------------------------------------------------------------------------------------------
# +no_wandb and +dropout, as the fork's command lines give them
# ----------------------------------------------------------------------------------------------
def command_line(*args: str) -> PretrainConfig:
    """``python pretrain.py <args>``'s validated config (Hydra's compose API, with the entry
    point's lenient overrides)."""
    return load_pretrain_config(compose(overrides=lenient_overrides(list(args))))


def test_no_wandb_folds_into_logger_none() -> None:
    base = ["arch=trm", "data_paths=[data/x]", "logger=wandb"]
    assert command_line(*base, "+no_wandb=True").logger == "none"
    assert command_line(*base, "+no_wandb=False").logger == "wandb"
    assert command_line("arch=trm", "data_paths=[data/x]", "+no_wandb=False").logger == (
        command_line("arch=trm", "data_paths=[data/x]").logger
    )
    with pytest.raises(ConfigError, match="no_wandb: expected true or false"):
        command_line(*base, "+no_wandb=maybe")
    with pytest.raises(ConfigError, match="in_sweep=True reads its values from W&B"):
        command_line(*base, "+no_wandb=True", "+in_sweep=True")


@pytest.mark.parametrize("arch", ["trm", "trmjd", "hrm", "etrm"])
def test_dropout_sets_arch_dropout(arch: str) -> None:
    assert command_line(f"arch={arch}", "data_paths=[data/x]", "+dropout=0.2").arch.dropout == 0.2
    with pytest.raises(ConfigError, match="dropout"):
        command_line(f"arch={arch}", "data_paths=[data/x]", "+dropout=1.5")
