"""Training-step cost of ETRM and ETRM-FCT against a TRM step with the same decoder.

    python -m benchmarks.etrm_step                    # tiny config, CPU
    python -m benchmarks.etrm_step --preset arc       # ARC scale (GPU, bf16)
    python -m benchmarks.etrm_step --encoder lpn_standard --fct-steps 8

Three training states run in one process on batches of the same queries: ``arch=trm`` (puzzle
embedding), ``arch=etrm`` (the demonstration encoder, re-encoded with gradient at every step,
TRM's halting) and ``arch=etrm_fct`` (``--fct-steps`` N optimizer steps per batch). Their
decoders are the same (the preset's width, heads, layers, H/L cycles and 16 prefix tokens).
A step is what the loop does: ``training.step.train_batch`` (the step strategy's forward and
backward, the gradient norm, the optimizers, the EMA), called once per batch for TRM and ETRM
and N times on the same batch for ETRM-FCT, as ``training.loop`` does; the states are built
from the family's model, optimizer groups and strategy as ``training.state.create_train_state``
builds them, without a dataset. The model runs eager (no ``torch.compile``).

The demonstration fields are drawn like ETRM's ARC-AGI-1 training split (``max_demos`` K = 10
slots, 1..10 valid demos per item, mean 3.07: ``ARC_TRAIN_DEMO_COUNTS``), with random tokens;
each row's count is a stratified draw, so that a small batch keeps the split's mean. Every
configuration first takes ``--warmup`` untimed batches; then ``--rounds`` rounds time
``--steps`` batches of each, in an order that reverses every round, and the median over rounds
of the seconds per batch (per optimizer step for FCT: the batch over N) is reported.

Memory: the bytes of the activations autograd saves for the backward of one optimizer step
(``SavedTensorMeter``: unique storages, parameters excluded; one extra untimed step, on any
device; an ETRM row keeps its item, demos included, until it halts, so its step encodes the
carry's items), and on CUDA the step's peak allocation above what was allocated before it
(``torch.cuda.max_memory_allocated``; the three states stay resident, so only the increase is
the step's). Ratios are ETRM (or FCT) over TRM. The last line printed is one JSON object.

The ARC demo-count tables, the batch builder, the meter and the presets are shared with
``benchmarks.encoder_packing`` and ``benchmarks.eval_caching``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from models.ema import EMAHelper
from models.family import family_of
from models.recursive_reasoning.common import ModelDims
from models.registry import describe_model
from training.config import PretrainConfig, load_pretrain_config
from training.optimizers import build_optimizers
from training.state import TrainState
from training.step import train_batch
from training.strategies import build_strategy
from utils.config import compose
from utils.distributed import DistInfo, select_device

SEQ_LEN, VOCAB, PUZZLES = 900, 12, 1024
POOL = 4  # distinct batches each configuration cycles through
# Demo pairs per item in ETRM's ARC-AGI-1 build (its docs/dataset.md): training puzzles have
# 1..10 (mean 3.07), evaluation puzzles 2..7 (mean 3.42). The shapes of the distributions
# (most items have 2-4) are ours; the ranges and means are the build's.
ARC_TRAIN_DEMO_COUNTS = {1: 0.03, 2: 0.38, 3: 0.29, 4: 0.19, 5: 0.06, 6: 0.025, 7: 0.01,
                         8: 0.008, 9: 0.004, 10: 0.003}  # fmt: skip
ARC_TEST_DEMO_COUNTS = {2: 0.22, 3: 0.32, 4: 0.33, 5: 0.09, 6: 0.03, 7: 0.01}
# ARC scale: the paper's decoder (hidden 512, 8 heads, 2 layers, H_cycles 3, L_cycles 4 as the
# ARC recipe, 16 ACT steps); the encoder takes the decoder's width and heads.
ARC_ARCH = ["arch.hidden_size=512", "arch.num_heads=8", "arch.expansion=4", "arch.L_layers=2",
            "arch.H_cycles=3", "arch.L_cycles=4", "arch.halt_max_steps=16"]  # fmt: skip
PRESETS = {"tiny": ["+experiment=tiny_cpu"], "arc": ARC_ARCH}
# Rows per batch unless --batch-size says otherwise: ARC's is ETRM's per-GPU batch (384 over 4).
DEFAULT_BATCH = {"tiny": 4, "arc": 96}
ARCHS = ("trm", "etrm", "etrm_fct")
DECODER_KEYS = ("hidden_size", "num_heads", "expansion", "L_layers", "H_cycles", "L_cycles",
                "puzzle_emb_len", "forward_dtype")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Shared with the other ETRM benchmarks
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_dtype(preset: str, device: torch.device, dtype: str | None) -> str:
    """``dtype`` when given, else bfloat16 for ``arc`` on CUDA and float32 otherwise."""
    if dtype is not None:
        return dtype
    return "bfloat16" if preset == "arc" and device.type == "cuda" else "float32"


def preset_overrides(preset: str, device: torch.device, dtype: str | None) -> list[str]:
    """Hydra overrides of ``preset`` with activations in ``forward_dtype(...)``."""
    return [*PRESETS[preset], f"arch.forward_dtype={forward_dtype(preset, device, dtype)}"]


def demo_counts(table: dict[int, float], n: int, max_demos: int) -> torch.Tensor:
    """int64 [n] ascending demo counts, a stratified draw from ``table`` (count → probability):
    the (i + ½)/n quantiles, capped at ``max_demos`` as the loader caps them."""
    values = torch.tensor(list(table), dtype=torch.int64)
    cdf = torch.tensor(list(table.values()), dtype=torch.float64).cumsum(0)
    quantiles = (torch.arange(n, dtype=torch.float64) + 0.5) / n * cdf[-1]
    return values[torch.searchsorted(cdf, quantiles).clamp(max=len(values) - 1)].clamp(
        max=max_demos
    )


def demo_batch(
    counts: torch.Tensor, max_demos: int, seed: int, device: torch.device, seq_len: int = SEQ_LEN
) -> dict[str, torch.Tensor]:
    """A few-shot batch as ``dataset.few_shot`` collates it, with random tokens, one row per
    entry of ``counts`` [B] in a seeded random order: ``inputs``/``labels`` int32 [B, S],
    ``puzzle_identifiers``/``group_ids`` int32 [B] (rows in pairs of one group, as augmented
    siblings), ``demo_inputs``/``demo_labels`` int32 [B, K, S] (PAD 0 in empty slots) and
    ``demo_mask`` bool [B, K] with each row's first ``count`` slots filled."""
    g = torch.Generator().manual_seed(seed)
    batch_size = counts.numel()
    counts = counts[torch.randperm(batch_size, generator=g)]
    mask = torch.arange(max_demos) < counts[:, None]
    shape = (batch_size, max_demos, seq_len)
    batch = {
        "inputs": torch.randint(0, VOCAB, (batch_size, seq_len), generator=g),
        "labels": torch.randint(0, VOCAB, (batch_size, seq_len), generator=g),
        "puzzle_identifiers": torch.randint(1, PUZZLES, (batch_size,), generator=g),
        "group_ids": torch.arange(batch_size) // 2,
        "demo_inputs": torch.randint(0, VOCAB, shape, generator=g) * mask[..., None],
        "demo_labels": torch.randint(0, VOCAB, shape, generator=g) * mask[..., None],
    }
    out = {k: v.to(device=device, dtype=torch.int32) for k, v in batch.items()}
    out["demo_mask"] = mask.to(device)
    return out


def demo_batches(
    num: int,
    batch_size: int,
    max_demos: int,
    table: dict[int, float],
    device: torch.device,
    seq_len: int = SEQ_LEN,
) -> list[dict[str, torch.Tensor]]:
    """``num`` batches (``demo_batch``, seeds 0..num-1) whose num·B rows are one stratified
    draw from ``table``, dealt so that row i of batch j has the (i·num + j)-th quantile: each
    batch spans the distribution and the pool keeps its mean even for small batches."""
    counts = demo_counts(table, num * batch_size, max_demos).view(batch_size, num)
    return [demo_batch(counts[:, j], max_demos, j, device, seq_len) for j in range(num)]


def mean_demos(batches: list[dict[str, torch.Tensor]]) -> float:
    """Valid demos per row over ``batches``."""
    return round(torch.cat([b["demo_mask"] for b in batches]).sum(1).float().mean().item(), 3)


def typical(batches: list[dict[str, torch.Tensor]]) -> int:
    """Index of the batch whose demo total is nearest the pool's mean total."""
    totals = torch.stack([b["demo_mask"].sum() for b in batches]).float()
    return int((totals - totals.mean()).abs().argmin())


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward inside ``measure()``: unique storages,
    those of ``exclude`` (the parameters) left out. Device-independent, so it gives a memory
    figure on CPU too; it leaves out short-lived temporaries and the gradients."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: dict[int, int] = {}

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20

    @contextmanager
    def measure(self) -> Iterator[None]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.exclude:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


def alternating(names: list[str], round_index: int) -> list[str]:
    """``names`` forwards in even rounds and backwards in odd ones."""
    return names if round_index % 2 == 0 else names[::-1]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ----------------------------------------------------------------------------------------------
# Train states
# ----------------------------------------------------------------------------------------------
def bench_config(arch: str, args: argparse.Namespace, device: torch.device) -> PretrainConfig:
    """The run config of ``arch`` for this benchmark (one rank, the batch as global batch)."""
    overrides = [
        f"arch={arch}",
        *preset_overrides(args.preset, device, args.dtype),
        f"global_batch_size={args.batch_size}",
        f"max_demos={args.max_demos}",
        "ema=True",
        "logger=none",
        *args.overrides,
    ]
    if arch != "trm":
        overrides.append(f"arch.encoder_type={args.encoder}")
    if arch == "etrm_fct":
        overrides.append(f"arch.num_act_steps={args.fct_steps}")
    return load_pretrain_config(compose(overrides=overrides))


def bench_state(config: PretrainConfig, dims: ModelDims, device: torch.device) -> TrainState:
    """Model (seed 0), optimizers, EMA and step strategy, as ``create_train_state`` makes
    them, with no data, provenance or compile; the schedule never ends."""
    family = family_of(config.arch)
    torch.manual_seed(0)
    with torch.device(device):
        head = family.build(config.arch, dims)
    head.train()
    scale = {"encoder_lr_scale": config.encoder_lr_scale} if config.encoder_lr_scale > 0 else {}
    groups = family.optimizer_groups(head, config.freeze_weights, **scale)
    ema = None
    if config.ema:
        ema = EMAHelper(mu=config.ema_rate)
        ema.register(head)
    capabilities = family.capabilities(config.arch, head)
    return TrainState(
        model=head,
        family=family,
        capabilities=capabilities,
        optimizers=build_optimizers(groups, config, world_size=1),
        strategy=build_strategy(config, head, family, capabilities),
        total_steps=2**62,
        ema=ema,
    )


def batch_unit(
    config: PretrainConfig, state: TrainState, dist_info: DistInfo
) -> Callable[[dict[str, torch.Tensor]], int]:
    """One batch as the loop trains it: ``train_batch`` until the strategy is done with the
    batch; returns the optimizer steps taken."""

    def run(batch: dict[str, torch.Tensor]) -> int:
        updates = 0
        while True:
            updates += 1
            if train_batch(config, state, batch, dist_info).batch_done:
                return updates

    return run


def timing_parser(description: str, unit: str) -> argparse.ArgumentParser:
    """The options the ETRM benchmarks share: preset, batch, demo slots, dtype, device, grid
    tokens and the timing schedule (``--steps`` timed ``unit``s per mode and round, ``--rounds``,
    ``--warmup``). ``parse_timing_args`` fills in the preset's batch size."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 (tiny), 96 (arc)")
    p.add_argument("--max-demos", type=int, default=10, help="K demo slots")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help="grid tokens (30 × 30)")
    p.add_argument("--steps", type=int, default=1, help=f"timed {unit}s per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help=f"untimed {unit}s per mode")
    return p


def parse_timing_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p``'s arguments with ``batch_size`` defaulted by the preset."""
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or DEFAULT_BATCH[args.preset]
    return args


def main(argv: list[str] | None = None) -> None:
    p = timing_parser(__doc__.split("\n\n")[0], "batch")
    p.add_argument("--encoder", default="standard", help="arch.encoder_type of ETRM")
    p.add_argument("--fct-steps", type=int, default=4, help="N: arch.num_act_steps of FCT")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for all, e.g. arch.L_cycles=6")
    args = parse_timing_args(p, argv)

    device = select_device(args.device)
    dist_info = DistInfo(device=device)
    dims = ModelDims(args.batch_size, args.seq_len, VOCAB, num_puzzle_identifiers=PUZZLES)
    configs = {arch: bench_config(arch, args, device) for arch in ARCHS}
    decoder = {k: getattr(configs["trm"].arch, k) for k in DECODER_KEYS}
    for arch in ARCHS:  # the arch files' defaults differ (etrm_fct: L_cycles 6)
        differ = [k for k in DECODER_KEYS if getattr(configs[arch].arch, k) != decoder[k]]
        if differ:
            raise SystemExit(
                f"arch={arch} and arch=trm differ in {differ}: override arch.<key> for all three"
            )
    states = {arch: bench_state(configs[arch], dims, device) for arch in ARCHS}
    runs = {arch: batch_unit(configs[arch], states[arch], dist_info) for arch in ARCHS}
    batches = demo_batches(
        POOL, args.batch_size, args.max_demos, ARC_TRAIN_DEMO_COUNTS, device, args.seq_len
    )
    feeds = {  # each family gets the fields it reads, as its collator gives them
        arch: [{k: b[k] for k in family_of(configs[arch].arch).batch_fields} for b in batches]
        for arch in ARCHS
    }

    updates: dict[str, int] = {}
    served = dict.fromkeys(ARCHS, 0)  # batches each has trained on: all see the same sequence

    def next_batch(arch: str) -> None:
        updates[arch] = runs[arch](feeds[arch][served[arch] % POOL])
        served[arch] += 1

    for arch in ARCHS:
        for _ in range(args.warmup):
            next_batch(arch)
    # One optimizer step more, untimed, under the meter, on the most typical batch (FCT: the
    # first step of that batch, the others after it).
    saved, meter_batch = {}, typical(batches)
    for arch in ARCHS:
        state, batch = states[arch], feeds[arch][meter_batch]
        meter = SavedTensorMeter([*state.raw_model.parameters(), *state.raw_model.buffers()])
        with meter.measure():
            done = train_batch(configs[arch], state, batch, dist_info).batch_done
        while not done:
            done = train_batch(configs[arch], state, batch, dist_info).batch_done
        saved[arch] = meter.mib

    seconds: dict[str, list[float]] = {arch: [] for arch in ARCHS}
    peak: dict[str, float] = {}
    for r in range(args.rounds):
        for arch in alternating(list(ARCHS), r):
            sync(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                next_batch(arch)
            sync(device)
            seconds[arch].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                step_peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                peak[arch] = max(peak.get(arch, 0.0), step_peak)
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{a} {seconds[a][-1] * 1e3:8.1f} ms/batch" for a in ARCHS), flush=True)  # fmt: skip

    per_batch = {arch: statistics.median(seconds[arch]) for arch in ARCHS}
    per_update = {arch: per_batch[arch] / updates[arch] for arch in ARCHS}
    result: dict[str, Any] = {
        "preset": args.preset,
        "device": str(device),
        "dtype": decoder["forward_dtype"],
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "max_demos": args.max_demos,
        "mean_demos": mean_demos(batches),
        "valid_slot_fraction": round(mean_demos(batches) / args.max_demos, 3),
        "meter_batch_mean_demos": mean_demos([batches[meter_batch]]),
        "encoder": args.encoder,
        "fct_steps": updates["etrm_fct"],
        "decoder": decoder,
        "rounds": args.rounds,
        "steps": args.steps,
        "configs": {},
    }
    print(f"\n{'config':9s} {'updates':>7s} {'ms/batch':>9s} {'ms/update':>9s} {'saved MiB':>9s}")
    for arch in ARCHS:
        entry: dict[str, Any] = {
            "updates_per_batch": updates[arch],
            "s_per_batch": round(per_batch[arch], 5),
            "s_per_update": round(per_update[arch], 5),
            "s_per_batch_min": round(min(seconds[arch]), 5),
            "saved_activation_mib": round(saved[arch], 2),
            "step_peak_mib": rounded(peak.get(arch), 1),
            "num_params": describe_model(states[arch].raw_model)["num_params"],
        }
        result["configs"][arch] = entry
        print(f"{arch:9s} {updates[arch]:7d} {per_batch[arch] * 1e3:9.1f} "
              f"{per_update[arch] * 1e3:9.1f} {saved[arch]:9.1f}")  # fmt: skip
    trm_t, trm_saved, trm_peak = per_update["trm"], saved["trm"], peak.get("trm")
    result["ratios"] = {
        "etrm_vs_trm_time": ratio(per_update["etrm"], trm_t),
        "etrm_fct_update_vs_trm_time": ratio(per_update["etrm_fct"], trm_t),
        "etrm_fct_batch_vs_trm_time": ratio(per_batch["etrm_fct"], per_batch["trm"]),
        "etrm_vs_trm_saved_activations": ratio(saved["etrm"], trm_saved),
        "etrm_fct_vs_trm_saved_activations": ratio(saved["etrm_fct"], trm_saved),
        "etrm_vs_trm_step_peak": ratio(peak.get("etrm"), trm_peak),
        "etrm_fct_vs_trm_step_peak": ratio(peak.get("etrm_fct"), trm_peak),
    }
    for key, value in result["ratios"].items():
        print(f"{key:36s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
