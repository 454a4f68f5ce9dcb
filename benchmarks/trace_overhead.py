"""The trace's cost against plain evaluation, on the same checkpoint and data.

    python -m benchmarks.trace_overhead --checkpoint checkpoints/run/step_1000
    python -m benchmarks.trace_overhead --checkpoint CKPT --data-path data/x --rounds 5

Each round runs ``evaluate.py``'s ``run`` (the ARC evaluator, no saved outputs) and
``tracing.trace.run_trace`` with every augmentation (the rows evaluation sees), once without
and once with the L-step probes, in an order that reverses every round; both resolve the
checkpoint, build the loader and the model and roll out every test batch, so the difference
is what tracing adds: all ``halt_max_steps`` steps recorded for every row, the host copies of
each H-cycle's decode, the per-step voting, the records and the files. Medians over
``--rounds`` give ``trace_vs_eval_time`` and ``probes_vs_eval_time``. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from evaluate import run as run_evaluate
from tracing.config import TraceConfig
from tracing.trace import run_trace
from training.config import EvaluateConfig
from utils.distributed import DistInfo, init_distributed


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(
    checkpoint: str,
    data_paths: list[str] | None,
    rounds: int,
    device: str = "auto",
    dist_info: DistInfo | None = None,
) -> dict[str, Any]:
    """Median seconds of plain evaluation, the trace and the trace with probes (``rounds``
    rounds, alternating order), and their ratios."""
    info = dist_info or init_distributed(device)
    with tempfile.TemporaryDirectory() as tmp:
        ecfg = EvaluateConfig(
            checkpoint=checkpoint,
            data_paths=data_paths,
            evaluators=[{"name": "arc"}],
            output_dir=str(Path(tmp) / "eval"),
            device=device,
        )
        modes: dict[str, Callable[[], Any]] = {
            "eval": lambda: run_evaluate(ecfg, info),
            "trace": lambda: run_trace(
                ecfg, TraceConfig(aug="all", out=str(Path(tmp) / "trace")), info
            ),
            "trace_probes": lambda: run_trace(
                ecfg,
                TraceConfig(aug="all", probe_l_steps=True, out=str(Path(tmp) / "probes")),
                info,
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in modes}
        for r in range(rounds):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for name in order:
                times[name].append(_timed(modes[name], info.device))
        index = json.loads((Path(tmp) / "trace" / "index.json").read_text())
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "benchmark": "trace_overhead",
        "checkpoint": checkpoint,
        "device": str(info.device),
        "rounds": rounds,
        "records": len(index["records"]),
        "halt_max_steps": index["halt_max_steps"],
        "eval_s": round(median["eval"], 4),
        "trace_s": round(median["trace"], 4),
        "trace_probes_s": round(median["trace_probes"], 4),
        "trace_vs_eval_time": round(median["trace"] / median["eval"], 4),
        "probes_vs_eval_time": round(median["trace_probes"] / median["eval"], 4),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a step_N folder (or upstream file)")
    parser.add_argument("--data-path", action="append", help="evaluation data (default: the run's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    result = measure(args.checkpoint, args.data_path, args.rounds, args.device)
    for key, value in result.items():
        if key != "benchmark":
            print(f"{key}: {value}", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
