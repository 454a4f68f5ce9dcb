"""Forward + backward time of one ACT supervision step, eager against torch.compile.

    python -m benchmarks.model_step                                   # tiny config, CPU
    python -m benchmarks.model_step --preset arc --dtype bfloat16 --batch-size 192 --compile

``--preset tiny`` is ``+experiment=tiny_cpu`` on a 30×30 grid; ``--preset arc`` is the paper's
ARC recipe (hidden 512, 2 layers, H_cycles 3, L_cycles 4, seq 900 + 16 prefix, vocab 12). Extra
Hydra overrides go after ``--``. Eager mode is the baseline; with ``--compile`` the same steps
run through ``torch.compile`` and the ratio is reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.recursive_reasoning.common import ModelDims
from models.registry import build_loss_head, describe_model
from training.config import load_pretrain_config
from utils.config import compose
from utils.distributed import select_device

PRESETS = {
    "tiny": ["+experiment=tiny_cpu"],
    "arc": ["+experiment=arc1"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    head: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, warmup: int
) -> float:
    """Seconds per forward+backward of one supervision step (carry kept across steps)."""
    device = batch["inputs"].device
    carry = head.initial_carry(batch)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        out = head(carry=carry, batch=batch)
        out.total().backward()
        carry = out.new_carry
        head.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--arch", default="trm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch.hidden_size=256")
    args = p.parse_args()

    overrides = [f"arch={args.arch}", *PRESETS[args.preset], *args.overrides]
    if args.dtype:
        overrides.append(f"arch.forward_dtype={args.dtype}")
    config = load_pretrain_config(compose(overrides=overrides)).arch
    device = select_device(args.device)
    seq_len, vocab = 900, 12
    dims = ModelDims(args.batch_size, seq_len, vocab, num_puzzle_identifiers=16)
    torch.manual_seed(0)
    with torch.device(device):
        head = build_loss_head(config, dims)
    head.train()
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(0, vocab, (args.batch_size, seq_len), generator=g),
        "labels": torch.randint(0, vocab, (args.batch_size, seq_len), generator=g),
        "puzzle_identifiers": torch.randint(1, 16, (args.batch_size,), generator=g),
    }
    batch = {k: v.to(device=device, dtype=torch.int32) for k, v in batch.items()}

    tokens = args.batch_size * seq_len
    result: dict[str, object] = {
        "arch": args.arch,
        "preset": args.preset,
        "device": str(device),
        "dtype": config.forward_dtype,
        "batch_size": args.batch_size,
        **describe_model(head),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eager = time_steps(head, batch, args.steps, args.warmup)
    result.update(eager_s_per_step=round(eager, 5), eager_tokens_per_s=round(tokens / eager))
    print(f"eager:    {eager * 1e3:9.2f} ms/step  {tokens / eager:12.0f} tokens/s", flush=True)
    if device.type == "cuda":
        result["eager_peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if args.compile:
        compiled = torch.compile(head)
        t = time_steps(compiled, batch, args.steps, args.warmup)
        result.update(
            compiled_s_per_step=round(t, 5),
            compiled_tokens_per_s=round(tokens / t),
            compile_speedup=round(eager / t, 3),
        )
        print(f"compiled: {t * 1e3:9.2f} ms/step  {tokens / t:12.0f} tokens/s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
