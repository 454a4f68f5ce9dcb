"""``make quickstart``: its Makefile variables and experiment, the time estimate's counts and
the closing summary. The quick start itself (minutes of training) is not run here."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest

import quickstart
from training.config import PretrainConfig, load_pretrain_config
from utils.config import compose, lenient_overrides

ROOT = Path(__file__).resolve().parent.parent


def makefile_var(name: str) -> str:
    """The value of a ``NAME := value`` line of the Makefile, continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s*:=\s*(.*)$", text, re.MULTILINE)
    assert match, f"no {name} := ... in the Makefile"
    return " ".join(match.group(1).split())


def load(*overrides: str) -> PretrainConfig:
    return load_pretrain_config(compose(overrides=lenient_overrides(list(overrides))))


def test_the_makefile_trains_the_quickstart_experiment_on_the_data_it_builds() -> None:
    from dataset.build_arc_dataset import parse_args

    data = makefile_var("QUICK_DATA")
    args = shlex.split(makefile_var("QUICK_ARGS").replace("$(QUICK_DATA)", data))
    args = [a.replace("$(QUICK_RUN)", makefile_var("QUICK_RUN")) for a in args]
    assert "+experiment=quickstart" in args
    c = load(*args)
    assert c.data_paths == [data] == load("+experiment=quickstart").data_paths
    assert c.checkpoint_path == makefile_var("QUICK_RUN")
    assert [e.name for e in c.evaluators] == ["arc"] and c.logger == "none" and c.deterministic
    # The build's flags exist (an unknown one would fail only in `make`), TRM protocol.
    build = parse_args([*shlex.split(makefile_var("QUICK_BUILD")), "--output-dir", data])
    assert build.split_policy == "trm" and build.test_set_names[0] in build.subsets


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(3, "about 5 s"), (61, "about 60 s"), (100, "about 1.5 min"), (200, "about 3.5 min"),
     (250, "about 4 min"), (1000, "about 17 min")],
)  # fmt: skip
def test_format_minutes(seconds: float, text: str) -> None:
    assert quickstart.format_minutes(seconds) == text


def test_count_run_follows_the_loop() -> None:
    runs = quickstart.RunCounts
    c = load("+experiment=tiny_cpu", "epochs=4", "eval_interval=1")
    assert quickstart.count_run(c, [3, 4, 3, 4], 2, 100) == runs(14, 4, 2)
    # Batches past the lr schedule's length are skipped; min_eval_interval delays evaluations,
    # but the last iteration is always evaluated.
    c = load("+experiment=tiny_cpu", "epochs=4", "eval_interval=1", "min_eval_interval=3")
    assert quickstart.count_run(c, [3, 4, 3, 4], 2, 12) == runs(12, 1, 2)
    # max_steps ends the run in the iteration that reaches it, and that one is evaluated.
    c = load("+experiment=tiny_cpu", "epochs=4", "eval_interval=1", "max_steps=5")
    assert quickstart.count_run(c, [3, 4, 3, 4], 2, 100) == runs(5, 2, 2)
    assert quickstart.count_run(c, [3, 4, 3, 4], 0, 100).evaluations == 0


TINY = [
    "+experiment=tiny_cpu",
    "logger=none",
    "data_workers=0",
    "global_batch_size=4",
    "arch.hidden_size=16",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "arch.halt_max_steps=2",
    "epochs=2",
    "eval_interval=1",
]


def test_the_estimate_counts_what_the_run_then_does(arc_data: Path, tmp_path: Path) -> None:
    from training.loop import default_evaluators, run_training
    from utils.distributed import DistInfo
    from utils.logging import build_logger

    run_dir = tmp_path / "run"
    config = load(*TINY, f"data_paths=[{arc_data}]", f"+checkpoint_path={run_dir}")
    est = quickstart.measure(config, started=time.perf_counter())
    assert est.step_s > 0 and est.eval_batch_s > 0 and 0 < est.setup_s < est.total_s
    assert not run_dir.exists()  # the estimate writes nothing

    logger = build_logger(
        "none", project="q", run_name="q", config={}, run_dir=str(run_dir), is_main=True
    )
    outcome = run_training(
        config, DistInfo(), logger=logger, evaluators_factory=default_evaluators(config)
    )
    rows = quickstart.last_run(run_dir / "metrics.jsonl")
    trained = [r for r in rows if "train/lm_loss" in r]
    evals = [r for r in rows if "ARC/pass@2" in r]
    assert est.counts.train_steps == outcome.steps == len(trained) > 0
    assert est.counts.evaluations == len(evals) == config.iterations == 2

    summary = quickstart.summarize(rows)
    assert summary["eval ARC/pass@2"] == evals[-1]["ARC/pass@2"]
    assert 0 <= summary["train/exact_accuracy (last 10%)"] <= 1


def write_rows(path: Path, rows: list[dict[str, float]]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_the_summary_reads_the_last_run_of_the_metrics_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    model = {"step": 0, "model/num_params": 1.0}
    first = [model, {"step": 1, "train/count": 1.0, "train/exact_accuracy": 1.0},
             {"step": 1, "ARC/pass@2": 1.0}]  # fmt: skip
    steps = [{"step": s, "train/count": float(s % 2), "train/exact_accuracy": s / 20}
             for s in range(1, 21)]  # fmt: skip
    final = {"step": 20, "ARC/pass@2": 0.25, "ARC/pass@1": 0.125, "ARC/tasks_total": 4.0}
    write_rows(path, first)
    write_rows(path, [model, *steps, final])
    summary = quickstart.summarize(quickstart.last_run(path))
    # Steps where no slot halted (count 0) say nothing: 10 logged steps, the first and the last.
    assert summary["train/exact_accuracy (first 10%)"] == pytest.approx(0.05)
    assert summary["train/exact_accuracy (last 10%)"] == pytest.approx(0.95)
    assert (summary["eval ARC/pass@2"], summary["eval ARC/pass@1"]) == (0.25, 0.125)
    assert summary["eval ARC tasks"] == 4


def test_the_next_steps_are_valid_commands(tmp_path: Path) -> None:
    args = ["+experiment=quickstart", "+run_name=quickstart", f"+checkpoint_path={tmp_path}"]
    config = load(*args)
    text = quickstart.next_steps(config, args)
    commands = [shlex.split(line) for line in text.splitlines() if "pretrain.py" in line]
    assert len(commands) == 3
    for command in commands:
        load(*command[command.index("pretrain.py") + 1 :])  # each validates as printed
    resume = next(c for c in commands if "resume=auto" in c)
    longer = load(*resume[resume.index("pretrain.py") + 1 :])
    assert (longer.epochs, longer.checkpoint_path) == (2 * config.epochs, str(tmp_path))


def test_quickstart_imports_only_dataset_training_and_utils() -> None:
    import ast

    first_party = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    tree = ast.parse((ROOT / "quickstart.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}  # fmt: skip
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}  # fmt: skip
    assert imported & first_party <= {"dataset", "training", "utils"}
    assert "training" in imported & first_party
