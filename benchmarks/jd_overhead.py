"""Cost of Jacobian descent per optimizer step: ours (``training.jd``) and the fork's against GD.

    python -m benchmarks.jd_overhead                                  # tiny config, CPU
    python -m benchmarks.jd_overhead --skip-fork --rounds 5
    python -m benchmarks.jd_overhead --preset arc --batch-size 64     # paper's ARC config (GPU)

Every configuration trains the same TRM (same seed, same random batch, ``halt_max_steps`` = the
stack size and ``halt_exploration_prob=0``, so that halting is deterministic and a stack runs all
its steps); each runs in a fresh child process (``--single NAME``), which makes the peak memory
that configuration's alone and keeps allocator and autograd-hook state from leaking between
configurations. Rounds run every configuration once, in a rotated order, so that machine noise
hits all of them; per configuration the median step time over all rounds is reported. Each child
first runs one plain gradient-descent step (one-time costs), then ``--warmup`` untimed steps
(``--slow-warmup`` for stacks and forks), then up to ``--steps`` timed ones, fewer when they would
exceed ``--child-seconds``. The fork's configurations cost tens of gradient-descent steps each,
so they run in the first ``--fork-rounds`` rounds only (default 1; about 14 minutes in all for
the defaults on a 2-core CPU, 4 of them the fork's S² stack).

Configurations (S = ``--stack-steps``, k = ``--groups``):

* ``gd``: one ACT supervision step, ``(out.total() / B).backward()`` (training's ``objective=sum``).
* ``gd_stack{S}``: S supervision steps on the same batch with one backward each
  (``stack_supervisions_and_sum``, the m = 1 path of ``training.strategies.JacobianDescent``).
* ``iwrm_ours`` / ``pixelwise{k}_ours`` / ``stack{S}_ours``: ``JacobianDescent.step`` with UPGrad
  and the automatic provider (per_sample, rows, rows) on ``iwrm_with_q_halt_in``,
  ``pixelwise_q_halt_in`` with k groups and ``stack_supervisions``, driven like
  ``training.strategies.JacobianDescent``.
* ``iwrm_autogram``: ours on IWRM with TorchJD's autogram engine (the per-sample fallback).
* ``pixelwise{k}_heads``: ours with ``gramian: heads`` (partial Jacobian descent: the Gramian of
  the output heads' gradients, then one weighted backward).
* ``*_fork``: the research fork's way: the same objective vector (for the stack: all S steps
  first, every graph kept alive), then ``torchjd.autojac.backward(objectives, inputs=params,
  parallel_chunk_size=1)`` and ``jac_to_grad(params, UPGrad())``.
* ``iwrm_rows`` (only with ``--configs``): ours on IWRM with the rows provider, for diagnosis.

A step is the forward and gradient work of one optimizer step; the optimizer update itself
(identical for all) is left out, which makes the ratios slightly pessimistic. Peak memory: on
CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated after model construction; on
CPU the child's peak RSS (``os.wait4``) minus its RSS after model construction (activations,
Jacobians and allocator slack). Phases: ours' ``gramian`` includes the forward pass(es) (the
provider pulls the steps lazily), ``backward`` is the weighted backward (autogram, heads) or
``Jᵀw`` (rows, per_sample); the fork's ``jacobian`` is ``autojac.backward``, ``aggregation`` is
``jac_to_grad``. The table ends with the project's goals (IWRM ≤ 1.5× the GD step, pixelwise/k
≤ 2×, S stacked supervisions ≤ 2× the peak memory of one GD step). Exact rows of k objectives
that share one graph need k backward passes whatever the provider:
``pixelwise{k}_k_backwards_vs_gd`` is forward + k backward passes at the GD configuration's own
times, and ``pixelwise{k}_ours_row_vs_gd_backward`` what each pixel-group row cost against GD's
backward.
The last line printed is one JSON object.

``--weighting-only`` times UPGrad's weighting where it dominates:
``stack_supervisions_and_iwrm`` with S = ``--stack-steps`` and B = ``--batch-size`` (S·B
objectives; 512 at S = 16, B = 32). One stacked step's Gramian comes from the per-sample
provider (``gramian_s``), then the weighting of that Gramian and of a conflicting one of the
same size (random per-sample gradients ``g_i = μ + ε_i`` with small ‖μ‖, so that most pairs
conflict) is timed with each projector TorchJD's UPGrad can use: ``quadprog`` (TorchJD 0.18's
only one, ``QuadprogProjector``: one QP per objective) and ``screened`` (``training.jd
.ScreenedProjector``, the default: the same QPs, skipping those whose solution is known),
and ``backward_s`` (Jᵀw). The quadprog weighting is skipped above ``--quadprog-max-objectives``
(it grows about as m⁴). JSON: the times, ``quadprog_vs_screened`` per Gramian, the largest
weight difference, the conflicting objectives and the weighting against the Gramian's time.

One benchmark, one module: every configuration it times is here (past 400 lines) so that one
run measures them all against the same gradient-descent baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from utils.distributed import select_device

PRESETS = {"tiny": ["+experiment=tiny_cpu"], "arc": ["+experiment=arc1"]}
SEQ_LEN, VOCAB, PUZZLES = 900, 12, 16
GOALS = {  # the project's targets: (ratio key, at most)
    "iwrm_time": ("iwrm_ours_vs_gd", 1.5),
    "pixelwise_time": ("pixelwise{k}_ours_vs_gd", 2.0),
    "pixelwise_time_partial": ("pixelwise{k}_heads_vs_gd", 2.0),
    "stack_memory": ("stack{S}_ours_mem_vs_one_gd_step", 2.0),
}


def config_names(stack: int, groups: int) -> dict[str, str]:
    """Every configuration's name → its kind (``gd``, ``gd_stack``, ``ours``, ``fork``)."""
    return {
        "gd": "gd",
        f"gd_stack{stack}": "gd_stack",
        "iwrm_ours": "ours",
        "iwrm_autogram": "ours",
        "iwrm_fork": "fork",
        f"pixelwise{groups}_ours": "ours",
        f"pixelwise{groups}_heads": "ours",
        f"pixelwise{groups}_fork": "fork",
        f"stack{stack}_ours": "ours",
        f"stack{stack}_fork": "fork",
        "iwrm_rows": "ours",
    }


DEFAULT_EXCLUDED = ("iwrm_rows",)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss_mib() -> float:
    """Resident set size of this process now (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# One configuration (child process)
# ----------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """The model, the batch and the ACT carry one configuration trains on."""

    head: nn.Module
    batch: dict[str, Tensor]
    params: list[Tensor]
    extra: list[Tensor]  # the batch rows of the puzzle embedding (a Jacobian column block)
    has_halt: bool
    device: torch.device
    carry: Any = None
    forward_s: list[float] = field(default_factory=list)

    @property
    def B(self) -> int:
        return int(self.batch["inputs"].shape[0])

    @property
    def P(self) -> int:
        return int(self.batch["inputs"].shape[1])

    def zero_grad(self) -> None:
        for p in [*self.params, *self.extra]:
            p.grad = None

    def forward(self) -> Any:
        """One supervision step on the carry (timed on CPU, where timing needs no sync)."""
        start = time.perf_counter()
        out = self.head(carry=self.carry, batch=self.batch, return_keys=())
        self.carry = out.new_carry
        if self.device.type == "cpu":
            self.forward_s.append(time.perf_counter() - start)
        return out

    def contributions(self, layout: Any) -> Iterator[Tensor]:
        """Per-step contributions [B, m], exactly as ``JacobianDescent`` builds them."""
        from training import jd

        for s in range(layout.S):
            out = self.forward()
            halt = out.halt_loss_per_sample if out.has_halting else None
            yield jd.step_contributions(
                layout, s, out.normalized_token_loss, halt, out.internal_token_loss
            )


def build_bench(args: argparse.Namespace) -> tuple[Bench, Any]:
    """The TRM of the preset (seed 0) and a random batch; returns the bench and arch config."""
    from models.family import family_of
    from models.recursive_reasoning.common import ModelDims
    from training.config import load_pretrain_config
    from utils.config import compose

    overrides = [
        *PRESETS[args.preset],
        f"arch.halt_max_steps={args.stack_steps}",
        "arch.halt_exploration_prob=0",
        *args.overrides,
    ]
    if args.preset == "tiny":
        overrides.append("arch.forward_dtype=float32")
    arch = load_pretrain_config(compose(overrides=overrides)).arch
    device = select_device(args.device)
    dims = ModelDims(args.batch_size, SEQ_LEN, VOCAB, num_puzzle_identifiers=PUZZLES)
    torch.manual_seed(0)
    with torch.device(device):
        head = family_of(arch).build(arch, dims)
    head.train()
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(0, VOCAB, (args.batch_size, SEQ_LEN), generator=g),
        "labels": torch.randint(0, VOCAB, (args.batch_size, SEQ_LEN), generator=g),
        "puzzle_identifiers": torch.randint(1, PUZZLES, (args.batch_size,), generator=g),
    }
    batch = {k: v.to(device=device, dtype=torch.int32) for k, v in batch.items()}
    puzzle_emb = family_of(arch).puzzle_embedding(head)
    extra = []
    if puzzle_emb is not None and puzzle_emb.local_weights.requires_grad:
        extra.append(puzzle_emb.local_weights)
    bench = Bench(
        head=head,
        batch=batch,
        params=[p for p in head.parameters() if p.requires_grad],
        extra=extra,
        has_halt=arch.has_halting,
        device=device,
    )
    bench.carry = head.initial_carry(batch)
    return bench, arch


def make_step(
    name: str, kind: str, bench: Bench, args: argparse.Namespace
) -> tuple[Callable[[int], dict[str, float]], int, str]:
    """(one optimizer step's function of the step index, m, provider) for configuration ``name``."""
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import backward, jac_to_grad

    from training import jd
    from training.objectives import AggregatorConfig, mode_spec

    S, k = args.stack_steps, args.groups
    if kind == "gd":

        def gd_step(_: int) -> dict[str, float]:
            (bench.forward().total() / bench.B).backward()
            return {}

        return gd_step, 1, "scalar"

    if kind == "gd_stack":
        spec = mode_spec("stack_supervisions_and_sum")
    elif name.startswith("iwrm"):
        spec = mode_spec("iwrm_with_q_halt_in")
    elif name.startswith("pixelwise"):
        spec = mode_spec("pixelwise_q_halt_in", groups=k)
    else:
        spec = mode_spec("stack_supervisions")
    if name in ("iwrm_rows", "iwrm_autogram"):
        spec = spec.model_copy(update={"method": name.removeprefix("iwrm_")})
    if name.endswith("_heads"):
        spec = spec.model_copy(update={"gramian": "heads"})
    steps = S if spec.supervisions == "stacked" else 1
    layout = jd.Layout(spec=spec, S=steps, C=1, B=bench.B, P=bench.P, has_halt=bench.has_halt)

    if kind == "gd_stack":

        def gd_stack_step(_: int) -> dict[str, float]:
            for c in bench.contributions(layout):  # one backward per supervision step
                (c.sum() / bench.B).backward()
            return {}

        return gd_stack_step, 1, "scalar"

    m = layout.m if spec.groups is None else min(spec.groups, layout.m)
    if kind == "ours":
        descent = jd.JacobianDescent(spec, AggregatorConfig(name="upgrad"), bench.head, seed=0)

        def ours_step(index: int) -> dict[str, float]:
            result = descent.step(
                steps=bench.contributions(layout),
                layout=layout,
                params=bench.params,
                extra_params=bench.extra,
                global_batch_size=bench.B,
                step_index=index,
                all_reduce=lambda t: t,
            )
            return {k: v for k, v in result.metrics.items() if k.startswith("jd/seconds_")}

        return ours_step, m, descent.method(layout)

    inputs = [*bench.params, *bench.extra]  # autojac's default: every leaf, embedding rows too

    def fork_step(index: int) -> dict[str, float]:
        # Every step's graph stays alive until the Jacobian is computed (memory ∝ S).
        contributions = list(bench.contributions(layout))
        grouping = jd.grouping_matrix(layout.m, spec.groups, 0, index, bench.device)
        objectives = torch.stack(contributions).sum(dim=(0, 1))
        if grouping is not None:
            objectives = objectives @ grouping.to(objectives.dtype)
        start = time.perf_counter()
        backward(objectives, inputs=inputs, parallel_chunk_size=1)
        sync(bench.device)
        middle = time.perf_counter()
        jac_to_grad(inputs, UPGrad())
        sync(bench.device)
        return {
            "jd/seconds_jacobian": middle - start,
            "jd/seconds_aggregation": time.perf_counter() - middle,
        }

    return fork_step, m, "autojac(chunk=1)"


def run_single(args: argparse.Namespace) -> None:
    """Child: build, warm up, time ``args.steps`` optimizer steps; print one JSON line."""
    import torchjd.aggregation
    import torchjd.autogram
    import torchjd.autojac  # noqa: F401  (imports before the baseline memory reading)

    name = args.single
    kind = config_names(args.stack_steps, args.groups)[name]
    bench, _ = build_bench(args)
    step, m, provider = make_step(name, kind, bench, args)
    sync(bench.device)
    baseline_mib = current_rss_mib()
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
        cuda_base = torch.cuda.memory_allocated(bench.device) / 2**20
    # One plain supervision step first: one-time costs (thread pools, kernel selection, lazy
    # initialisation) stay out of the timings even with no warm-up step of the configuration.
    # Its peak is the gradient-descent peak, below every configuration's own. It runs before
    # any autogram engine exists (JacobianDescent creates it at its first step).
    (bench.forward().total() / bench.B).backward()
    bench.zero_grad()
    bench.carry = bench.head.initial_carry(bench.batch)
    seconds: list[float] = []
    forward: list[float] = []
    phases: list[dict[str, float]] = []
    index = 0
    while len(seconds) < args.steps:
        index += 1
        bench.forward_s.clear()
        sync(bench.device)
        start = time.perf_counter()
        metrics = step(index)
        sync(bench.device)
        elapsed = time.perf_counter() - start
        bench.zero_grad()
        if index <= args.warmup:
            continue
        seconds.append(elapsed)
        forward.append(sum(bench.forward_s))
        phases.append(metrics)
        if sum(seconds) + statistics.median(seconds) > args.child_seconds:
            break  # the next step would overrun this child's time budget
    result: dict[str, Any] = {
        "name": name,
        "m": m,
        "provider": provider,
        "seconds": seconds,
        "forward_seconds": forward if not cuda else None,
        "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "baseline_mib": baseline_mib,
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(bench.device) / 2**20
        result["cuda_baseline_mib"] = cuda_base
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Orchestration (parent process)
# ----------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """All rounds of one configuration."""

    m: int = 0
    provider: str = ""
    seconds: list[float] = field(default_factory=list)
    forward: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    rounds: int = 0
    peak_mib: list[float] = field(default_factory=list)
    delta_mib: list[float] = field(default_factory=list)


def run_child(cmd: list[str], warnings: set[str]) -> tuple[dict[str, Any] | None, float, str]:
    """Run one child; return its JSON (None if it failed), its peak RSS in MiB (``wait4``) and
    the tail of its stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    warnings.update(line.strip() for line in stderr.splitlines() if "Warning" in line)
    rss_mib = usage.ru_maxrss / 1024  # KiB on Linux
    if proc.returncode != 0:
        reason = f"exit status {proc.returncode}"
        if proc.returncode == -9:
            reason += " (killed: out of memory?)"
        return None, rss_mib, f"{reason}: {stderr.strip()[-500:]}"
    return json.loads(stdout.strip().splitlines()[-1]), rss_mib, ""


def is_slow(name: str, kind: str) -> bool:
    """Forks and stacks: one step is many supervision steps' worth of work."""
    return kind == "fork" or name.startswith(("stack", "gd_stack"))


def child_cmd(args: argparse.Namespace, name: str, slow: bool) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.jd_overhead", "--single", name,
        "--preset", args.preset, "--batch-size", str(args.batch_size),
        "--device", args.device, "--stack-steps", str(args.stack_steps),
        "--groups", str(args.groups), "--steps", str(args.steps),
        "--warmup", str(args.slow_warmup if slow else args.warmup),
        "--child-seconds", str(args.child_seconds), *args.overrides,
    ]  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(
    args: argparse.Namespace, measured: dict[str, Measured], device: str
) -> dict[str, Any]:
    """Medians, the table and the ratios (JSON)."""
    S, k = args.stack_steps, args.groups
    time_s = {n: statistics.median(r.seconds) for n, r in measured.items()}
    delta = {n: statistics.median(r.delta_mib) for n, r in measured.items()}
    peak = {n: statistics.median(r.peak_mib) for n, r in measured.items()}
    result: dict[str, Any] = {
        "preset": args.preset,
        "device": device,
        "batch_size": args.batch_size,
        "stack_steps": S,
        "groups": k,
        "rounds": args.rounds,
        "memory": "cuda max_memory_allocated" if device.startswith("cuda") else "peak RSS",
        "configs": {},
    }
    print(
        f"\n{'config':18s} {'provider':17s} {'m':>4s} {'s/step':>9s} {'min':>9s} "
        f"{'fwd s':>7s} {'x gd':>7s} {'peak MiB':>9s} {'delta MiB':>9s} {'x gd mem':>8s}"
    )
    for n, r in measured.items():
        fwd = statistics.median(r.forward) if r.forward else None
        phases = {
            key.removeprefix("jd/seconds_"): round(statistics.median(p[key] for p in r.phases), 4)
            for key in (r.phases[0] if r.phases else {})
        }
        result["configs"][n] = {
            "m": r.m,
            "provider": r.provider,
            "s_per_step": round(time_s[n], 4),
            "s_per_step_min": round(min(r.seconds), 4),
            "timed_steps": len(r.seconds),
            "rounds": r.rounds,
            "forward_s_per_step": round(fwd, 4) if fwd is not None else None,
            "phases_s": phases,
            "peak_mib": round(peak[n], 1),
            "peak_delta_mib": round(delta[n], 1),
        }
        x_time = ratio(time_s[n], time_s.get("gd"))
        x_mem = ratio(delta[n], delta.get("gd"))
        fwd_text = f"{fwd:7.3f}" if fwd is not None else f"{'-':>7s}"
        print(
            f"{n:18s} {r.provider:17s} {r.m:4d} {time_s[n]:9.3f} {min(r.seconds):9.3f} "
            f"{fwd_text} {x_time or float('nan'):7.2f} {peak[n]:9.1f} {delta[n]:9.1f} "
            f"{x_mem or float('nan'):8.2f}"
        )
        if phases:
            print(f"{'':18s} phases: " + ", ".join(f"{a} {b:.3f}s" for a, b in phases.items()))

    gd_t, gd_m = time_s.get("gd"), delta.get("gd")
    stack_gd_t = time_s.get(f"gd_stack{S}")
    ratios: dict[str, float | None] = {}
    for split in ("iwrm", f"pixelwise{k}"):
        for who in ("ours", "autogram", "heads", "fork", "rows"):
            if f"{split}_{who}" in time_s:
                ratios[f"{split}_{who}_vs_gd"] = ratio(time_s[f"{split}_{who}"], gd_t)
                ratios[f"{split}_{who}_mem_vs_gd"] = ratio(delta[f"{split}_{who}"], gd_m)
    for who in ("ours", "fork"):
        name = f"stack{S}_{who}"
        if name in time_s:
            ratios[f"{name}_mem_vs_one_gd_step"] = ratio(delta[name], gd_m)
            ratios[f"{name}_time_vs_gd_over_stack"] = ratio(time_s[name], stack_gd_t)
            ratios[f"{name}_time_vs_{S}_gd_steps"] = ratio(time_s[name], S * gd_t if gd_t else None)
    if f"gd_stack{S}" in time_s:
        ratios[f"gd_stack{S}_mem_vs_one_gd_step"] = ratio(delta[f"gd_stack{S}"], gd_m)
        ratios[f"gd_stack{S}_time_vs_{S}_gd_steps"] = ratio(stack_gd_t, S * gd_t if gd_t else None)
    gd_forward = measured["gd"].forward if "gd" in measured else []
    if gd_forward and gd_t:
        # The exact rows of k objectives that share one graph need k backward passes (one
        # vector-Jacobian product each), whatever the provider: forward + k·(GD step − forward)
        # at the GD configuration's own times.
        fwd = statistics.median(gd_forward)
        ratios[f"pixelwise{k}_k_backwards_vs_gd"] = ratio(fwd + k * (gd_t - fwd), gd_t)
        px = measured.get(f"pixelwise{k}_ours")
        if px is not None and px.forward:
            # What each objective's row cost beyond the forward, against GD's one backward.
            per_row = (time_s[f"pixelwise{k}_ours"] - statistics.median(px.forward)) / k
            ratios[f"pixelwise{k}_ours_row_vs_gd_backward"] = ratio(per_row, gd_t - fwd)
    for split in ("iwrm", f"pixelwise{k}", f"stack{S}"):
        if f"{split}_fork" in time_s and f"{split}_ours" in time_s:
            ratios[f"{split}_fork_vs_ours_time"] = ratio(
                time_s[f"{split}_fork"], time_s[f"{split}_ours"]
            )
    result["ratios"] = ratios
    goals = {}
    print()
    for goal, (key, limit) in GOALS.items():
        key = key.format(k=k, S=S)
        value = ratios.get(key)
        goals[goal] = {
            "ratio": key,
            "value": value,
            "at_most": limit,
            "met": None if value is None else value <= limit,
        }
        verdict = "n/a" if value is None else ("met" if value <= limit else "MISSED")
        print(f"goal {goal:15s} {key:34s} = {value} (≤ {limit}): {verdict}")
    result["goals"] = goals
    return result


def time_weighting(G: Tensor, projector: str) -> tuple[float, Tensor]:
    """Seconds of one UPGrad weighting of G with the named projector, and the weights."""
    from training import jd
    from training.objectives import AggregatorConfig

    config = AggregatorConfig(name="upgrad", options={"projector": projector})
    weighting = jd.build_aggregator(config, G.shape[0])
    start = time.perf_counter()
    w = weighting(G.to(torch.float32))
    return time.perf_counter() - start, w


def run_weighting(args: argparse.Namespace) -> dict[str, Any]:
    """``--weighting-only``: the Gramian, weighting and Jᵀw of stacked IWRM (docstring)."""
    from training import jd
    from training.objectives import mode_spec

    bench, _ = build_bench(args)
    S, B = args.stack_steps, bench.B
    spec = mode_spec("stack_supervisions_and_iwrm")
    layout = jd.Layout(spec=spec, S=S, C=1, B=B, P=bench.P, has_halt=bench.has_halt)
    problem = jd.too_many_objectives(spec, layout.m, 1)
    if problem is not None:  # a benchmark of the weighting: the limit is lifted for it
        spec = spec.model_copy(update={"max_objectives": layout.m})
        layout = replace(layout, spec=spec)
    start = time.perf_counter()
    gram = jd._per_sample(bench.contributions(layout), layout, bench.params, bench.extra, None)
    sync(bench.device)
    gramian_s = time.perf_counter() - start
    m = layout.m
    g = torch.Generator().manual_seed(0)
    n = 4096
    grads = 0.05 * torch.randn(1, n, generator=g) + torch.randn(m, n, generator=g)
    gramians = {"model": gram.G.detach().cpu().double(), "conflicting": grads @ grads.T}
    out: dict[str, Any] = {"mode": spec.name, "m": m, "stack_steps": S, "batch_size": B,
                           "gramian_s": round(gramian_s, 4), "weighting": {}}  # fmt: skip
    weights: dict[str, Tensor] = {}
    for name, G in gramians.items():
        screened_s, w = time_weighting(G, "screened")
        weights[name] = w
        row: dict[str, Any] = {
            "conflicting_objectives": int((G < 0).any(0).sum()),
            "screened_s": round(screened_s, 4),
            "screened_vs_gramian": ratio(screened_s, gramian_s),
        }
        if m <= args.quadprog_max_objectives:
            quadprog_s, w_quadprog = time_weighting(G, "quadprog")
            row["quadprog_s"] = round(quadprog_s, 4)
            row["quadprog_vs_screened"] = ratio(quadprog_s, screened_s)
            row["max_weight_difference"] = float((w - w_quadprog).abs().max())
        out["weighting"][name] = row
        print(f"{name:12s} m={m}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    w = weights["model"].to(bench.device)
    start = time.perf_counter()
    gram.apply((m / B) * w, None)
    sync(bench.device)
    out["backward_s"] = round(time.perf_counter() - start, 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--rounds", type=int, default=3, help="children per configuration")
    p.add_argument("--fork-rounds", type=int, default=1, help="rounds that run the fork's way")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child (at most)")
    p.add_argument(
        "--child-seconds",
        type=float,
        default=20.0,
        help="fewer timed steps (at least 1) when they would take longer than this",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of one-step configs")
    p.add_argument("--slow-warmup", type=int, default=0, help="untimed steps of stacks/forks")
    p.add_argument("--stack-steps", type=int, default=16, help="S (= arch.halt_max_steps)")
    p.add_argument("--groups", type=int, default=10, help="pixel groups of the pixelwise split")
    p.add_argument("--skip-fork", action="store_true")
    p.add_argument("--configs", default=None, help="comma-separated subset (see the docstring)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--weighting-only", action="store_true", help="time UPGrad's weighting")
    p.add_argument(
        "--quadprog-max-objectives",
        type=int,
        default=256,
        help="with --weighting-only: time TorchJD's quadprog projector up to this m",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. arch.hidden_size=128")
    args = p.parse_args()
    if args.single is not None:
        run_single(args)
        return
    if args.weighting_only:
        result = run_weighting(args)
        result["device"] = str(select_device(args.device))
        print(json.dumps(result))
        return

    names = config_names(args.stack_steps, args.groups)
    if args.configs:
        chosen = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            p.error(f"unknown configurations {unknown}; choose from {', '.join(names)}")
    else:
        chosen = [n for n in names if n not in DEFAULT_EXCLUDED]
    if args.skip_fork:
        chosen = [n for n in chosen if names[n] != "fork"]
    device = str(select_device(args.device))
    measured = {n: Measured() for n in chosen}
    warnings: set[str] = set()
    failed: dict[str, str] = {}
    print(f"load before: {os.getloadavg()}", flush=True)
    for r in range(args.rounds):
        order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]  # rotate the order
        for n in order:
            if names[n] == "fork" and r >= args.fork_rounds:
                continue
            cmd = child_cmd(args, n, is_slow(n, names[n]))
            data, rss_peak, error = run_child(cmd, warnings)
            if data is None:
                failed[n] = error
                print(f"round {r + 1}/{args.rounds} {n:18s} FAILED {error}", flush=True)
                continue
            rec = measured[n]
            rec.m, rec.provider = data["m"], data["provider"]
            rec.rounds += 1
            rec.seconds += data["seconds"]
            rec.forward += data["forward_seconds"] or []
            rec.phases.append(data["phases"])
            if "cuda_peak_mib" in data:
                rec.peak_mib.append(data["cuda_peak_mib"])
                rec.delta_mib.append(data["cuda_peak_mib"] - data["cuda_baseline_mib"])
            else:
                rec.peak_mib.append(rss_peak)
                rec.delta_mib.append(rss_peak - data["baseline_mib"])
            print(
                f"round {r + 1}/{args.rounds} {n:18s} "
                f"{statistics.median(data['seconds']):8.3f} s/step  "
                f"peak {rec.peak_mib[-1]:8.1f} MiB (+{rec.delta_mib[-1]:.1f})",
                flush=True,
            )
    result = summarize(args, {n: r for n, r in measured.items() if r.seconds}, device)
    if failed:
        result["failed"] = failed
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if warnings:
        print("\nwarnings from the children:")
        for line in sorted(warnings):
            print(f"  {line[:300]}")
        result["warnings"] = sorted(w[:300] for w in warnings)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
