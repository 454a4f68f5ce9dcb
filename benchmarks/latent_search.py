"""Test-time latent search: its cost per puzzle and what it adds on truly unseen tasks.

    python -m benchmarks.latent_search                        # tiny config, CPU, 3 seeds
    python -m benchmarks.latent_search --seeds 0 --train-steps 250 --search-steps 50
    python -m benchmarks.latent_search --arc-scale            # timing at ARC scale (GPU)

Per seed, as ``benchmarks.icl`` does: the colour-substitution family of
``dataset.synthetic_tasks`` is built with the strict split and no augmentation on a small canvas,
and a tiny ETRM (``arch=etrm``, standard encoder) and a tiny TRM (``arch=trm``, the same decoder)
train on the training tasks for ``--train-steps`` steps. Each one's EMA weights are then
evaluated on the evaluation tasks, which no run trained on, in one
``training.evaluation.evaluate`` pass over the few-shot evaluation rows (TRM, which reads no
demos, gets them for the search only: ``training.data.create_dataloader``'s ``with_demos``)
with search (``training.latent_search``, ``--search-steps`` steps of ``--lr`` with ``--optimizer``,
``--variable``, ``--init``, leave-one-out; for TRM the search variable is a fresh
puzzle-embedding row, as its evaluation tasks' rows were never trained): exact accuracy without
search (``all/exact_accuracy``, one prediction per query, so pass@1 = pass@2 without
augmentation), with search's first attempt
(``all/tto/exact_accuracy``: pass@1) and with either attempt (``all/tto/exact_accuracy@2``:
pass@2), and the demo log-likelihood before and after. Then the seconds and FLOPs per puzzle of
a search of each ``--timing-steps`` count (1, 5, 20, 100) on the first evaluation batch: one
untimed call, then the median of ``--rounds`` (a puzzle is one query row with its demos; on a
shared CPU the seconds are only indicative).

With TRM among ``--archs``, the trained TRM is also fine-tuned the training loop's way, the
test-time-training baseline the search is measured against: ``training.loop.run_training`` with
``freeze_weights=True`` and ``load_checkpoint`` (the trained run's weights; the puzzle table,
sized for other data, starts every row from its mean embedding, the search's start) trains only
the puzzle embedding for ``--finetune-steps`` steps on the held-out tasks' demonstration pairs
(those tasks alone built with the TRM split policy, so the train split holds their demos as
examples, on the same compact canvas), then its end-of-run evaluation scores their test queries:
``trm_finetune_exact`` (held-out exact accuracy, the figure ``trm_exact_search`` is beside) and
``trm_finetune_seconds`` (the whole fine-tuning run's wall time, data loading and that evaluation
included), beside ``trm_search_seconds`` (the search's wall time over all evaluation rows, FLOP
counting excluded). ``--finetune-steps 0`` leaves them out.

``--arc-scale`` times the search alone at ARC scale (hidden 512, 8 heads, 2 layers, H_cycles 3,
L_cycles 4, 16 ACT steps, 900-token grids with 2..7 demos as ETRM's ARC-AGI-1 evaluation split,
bf16 on CUDA; ``benchmarks.etrm_step``'s preset and batches) on random weights and random
tokens: the cost does not depend on what the weights learned. Demo rollouts run the model's 16
ACT steps unless ``--recursion-steps`` says fewer.

The last line printed is one JSON object: the settings, every seed's figures (``<arch>_...``)
and, per figure, the mean, minimum and maximum over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import etrm_step
from benchmarks.icl import IclSettings, build_family_data, train, train_config
from dataset import build_arc_dataset as arc
from dataset import synthetic_tasks as st
from models.recursive_reasoning.common import ModelDims
from training.checkpointing import evaluation_weights
from training.config import PretrainConfig, load_pretrain_config
from training.data import create_dataloader
from training.evaluation import SearchPlan, evaluate
from training.latent_search import TTOConfig, search
from training.state import TrainState, build_model
from utils.checkpoint import load_checkpoint_files, load_model_weights
from utils.config import compose
from utils.distributed import DistInfo, select_device

TIMING_STEPS = (1, 5, 20, 100)
ARCHS = ("etrm", "trm")
HELD_OUT = "evaluation"  # the family's subset of evaluation tasks (``benchmarks.icl``'s test set)
FINETUNE_STEPS = 40  # batches of 64 over 2 demos x 64 tasks: each row about 20 updates, as search
EXACT, SEARCH_EXACT, SEARCH_EXACT_2 = (
    "all/exact_accuracy",
    "all/tto/exact_accuracy",
    "all/tto/exact_accuracy@2",
)


def _icl_defaults() -> IclSettings:
    return IclSettings(steps=150)


@dataclass(frozen=True)
class SearchSettings:
    """One measurement: the ICL runs it searches (``benchmarks.icl.IclSettings``; fewer training
    steps than ``tests/test_icl.py``'s 250, so that the model has something left to find) and
    the search's options (``tto``, whose ``steps`` is the accuracy run's); ``finetune_steps``
    the TRM fine-tuning baseline's steps (0: none)."""

    icl: IclSettings = field(default_factory=_icl_defaults)
    tto: TTOConfig = field(default_factory=lambda: TTOConfig(steps=20))
    timing_steps: tuple[int, ...] = TIMING_STEPS
    rounds: int = 3
    finetune_steps: int = FINETUNE_STEPS


def load_trained(config: PretrainConfig, checkpoint: Path) -> tuple[TrainState, Any]:
    """The checkpoint's EMA weights in a fresh model, and its few-shot test loader
    (``training.data.create_dataloader(..., with_demos=True)``)."""
    dist_info = DistInfo()
    shared, _ = load_checkpoint_files(checkpoint, rank=0)
    loader, data = create_dataloader(config, "test", dist_info, test_set_mode=True, with_demos=True)
    head, family = build_model(config, data, dist_info)
    load_model_weights(head, evaluation_weights(shared, use_ema=True), resize_puzzle_emb=False,
                       source=str(checkpoint))  # fmt: skip
    head.eval()
    return TrainState(head, family, family.capabilities(config.arch, head)), loader


def accuracy_with_search(
    config: PretrainConfig, state: TrainState, loader: Any, tto: TTOConfig
) -> dict[str, float]:
    """One evaluation pass with search: the plain and the searched metrics side by side."""
    result = evaluate(config, state, loader, [], DistInfo(), None, SearchPlan(tto))
    return result.metrics


def time_search(
    head: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    tto: TTOConfig,
    step_counts: Sequence[int],
    rounds: int,
) -> dict[str, float | None]:
    """Seconds (median of ``rounds`` after one untimed call) and FLOPs per searched row of a
    search of each step count on ``batch``: ``seconds_per_puzzle@N``, ``flops_per_puzzle@N``."""
    out: dict[str, float | None] = {}
    for steps in step_counts:
        timed = tto.model_copy(update={"steps": steps, "count_flops": False})
        with torch.inference_mode():
            search(head, batch, timed)
            seconds = []
            for _ in range(rounds):
                found = search(head, batch, timed)
                seconds.append(found.seconds)
            counting = tto.model_copy(update={"steps": steps, "count_flops": True})
            counted = search(head, batch, counting)
        rows = max(int(found.searched.sum()), 1)
        out[f"seconds_per_puzzle@{steps}"] = round(statistics.median(seconds) / rows, 5)
        flops = counted.flops
        out[f"flops_per_puzzle@{steps}"] = None if flops is None else float(flops) / rows
    return out


def build_finetune_data(family_root: Path, settings: IclSettings, seed: int) -> Path:
    """The held-out tasks of ``build_family_data``'s family (``family_root/tasks``) alone, built
    with the TRM split policy (train split: their demonstration pairs; test split: their test
    queries) and moved to the benchmark's canvas; returns the folder to fine-tune on."""
    data = family_root / "finetune_data"
    arc.build(
        arc.BuildConfig(
            output_dir=str(data),
            subsets=[HELD_OUT],
            test_set_names=(HELD_OUT,),
            input_dir=str(family_root / "tasks"),
            seed=seed,
            num_aug=0,
            split_policy="trm",
            overwrite=True,
        )
    )
    if settings.canvas_side < st.ARC_CANVAS:
        data = st.compact_canvas(
            data, family_root / "finetune_compact", settings.canvas_side, overwrite=True
        )
    return data


def finetune_trm(
    checkpoint: Path, data: Path, run_dir: Path, settings: SearchSettings, seed: int
) -> dict[str, float]:
    """Fine-tune the trained TRM at ``checkpoint`` with the training loop, only its puzzle
    embedding (``freeze_weights``), for ``settings.finetune_steps`` steps on ``data``
    (``build_finetune_data``): ``finetune_exact`` (its end-of-run held-out exact accuracy) and
    ``finetune_seconds`` (the run's wall time)."""
    icl = replace(
        settings.icl,
        steps=settings.finetune_steps,
        train_tasks=settings.icl.eval_tasks,  # its groups: the one iteration reaches the steps
        overrides=(
            *settings.icl.overrides,
            "freeze_weights=True",
            f"+load_checkpoint={checkpoint}",
        ),
    )
    config = train_config("trm", data, run_dir, icl, seed)
    started = time.perf_counter()
    outcome = train(config)
    return {
        "finetune_exact": outcome.eval_metrics[EXACT],
        "finetune_seconds": round(time.perf_counter() - started, 1),
    }


def search_arch(
    arch: str, data: Path, run_dir: Path, settings: SearchSettings, seed: int
) -> dict[str, float | None]:
    """Train ``arch`` on ``data``, then evaluate it with search and time the search; the
    figures of the module docstring, unprefixed (TRM's fine-tuning baseline included)."""
    config = train_config(arch, data, run_dir, settings.icl, seed)
    started = time.perf_counter()
    outcome = train(config)
    trained = round(time.perf_counter() - started, 1)
    assert outcome.last_checkpoint is not None
    state, loader = load_trained(config, outcome.last_checkpoint)
    tto = settings.tto.model_copy(update={"seed": seed})
    metrics = accuracy_with_search(config, state, loader, tto)
    out: dict[str, float | None] = {
        "train_seconds": trained,
        "puzzles": metrics["tto/puzzles"],
        "exact_no_search": metrics[EXACT],
        "pass@2_no_search": metrics[EXACT],  # one prediction per query without augmentation
        "exact_search": metrics[SEARCH_EXACT],
        "pass@2_search": metrics[SEARCH_EXACT_2],
        "demo_loglik_start": metrics["tto/demo_loglik_start"],
        "demo_loglik_best": metrics["tto/demo_loglik_best"],
        "best_is_start": metrics["tto/best_is_start"],
        "search_seconds": round(metrics["tto/seconds_per_puzzle"] * metrics["tto/puzzles"], 3),
    }
    if arch == "trm" and settings.finetune_steps > 0:
        tuned = build_finetune_data(run_dir.parent, settings.icl, seed)
        out.update(
            finetune_trm(outcome.last_checkpoint, tuned, run_dir.parent / "trm_finetune",
                         settings, seed)
        )  # fmt: skip
    _, batch, _ = next(iter(loader))
    out.update(time_search(state.model, batch, tto, settings.timing_steps, settings.rounds))
    return out


def run_seed(
    root: Path, settings: SearchSettings, seed: int, archs: Sequence[str] = ARCHS
) -> dict[str, float | None]:
    """Build one seed's family, then train, search-evaluate and time each model of ``archs``:
    ``seed``, ``demo_free_bound`` and ``<arch>_<figure>`` for the module docstring's figures."""
    data, bound = build_family_data(root / f"seed{seed}", settings.icl, seed)
    out: dict[str, float | None] = {"seed": seed, "demo_free_bound": bound}
    for arch in archs:
        figures = search_arch(arch, data, root / f"seed{seed}" / arch, settings, seed)
        out.update({f"{arch}_{k}": v for k, v in figures.items()})
    return out


def arc_scale_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds and FLOPs per puzzle at ARC scale on random weights and tokens."""
    device = select_device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    overrides = ["arch=etrm", "arch.encoder_type=standard", *etrm_step.ARC_ARCH,
                 f"arch.forward_dtype={dtype}", f"global_batch_size={args.batch_size}",
                 f"max_demos={args.max_demos}", "logger=none"]  # fmt: skip
    config = load_pretrain_config(compose(overrides=overrides))
    dims = ModelDims(args.batch_size, etrm_step.SEQ_LEN, etrm_step.VOCAB,
                     num_puzzle_identifiers=etrm_step.PUZZLES)  # fmt: skip
    state = etrm_step.bench_state(config, dims, device)
    state.model.eval()
    counts = etrm_step.demo_counts(etrm_step.ARC_TEST_DEMO_COUNTS, args.batch_size, args.max_demos)
    batch = etrm_step.demo_batch(counts, args.max_demos, 0, device)
    tto = TTOConfig(steps=1, lr=args.lr, optimizer=args.optimizer, variable=args.variable,
                    init=args.init, recursion_steps=args.recursion_steps)  # fmt: skip
    return {
        "device": str(device),
        "forward_dtype": dtype,
        "rows": args.batch_size,
        "mean_demos": etrm_step.mean_demos([batch]),
        **time_search(state.model, batch, tto, args.timing_steps, args.rounds),
    }


def summarise(runs: list[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """Mean, minimum and maximum over seeds of every numeric figure but the seed."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if key != "seed" and values:
            out[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    defaults = SearchSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--workdir", help="keep the data and runs here (default: a temporary folder)")
    p.add_argument("--arc-scale", action="store_true", help="time the search at ARC scale only")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16, help="--arc-scale: rows searched at once")
    p.add_argument("--max-demos", type=int, default=7, help="--arc-scale: demo slots")
    p.add_argument("--train-steps", type=int, default=defaults.icl.steps)
    p.add_argument("--train-tasks", type=int, default=defaults.icl.train_tasks)
    p.add_argument("--eval-tasks", type=int, default=defaults.icl.eval_tasks)
    p.add_argument("--hidden-size", type=int, default=defaults.icl.hidden_size)
    p.add_argument("--search-steps", type=int, default=defaults.tto.steps)
    p.add_argument("--lr", type=float, default=defaults.tto.lr)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=defaults.tto.optimizer)
    p.add_argument("--variable", choices=["context", "latent", "offset"],
                   default=defaults.tto.variable)  # fmt: skip
    p.add_argument("--init", choices=["mean", "each_demo", "perturbed"],
                   default=defaults.tto.init)  # fmt: skip
    p.add_argument("--recursion-steps", type=int, default=None)
    p.add_argument("--timing-steps", type=int, nargs="+", default=list(defaults.timing_steps))
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps,
                   help="TRM: steps of the freeze_weights fine-tuning (0: none)")  # fmt: skip
    a = p.parse_args(argv)
    if a.arc_scale:
        print(json.dumps({"settings": vars(a), "arc_scale": arc_scale_timing(a)}))
        return
    icl = replace(defaults.icl, steps=a.train_steps, train_tasks=a.train_tasks,
                  eval_tasks=a.eval_tasks, hidden_size=a.hidden_size)  # fmt: skip
    tto = TTOConfig(steps=a.search_steps, lr=a.lr, optimizer=a.optimizer, variable=a.variable,
                    init=a.init, recursion_steps=a.recursion_steps)  # fmt: skip
    settings = SearchSettings(icl, tto, tuple(a.timing_steps), a.rounds, a.finetune_steps)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_latent_search_") as tmp:
        root = Path(a.workdir) if a.workdir else Path(tmp)
        for seed in a.seeds:
            figures = run_seed(root, settings, seed, a.archs)
            print(json.dumps(figures), flush=True)
            runs.append(figures)
    report = {"settings": _jsonable(asdict(settings)), "runs": runs, "summary": summarise(runs)}
    print(json.dumps(report))


def _jsonable(value: Any) -> Any:
    """``asdict`` output with the pydantic search options as plain data."""
    if isinstance(value, TTOConfig):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    main()
