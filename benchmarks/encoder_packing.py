"""Packed demonstration encoding against ETRM's padded all-slots encoding, forward + backward.

    python -m benchmarks.encoder_packing              # tiny config, CPU
    python -m benchmarks.encoder_packing --preset arc # ARC scale (GPU, bf16)
    python -m benchmarks.encoder_packing --encoders standard,lpn_standard,hybrid_variational

ETRM runs its grid encoder on all K = 10 demo slots of every item, empty ones included; ours
gathers the valid (row, slot) pairs and encodes only those (``DemoEncoder.pack_demos``, see
``models.encoders.base``). For each encoder of ``--encoders`` (default ``standard`` and the
LPN-family ``lpn_standard``), built at the preset's width and heads with the decoder's default
depth (``arch.encoder_num_layers``), one module is timed both ways on the same batches: the
whole encoder's forward (context [B, T, D]) and backward from a scalar loss on the context,
``pack_demos`` switched between the two. The batches are drawn like ETRM's ARC-AGI-1 training
split (1..10 demos of 10 slots, mean 3.07; ``benchmarks.etrm_step.ARC_TRAIN_DEMO_COUNTS``).
After ``--warmup`` untimed passes, ``--rounds`` rounds time ``--steps`` passes of each mode in an
order that reverses every round; the medians give ``padded_vs_packed_time`` (the goal: ≥ 2).

In the same run the two modes are compared on one batch: the largest absolute difference of
the contexts in evaluation mode, and that of the parameter gradients relative to the largest
gradient entry (both 0 up to rounding: packing changes which rows reach the grid encoder, not
what any valid row computes). Memory: the activations saved for the backward
(``benchmarks.etrm_step.SavedTensorMeter``), and on CUDA the pass's peak allocation above what
was allocated before it. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from benchmarks.etrm_step import (
    ARC_TRAIN_DEMO_COUNTS,
    POOL,
    VOCAB,
    SavedTensorMeter,
    alternating,
    demo_batches,
    forward_dtype,
    mean_demos,
    parse_timing_args,
    preset_overrides,
    ratio,
    rounded,
    sync,
    timing_parser,
    typical,
)
from models.encoders.base import DemoEncoder, build_encoder
from training.config import load_pretrain_config
from utils.config import compose
from utils.distributed import select_device

MODES = ("packed", "padded")
GOAL = 2.0  # padded / packed time at ARC's demo counts


def encoder_pass(encoder: DemoEncoder, batch: dict[str, torch.Tensor]) -> None:
    """Forward and backward of the encoder on ``batch``'s demos; the gradients are dropped."""
    out = encoder(batch["demo_inputs"], batch["demo_labels"], batch["demo_mask"])
    out.context.float().square().mean().backward()
    encoder.zero_grad(set_to_none=True)


def agreement(encoder: DemoEncoder, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Packed against padded on ``batch``: max |Δ context| (eval mode, no gradient) and
    max |Δ grad| / max |grad| over the parameters (train mode, the same loss as timed)."""
    demos = (batch["demo_inputs"], batch["demo_labels"], batch["demo_mask"])
    contexts, grads = {}, {}
    was_training = encoder.training
    for mode in MODES:
        encoder.pack_demos = mode == "packed"
        encoder.eval()
        with torch.no_grad():
            contexts[mode] = encoder(*demos).context.float()
        encoder.train()
        torch.manual_seed(0)  # a variational encoder draws the same noise in both modes
        encoder(*demos).context.float().square().mean().backward()
        grads[mode] = [p.grad.float().clone() for p in encoder.parameters() if p.grad is not None]
        encoder.zero_grad(set_to_none=True)
    encoder.train(was_training)
    scale = max(g.abs().max().item() for g in grads["padded"])
    grad_diff = max(
        (a - b).abs().max().item() for a, b in zip(grads["packed"], grads["padded"], strict=True)
    )
    return {
        "context_max_abs_diff": (contexts["packed"] - contexts["padded"]).abs().max().item(),
        "context_max_abs": contexts["padded"].abs().max().item(),
        "grad_max_rel_diff": grad_diff / scale if scale > 0 else grad_diff,
    }


def bench_encoder(
    name: str, args: argparse.Namespace, device: torch.device, batches: list[dict]
) -> dict[str, Any]:
    """Time, memory and agreement of encoder ``name`` packed and padded."""
    overrides = ["arch=etrm", *preset_overrides(args.preset, device, args.dtype),
                 f"arch.encoder_type={name}", *args.overrides]  # fmt: skip
    arch = load_pretrain_config(compose(overrides=overrides)).arch
    torch.manual_seed(0)
    with torch.device(device):
        encoder = build_encoder(arch.encoder_config(VOCAB, args.seq_len))
    encoder.train()
    for mode in MODES:
        encoder.pack_demos = mode == "packed"
        for i in range(args.warmup):
            encoder_pass(encoder, batches[i % len(batches)])

    saved, typical_batch = {}, batches[typical(batches)]
    demos = (typical_batch["demo_inputs"], typical_batch["demo_labels"], typical_batch["demo_mask"])
    for mode in MODES:
        encoder.pack_demos = mode == "packed"
        meter = SavedTensorMeter([*encoder.parameters(), *encoder.buffers()])
        with meter.measure():
            out = encoder(*demos)
        out.context.float().square().mean().backward()
        encoder.zero_grad(set_to_none=True)
        saved[mode] = meter.mib

    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    peak: dict[str, float] = {}
    for r in range(args.rounds):
        for mode in alternating(list(MODES), r):
            encoder.pack_demos = mode == "packed"
            sync(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for i in range(args.steps):  # both modes see the same batches in a round
                encoder_pass(encoder, batches[(r * args.steps + i) % len(batches)])
            sync(device)
            seconds[mode].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                pass_peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                peak[mode] = max(peak.get(mode, 0.0), pass_peak)
        print(f"{name} round {r + 1}/{args.rounds}: " + "  ".join(
            f"{m} {seconds[m][-1] * 1e3:8.1f} ms" for m in MODES), flush=True)  # fmt: skip

    median = {mode: statistics.median(seconds[mode]) for mode in MODES}
    speedup = ratio(median["padded"], median["packed"])
    return {
        "num_params": sum(p.numel() for p in encoder.parameters()),
        "packed_s_per_pass": round(median["packed"], 5),
        "padded_s_per_pass": round(median["padded"], 5),
        "padded_vs_packed_time": speedup,
        "goal_met": None if speedup is None else speedup >= GOAL,
        "packed_saved_activation_mib": round(saved["packed"], 2),
        "padded_saved_activation_mib": round(saved["padded"], 2),
        "padded_vs_packed_saved_activations": ratio(saved["padded"], saved["packed"]),
        "packed_peak_mib": rounded(peak.get("packed"), 1),
        "padded_peak_mib": rounded(peak.get("padded"), 1),
        **{k: float(f"{v:.3g}") for k, v in agreement(encoder, typical_batch).items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = timing_parser(__doc__.split("\n\n")[0], "pass")
    p.add_argument("--encoders", default="standard,lpn_standard", help="comma-separated")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch.encoder_num_layers=4")
    args = parse_timing_args(p, argv)

    device = select_device(args.device)
    K = args.max_demos
    batches = demo_batches(POOL, args.batch_size, K, ARC_TRAIN_DEMO_COUNTS, device, args.seq_len)
    result: dict[str, Any] = {
        "preset": args.preset,
        "device": str(device),
        "dtype": forward_dtype(args.preset, device, args.dtype),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "max_demos": K,
        "mean_demos": mean_demos(batches),
        "valid_slot_fraction": round(mean_demos(batches) / K, 3),
        "typical_batch_mean_demos": mean_demos([batches[typical(batches)]]),
        "rounds": args.rounds,
        "steps": args.steps,
        "goal_padded_vs_packed_at_least": GOAL,
        "encoders": {},
    }
    for name in [n.strip() for n in args.encoders.split(",") if n.strip()]:
        result["encoders"][name] = bench_encoder(name, args, device, batches)

    print(f"\n{'encoder':14s} {'packed ms':>9s} {'padded ms':>9s} {'x':>6s} {'mem x':>6s} "
          f"{'|Δctx|':>9s} {'Δgrad rel':>9s}")  # fmt: skip
    for name, e in result["encoders"].items():
        print(f"{name:14s} {e['packed_s_per_pass'] * 1e3:9.1f} {e['padded_s_per_pass'] * 1e3:9.1f} "
              f"{e['padded_vs_packed_time']:6.2f} {e['padded_vs_packed_saved_activations']:6.2f} "
              f"{e['context_max_abs_diff']:9.2e} {e['grad_max_rel_diff']:9.2e}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
