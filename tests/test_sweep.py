"""Sweeps: the sweep file's validation, its W&B translation, and a local Optuna sweep of tiny
CPU trials that prunes one trial, records the best, and resumes the same study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sweeps.cli import main
from sweeps.launcher import MetricFollower, trial_command, trial_overrides
from sweeps.space import load_sweep_config
from sweeps.wandb_backend import wandb_sweep_dict

REPO = Path(__file__).resolve().parent.parent
# A trial: a 16-wide one-cycle TRM, 2 epochs of the tiny ARC build (2 steps each), evaluated
# after every epoch by the token loss; no checkpoints, so a trial is mostly start-up.
TINY_TRIAL = [
    "+experiment=tiny_cpu",
    "data_workers=0",
    "global_batch_size=8",
    "arch.hidden_size=16",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "arch.halt_max_steps=1",
    "evaluators=[]",
    "epochs=2",
    "eval_interval=1",
    "lr_warmup_steps=1",
    "checkpoint_every_eval=False",
]


def write_sweep(path: Path, **fields: Any) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


FORK_COMMAND = [
    "${env}", "${interpreter}", "-m", "torch.distributed.run", "--standalone",
    "--nproc-per-node", "2", "${program}", "arch=trm", "epochs=4000", "eval_interval=200",
    "+load_checkpoint=checkpoints/downloaded/Sanjin2024_TinyRecursiveModels-ARC-AGI-2/step_217602",
    "${args_no_hyphens}",
]  # fmt: skip


def test_the_forks_sweep_translates_to_its_wandb_definition() -> None:
    config = load_sweep_config(REPO / "config" / "sweep" / "jd_fork.yaml")
    expected = {
        "name": "jd_fork",
        "method": "bayes",
        "metric": {"name": "ARC/pass@2", "goal": "maximize"},
        "parameters": {
            "arch.H_cycles": {"values": [3, 4]},
            "arch.L_cycles": {"values": [3, 4]},
            "data_paths": {
                "values": [
                    "[data/arc2eval-aug-200]",
                    "[data/arc2eval-aug-400]",
                    "[data/arc2eval-aug-800]",
                ]
            },
            "lr": {"values": [1e-4, 2e-4]},
            "arch.halt_max_steps": {"values": [8, 16, 24]},
        },
        "program": "pretrain.py",
        "command": FORK_COMMAND,
        "run_cap": 20,
        "early_terminate": {"type": "hyperband", "min_iter": 3, "eta": 2, "s": 2},
    }
    assert wandb_sweep_dict(config) == expected
    assert config.timeout_s == 3600


def test_ranges_translate_to_wandb_distributions(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path / "ranges.yaml",
        metric={"name": "all/exact_accuracy", "goal": "maximize"},
        parameters={
            "lr": {"min": 1e-5, "max": 1e-3, "log": True},
            "arch.hidden_size": {"min": 64, "max": 512, "step": 64},
            "arch.L_cycles": {"min": 2, "max": 8},
            "arch.H_cycles": {"min": 1, "max": 16, "log": True},
            "weight_decay": {"min": 0.0, "max": 1.0},
            "ema": {"values": [True, False]},
        },
        trials=5,
        base_overrides=["+experiment=tiny_cpu", "logger=wandb"],
    )
    sweep = wandb_sweep_dict(load_sweep_config(path), ["data_paths=[data/x]"])
    assert sweep["parameters"] == {
        "lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
        "arch.hidden_size": {"distribution": "q_uniform", "min": 64, "max": 512, "q": 64},
        "arch.L_cycles": {"distribution": "int_uniform", "min": 2, "max": 8},
        "arch.H_cycles": {"distribution": "q_log_uniform_values", "min": 1, "max": 16, "q": 1},
        "weight_decay": {"distribution": "uniform", "min": 0.0, "max": 1.0},
        "ema": {"values": [True, False]},
    }
    assert sweep["command"] == [
        "${env}", "${interpreter}", "${program}", "+experiment=tiny_cpu", "logger=wandb",
        "data_paths=[data/x]", "${args_no_hyphens}",
    ]  # fmt: skip
    assert "early_terminate" not in sweep


def test_a_trial_with_several_processes_runs_under_torchrun() -> None:
    command = trial_command("auto", 2, ["arch=trm"], python="py")
    assert command[:6] == ["py", "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2"]  # fmt: skip
    assert command[6:] == [str(REPO / "pretrain.py"), "arch=trm"]
    assert trial_command("auto", 1, [], python="py") == ["py", str(REPO / "pretrain.py")]
    assert trial_command("torchrun", 1, [], python="py")[1:3] == ["-m", "torch.distributed.run"]


def test_a_base_override_that_removes_the_logger_chooses_it() -> None:
    """``~logger`` in the base overrides is the user's choice: the sweep adds no logger=none."""
    assert trial_overrides(["~logger"], [], "t", Path("d"))[0] == "~logger"
    assert trial_overrides(["++logger=wandb"], [], "t", Path("d"))[0] == "++logger=wandb"
    assert trial_overrides(["lr=1"], [], "t", Path("d"))[:2] == ["logger=none", "lr=1"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"trails": 3}, "trails: unknown key"),
        ({"parameters": {"lr": {"valuez": [1e-4]}}}, "parameters.lr: give values: [...] or"),
        ({"parameters": {"lr": {"min": 0.1, "mx": 1}}}, "parameters.lr.mx: unknown key"),
        ({"parameters": {"lr": {"min": 1e-3, "max": 1e-4}}}, "min (0.001) must be below max"),
        ({"base_overrides": ["+run_name=x"]}, "base_overrides: '+run_name=x' is set by the sweep"),
        ({"enqueue": [{"lr": 5.0}]}, "enqueue.0.lr: 5.0 is outside the parameter"),
        ({"metric": {"name": "x", "goal": "maximise"}}, "metric.goal"),
        ({"launcher": "python", "nproc_per_node": 2}, "launcher: python runs one process"),
    ],
)
def test_a_mistake_in_the_sweep_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], named: str
) -> None:
    good: dict[str, Any] = {
        "metric": {"name": "all/lm_loss", "goal": "minimize"},
        "parameters": {"lr": {"values": [1e-4, 2e-4]}},
        "trials": 3,
    }
    path = write_sweep(tmp_path / "typo.yaml", **(good | fields))
    out = tmp_path / "sweep"
    assert main([str(path), "--backend", "optuna", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert named in err
    assert not out.exists()


def test_the_follower_reads_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    follower = MetricFollower(path, "all/lm_loss")
    assert follower.read() == []
    with path.open("w") as f:
        f.write('{"step": 1, "train/lm_loss": 3.0}\n{"step": 2, "all/lm_loss": 2.5}\n{"step": 4, ')
    assert follower.read() == [(2, 2.5)]
    with path.open("a") as f:
        f.write('"all/lm_loss": "NaN"}\n')
    [(step, value)] = follower.read()
    assert step == 4 and value != value
    assert follower.read() == []


def final_loss(run_dir: Path) -> float:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["all/lm_loss"] for m in lines if "all/lm_loss" in m][-1]


def evaluations(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["all/lm_loss"]) for m in lines if "all/lm_loss" in m]


def test_local_sweep_prunes_records_the_best_and_resumes(
    tmp_path: Path, arc_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna
    from optuna.trial import TrialState

    # lr = 0 leaves the model at its initialisation, so its first evaluation is worse than the
    # completed trial's at the same step (the median of one): the pruner must stop it there.
    # lr = 0.02 is ahead of 0.01 at both evaluations (measured: 1.980 and 1.907 against 2.010
    # and 1.911), so it is not stopped and is the best.
    path = write_sweep(
        tmp_path / "tiny.yaml",
        name="tiny",
        metric={"name": "all/lm_loss", "goal": "minimize"},
        parameters={"lr": {"values": [0.01, 0.0, 0.02]}},
        trials=3,
        launcher="python",
        kill_grace_s=10,
        base_overrides=TINY_TRIAL,
        pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        enqueue=[{"lr": 0.01}, {"lr": 0.0}, {"lr": 0.02}],
    )
    out = tmp_path / "sweep"
    args = [str(path), f"data_paths=[{arc_data}]", "--backend", "optuna", "--output-dir", str(out)]
    assert main([*args, "--trials", "2"]) == 0
    capsys.readouterr()
    records = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert [(r["number"], r["state"], r["params"]) for r in records] == [
        (0, "complete", {"lr": 0.01}),
        (1, "pruned", {"lr": 0.0}),
    ]
    first = evaluations(out / "trial_0000")
    pruned = evaluations(out / "trial_0001")
    assert len(first) == 2
    assert pruned[0][0] == first[0][0] and pruned[0][1] > first[0][1]
    assert records[1]["values"] == [list(pruned[0])]
    # Stopped by the sweep (SIGTERM: pretrain.py exits 128 + 15), before its second evaluation.
    assert records[1]["returncode"] == 143 and len(pruned) == 1

    # A second sweep in the same folder is refused; --resume continues the study to 3 trials.
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "best trial 2" in capsys.readouterr().out

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    losses = {n: final_loss(out / f"trial_{n:04d}") for n in (0, 2)}
    best_number = min(losses, key=losses.__getitem__)
    assert best_number == 2
    assert study.best_trial.number == 2 and study.best_value == losses[2]
    assert study.trials[1].intermediate_values == {pruned[0][0]: pruned[0][1]}
    best = json.loads((out / "best.json").read_text())
    assert best == {
        "number": 2,
        "params": {"lr": 0.02},
        "value": losses[2],
        "metric": "all/lm_loss",
        "goal": "minimize",
        "run_dir": str(out / "trial_0002"),
    }
    assert len((out / "trials.jsonl").read_text().splitlines()) == 3


def test_a_refused_trial_is_failed_and_the_sweep_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # hidden_size 16 does not split into 3 heads: pretrain.py would refuse the trial, so the
    # sweep records it as failed without launching it.
    path = write_sweep(
        tmp_path / "heads.yaml",
        metric={"name": "all/lm_loss", "goal": "minimize"},
        parameters={"arch.num_heads": {"values": [2, 3]}},
        trials=1,
        base_overrides=[*TINY_TRIAL, "data_paths=[data/none]"],
        enqueue=[{"arch.num_heads": 3}],
    )
    out = tmp_path / "sweep"
    assert main([str(path), "--backend", "optuna", "--output-dir", str(out)]) == 0
    assert "no trial completed" in capsys.readouterr().out
    [record] = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert record["state"] == "failed" and "num_heads" in record["reason"]
    assert not (out / "best.json").exists() and not (out / "trial_0000").exists()


@pytest.mark.slow
def test_a_failing_launch_is_recorded_with_its_log(
    tmp_path: Path, arc_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first trial's data folder does not exist (pretrain.py exits 2); the second, under
    # torchrun with one process, completes.
    path = write_sweep(
        tmp_path / "data.yaml",
        metric={"name": "all/lm_loss", "goal": "minimize"},
        parameters={"data_paths": {"values": [f"[{tmp_path / 'missing'}]", f"[{arc_data}]"]}},
        trials=2,
        launcher="torchrun",
        base_overrides=TINY_TRIAL,
        enqueue=[{"data_paths": f"[{tmp_path / 'missing'}]"}, {"data_paths": f"[{arc_data}]"}],
    )
    out = tmp_path / "sweep"
    assert main([str(path), "--backend", "optuna", "--output-dir", str(out)]) == 0
    records = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in records] == ["failed", "complete"]
    assert "exit code" in records[0]["reason"] and records[0]["log"] in records[0]["reason"]
    assert "missing" in Path(records[0]["log"]).read_text()
    assert json.loads((out / "best.json").read_text())["number"] == 1


def test_a_trial_left_running_is_failed_and_run_again_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna
    from optuna.trial import TrialState

    from sweeps.optuna_backend import distributions

    # Every trial is refused (3 heads for width 16), so nothing is launched.
    path = write_sweep(
        tmp_path / "heads.yaml",
        metric={"name": "all/lm_loss", "goal": "minimize"},
        parameters={"arch.num_heads": {"values": [2, 3]}},
        trials=1,
        base_overrides=TINY_TRIAL,
        enqueue=[{"arch.num_heads": 3}, {"arch.num_heads": 3}],
    )
    out = tmp_path / "sweep"
    args = [str(path), "--backend", "optuna", "--output-dir", str(out)]
    assert main(args) == 0
    # A sweep killed during a trial leaves it RUNNING in the study.
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="heads", storage=storage)
    left = study.ask(distributions(load_sweep_config(path)))
    assert main([*args, "--resume", "--trials", "2"]) == 0
    capsys.readouterr()
    trials = optuna.load_study(study_name="heads", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert trials[1].user_attrs["interrupted"] is True
    assert trials[2].params == left.params and "interrupted" not in trials[2].user_attrs
    records = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["number"] for r in records] == [0, 1, 2]
    assert records[1]["reason"] == "interrupted; parameters queued again"


def test_wandb_agent_arguments_reach_pretrains_config() -> None:
    """The agent expands the command with W&B's own ``args_no_hyphens``; the trial's argv
    composes to a config holding the sampled values."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from training.config import load_pretrain_config
    from utils.config import compose, lenient_overrides

    sweep = wandb_sweep_dict(load_sweep_config(REPO / "config" / "sweep" / "jd_fork.yaml"))
    sampled = {"arch.H_cycles": 3, "arch.L_cycles": 4, "data_paths": "[data/arc2eval-aug-400]",
               "lr": 0.0002, "arch.halt_max_steps": 16}  # fmt: skip
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in sampled.items()}})
    expand = {"${args_no_hyphens}": args["args_no_hyphens"]}
    argv = [a for c in sweep["command"] for a in expand.get(c, [c])]
    overrides = argv[argv.index("${program}") + 1 :]
    config = load_pretrain_config(compose(overrides=lenient_overrides(overrides)))
    assert (config.arch.H_cycles, config.arch.L_cycles, config.arch.halt_max_steps) == (3, 4, 16)
    assert config.data_paths == ["data/arc2eval-aug-400"] and config.lr == 2e-4
    assert config.epochs == 4000 and config.eval_interval == 200


class FakeWandb:
    """The three calls the W&B backend makes, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def sweep(self, sweep: dict[str, Any], project: str) -> str:
        self.calls.append(("sweep", (sweep["name"], sweep["run_cap"], project)))
        return "abc123"

    def Api(self) -> Any:
        return type("Api", (), {"default_entity": "me"})()

    def agent(self, sweep_id: str, project: str, entity: str, count: int) -> None:
        self.calls.append(("agent", (sweep_id, project, entity, count)))


@pytest.mark.parametrize("create_only", [True, False])
def test_wandb_backend_creates_the_sweep_and_runs_the_agent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], create_only: bool
) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    argv = ["jd_fork", "--trials", "4", *(["--create-only"] if create_only else [])]
    assert main(argv) == 0
    assert fake.calls[0] == ("sweep", ("jd_fork", 4, "jd_fork"))
    agent = [("agent", ("abc123", "jd_fork", "me", 4))]
    assert fake.calls[1:] == ([] if create_only else agent)
    assert "wandb agent --count 4 me/jd_fork/abc123" in capsys.readouterr().out


def test_the_default_backend_follows_the_wandb_account(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sweeps.cli import choose_backend

    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    assert choose_backend("auto") == "optuna"
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert choose_backend("auto") == "wandb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert choose_backend("auto") == "optuna"
    assert choose_backend("wandb") == "wandb"


def test_resuming_a_sweep_that_is_not_there_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = REPO / "config" / "sweep" / "trm_seeds.yaml"
    out = tmp_path / "nothing"
    assert main([str(path), "--backend", "optuna", "--output-dir", str(out), "--resume"]) == 2
    assert "study.db does not exist" in capsys.readouterr().err and not out.exists()
