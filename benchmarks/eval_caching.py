"""ETRM evaluation with the context computed once per item against re-encoding at every step.

    python -m benchmarks.eval_caching                 # tiny config, CPU
    python -m benchmarks.eval_caching --preset arc    # ARC scale (GPU, bf16)
    python -m benchmarks.eval_caching --encoder lpn_standard

At evaluation every item runs all ``halt_max_steps`` (16) ACT steps. ETRM re-encoded the
item's demonstrations at each of them; ours, for an encoder that is deterministic in
evaluation mode, encodes each item when it starts and reuses the context from the carry
(``arch.eval_context=cached``, ``TRMWithEncoder.caches_context``, ``models.etrm.model``). The
baseline is the same weights built with ``arch.eval_context=reencode``: every step takes the
model's uncached path, ETRM's evaluation through the same code.

One ``arch=etrm`` model (seed 0, evaluation mode) per mode, the second a copy of the first's
weights, is rolled out as evaluation does
(``training.rollout.rollout`` under ``torch.inference_mode``, the ARC evaluator's outputs
requested) on batches whose demo counts are drawn like ETRM's ARC-AGI-1 evaluation split (2..7
demos of 10 slots, mean 3.42; ``benchmarks.etrm_step.ARC_TEST_DEMO_COUNTS``). After
``--warmup`` untimed rollouts per mode, ``--rounds`` rounds time ``--steps`` rollouts of each
in an order that reverses every round; the medians give ``reencode_vs_cached_time``. A forward
hook counts the encoder's calls per rollout (1 against 16). In the same run both modes roll out
one batch once more, and their predictions at every step are compared: the share of equal
tokens, the largest absolute difference of the logits and of the halting logits (0 expected:
the cached context is the one the encoder computed at the item's first step). On CUDA the
rollout's peak allocation above what was allocated before it is reported. The last line
printed is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks.etrm_step import (
    ARC_TEST_DEMO_COUNTS,
    POOL,
    PUZZLES,
    VOCAB,
    alternating,
    demo_batches,
    mean_demos,
    parse_timing_args,
    preset_overrides,
    ratio,
    rounded,
    sync,
    timing_parser,
    typical,
)
from models.etrm.family import encoder_of
from models.etrm.model import TRMWithEncoder
from models.family import family_of
from models.recursive_reasoning.common import ModelDims
from training.config import load_pretrain_config
from training.rollout import rollout
from utils.config import compose
from utils.distributed import select_device

MODES = ("cached", "reencode")
RETURN_KEYS = ("q_halt_logits",)  # what the ARC evaluator asks for, besides preds


def run_rollout(head: nn.Module, batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> list:
    """Every step's outputs of one rollout of ``batch`` (``LossOutput.outputs`` dicts)."""
    with torch.inference_mode():
        return [step.out.outputs for step in rollout(head, batch, keys)]


def agreement(steps: dict[str, list[dict[str, torch.Tensor]]]) -> dict[str, Any]:
    """Cached against re-encoded outputs over all steps of one rollout."""
    cached, fresh = steps["cached"], steps["reencode"]
    pairs = list(zip(cached, fresh, strict=True))  # both run all halt_max_steps steps
    equal = sum((a["preds"] == b["preds"]).sum().item() for a, b in pairs)
    total = sum(a["preds"].numel() for a in cached)

    def max_diff(key: str) -> float:
        return max((a[key].float() - b[key].float()).abs().max().item() for a, b in pairs)

    return {
        "rollout_steps": len(pairs),
        "preds_equal": equal == total,
        "preds_equal_fraction": equal / total,
        "logits_max_abs_diff": float(f"{max_diff('logits'):.3g}"),
        "q_halt_logits_max_abs_diff": float(f"{max_diff('q_halt_logits'):.3g}"),
    }


def main(argv: list[str] | None = None) -> None:
    p = timing_parser(__doc__.split("\n\n")[0], "rollout")
    p.add_argument("--encoder", default="standard", help="arch.encoder_type (deterministic)")
    p.add_argument("--act-steps", type=int, default=16, help="arch.halt_max_steps")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch.L_cycles=6")
    args = parse_timing_args(p, argv)

    device = select_device(args.device)
    overrides = ["arch=etrm", *preset_overrides(args.preset, device, args.dtype),
                 f"arch.encoder_type={args.encoder}", f"arch.halt_max_steps={args.act_steps}",
                 *args.overrides]  # fmt: skip
    dims = ModelDims(args.batch_size, args.seq_len, VOCAB, num_puzzle_identifiers=PUZZLES)
    heads: dict[str, nn.Module] = {}
    for name in MODES:
        config = compose(overrides=[*overrides, f"arch.eval_context={name}"])
        arch = load_pretrain_config(config).arch
        torch.manual_seed(0)
        with torch.device(device):
            heads[name] = family_of(arch).build(arch, dims)
        heads[name].load_state_dict(heads[MODES[0]].state_dict())
        heads[name].eval()
    model = heads["cached"].model
    if not isinstance(model, TRMWithEncoder) or not model.caches_context():
        raise SystemExit(
            f"encoder '{args.encoder}' is not deterministic at evaluation, so its context is "
            "never cached; choose a deterministic one (standard, lpn_standard, ...)"
        )
    calls = {"n": 0}
    for head in heads.values():
        encoder_of(head).register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    K, table = args.max_demos, ARC_TEST_DEMO_COUNTS
    batches = demo_batches(POOL, args.batch_size, K, table, device, args.seq_len)
    batches = [{k: b[k] for k in family_of(arch).batch_fields} for b in batches]

    encoder_calls: dict[str, int] = {}
    for name in MODES:
        for i in range(args.warmup):
            calls["n"] = 0
            run_rollout(heads[name], batches[i % len(batches)], RETURN_KEYS)
            encoder_calls[name] = calls["n"]

    seconds: dict[str, list[float]] = {name: [] for name in MODES}
    peak: dict[str, float] = {}
    for r in range(args.rounds):
        for name in alternating(list(MODES), r):
            sync(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for i in range(args.steps):  # both modes see the same batches in a round
                calls["n"] = 0
                batch = batches[(r * args.steps + i) % len(batches)]
                run_rollout(heads[name], batch, RETURN_KEYS)
                encoder_calls[name] = calls["n"]
            sync(device)
            seconds[name].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                rollout_peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                peak[name] = max(peak.get(name, 0.0), rollout_peak)
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{m} {seconds[m][-1] * 1e3:8.1f} ms/rollout" for m in MODES), flush=True)  # fmt: skip

    keys = ("logits", *RETURN_KEYS)
    outputs = {name: run_rollout(heads[name], batches[typical(batches)], keys) for name in MODES}
    median = {name: statistics.median(seconds[name]) for name in MODES}
    result: dict[str, Any] = {
        "preset": args.preset,
        "device": str(device),
        "dtype": arch.forward_dtype,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "max_demos": K,
        "mean_demos": mean_demos(batches),
        "encoder": args.encoder,
        "act_steps": args.act_steps,
        "rounds": args.rounds,
        "steps": args.steps,
        "cached_s_per_rollout": round(median["cached"], 5),
        "reencode_s_per_rollout": round(median["reencode"], 5),
        "reencode_vs_cached_time": ratio(median["reencode"], median["cached"]),
        "encoder_calls_per_rollout": encoder_calls,
        "cached_peak_mib": rounded(peak.get("cached"), 1),
        "reencode_peak_mib": rounded(peak.get("reencode"), 1),
        **agreement(outputs),
    }
    print(f"\ncached   {median['cached'] * 1e3:9.1f} ms/rollout, "
          f"{encoder_calls['cached']} encoder call(s)")  # fmt: skip
    print(f"reencode {median['reencode'] * 1e3:9.1f} ms/rollout, "
          f"{encoder_calls['reencode']} encoder call(s)")  # fmt: skip
    print(
        f"reencode / cached = {result['reencode_vs_cached_time']}; predictions equal: "
        f"{result['preds_equal']} (|Δlogits| ≤ {result['logits_max_abs_diff']})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
