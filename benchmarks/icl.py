"""In-context learning on truly unseen tasks: ETRM against TRM and the best demo-free model.

    python -m benchmarks.icl                               # tests/test_icl.py's settings, 3 seeds
    python -m benchmarks.icl --heldout-offsets 2 5 8 --steps 3000 --hidden-size 64  # new rules
    python -m benchmarks.icl --seeds 0 --H-cycles 2 --halt-max-steps 2 --steps 400

Per seed: the colour-substitution family of ``dataset.synthetic_tasks`` is drawn, built by
``dataset.build_arc_dataset`` with the strict split and no augmentation (colour permutations
would map training rules onto held-out ones), and moved onto a small canvas
(``dataset.synthetic_tasks.compact_canvas``). A tiny ETRM (``arch=etrm``, standard encoder)
and a tiny TRM (``arch=trm``, puzzle embedding) train on the training tasks with the same
decoder, batch, steps and learning rate, and are scored on the evaluation tasks, which no run
trains on. TRM's embedding rows of those tasks are never trained, so TRM is demo-free there.
Two more demo-free references: the exact Bayes rate of any model that sees only the query input
(``dataset.synthetic_tasks.demo_free_bound``) and the trained ETRM evaluated with every
demonstration masked out (the same weights, nothing for the encoder to read).

The score is exact accuracy (``all/exact_accuracy``): over the evaluation tasks' queries for
ETRM, over every stored pair of those tasks for TRM (it reads no demos, so all are alike).
On the 30 × 30 canvas (``--canvas-side 30``) the ARC evaluator's ``ARC/pass@1`` is reported too;
without augmentation it has no votes to count, so it is each task's solved fraction of test
pairs, averaged over tasks.

The last line printed is one JSON object: the settings, every run's figures and, per figure,
the mean, minimum and maximum over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from dataset import build_arc_dataset as arc
from dataset import synthetic_tasks as st
from evaluators.base import build_evaluators
from training.checkpointing import evaluation_weights
from training.config import PretrainConfig, load_pretrain_config
from training.data import create_dataloader
from training.evaluation import evaluate
from training.loop import RunOutcome, run_training
from training.state import TrainState, build_model
from utils.checkpoint import load_checkpoint_files, load_model_weights
from utils.config import compose
from utils.distributed import DistInfo
from utils.logging import build_logger

EXACT = "all/exact_accuracy"
PASS_AT_1 = "ARC/pass@1"
ARCHS = ("etrm", "trm")


def _default_family() -> st.SubstitutionFamily:
    return st.SubstitutionFamily(min_side=2, max_side=3, num_demos=2, heldout_offsets=())


@dataclass(frozen=True)
class IclSettings:
    """One comparison: the task family and what both models share.

    ``steps`` optimizer steps of ``batch_size`` items; the decoder is ``+experiment=tiny_cpu``'s
    with these sizes and ``context_tokens`` prefix tokens (``arch.puzzle_emb_len``);
    ``encoder_layers`` is the standard encoder's depth (ETRM only), ``puzzle_emb_lr`` the
    sign-SGD rate of TRM's embedding rows. ``canvas_side`` below 30 moves the build onto a
    smaller canvas, scored by exact accuracy only (the ARC evaluator reads 30 × 30 canvases).

    The defaults are ``tests/test_icl.py``'s: 2 × 2 and 3 × 3 grids on a 4 × 4 canvas, two demos,
    evaluation tasks drawn from the training tasks' 72 rules, and a decoder with one recursion
    (T = n = 1) and one supervision step per item (N_sup = 1), which reads the demos within
    250 steps; ``H_cycles=2, halt_max_steps=2`` needs about 400.
    """

    family: st.SubstitutionFamily = field(default_factory=_default_family)
    train_tasks: int = 1000
    eval_tasks: int = 64
    canvas_side: int = 4
    steps: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 10
    hidden_size: int = 32
    num_heads: int = 2
    H_cycles: int = 1
    L_cycles: int = 1
    halt_max_steps: int = 1
    context_tokens: int = 4
    encoder_layers: int = 1
    puzzle_emb_lr: float = 0.1
    overrides: tuple[str, ...] = ()


def build_family_data(root: Path, settings: IclSettings, seed: int) -> tuple[Path, float]:
    """Draw the family into ``root/tasks``, build ``root/data`` (strict split, no augmentation)
    and, below a 30 × 30 canvas, ``root/compact``; returns the folder to train on and the
    demo-free bound on its evaluation tasks."""
    generated = st.generate(settings.family, settings.train_tasks, settings.eval_tasks, seed)
    tasks = st.write_family(generated, root / "tasks", overwrite=True)
    data = root / "data"
    arc.build(
        arc.BuildConfig(
            output_dir=str(data),
            subsets=list(st.SUBSETS),
            test_set_names=("evaluation",),
            input_dir=str(tasks),
            seed=seed,
            num_aug=0,
            split_policy="strict",
            overwrite=True,
        )
    )
    if settings.canvas_side < st.ARC_CANVAS:
        data = st.compact_canvas(data, root / "compact", settings.canvas_side, overwrite=True)
    bound = float(st.demo_free_bound(settings.family, settings.family.rule_split()[1]))
    return data, bound


def arch_overrides(arch: str, settings: IclSettings) -> list[str]:
    """What differs between the two models: the conditioner and its optimizer."""
    if arch == "trm":
        return ["arch=trm", f"puzzle_emb_lr={settings.puzzle_emb_lr}"]
    if arch == "etrm":
        return [
            "arch=etrm",
            "arch.encoder_type=standard",
            f"arch.encoder_num_layers={settings.encoder_layers}",
            f"max_demos={settings.family.num_demos}",
        ]
    raise ValueError(f"unknown model {arch!r}; choose one of {ARCHS}")


def train_config(
    arch: str, data: Path, run_dir: Path, settings: IclSettings, seed: int
) -> PretrainConfig:
    """The run's validated config: one iteration that reaches ``steps`` steps, then one
    evaluation and one checkpoint."""
    # Every epoch has at least one query per training task, so these epochs reach max_steps.
    epochs = -(-settings.steps * settings.batch_size // settings.train_tasks) + 1
    overrides = [
        "+experiment=tiny_cpu",
        *arch_overrides(arch, settings),
        "logger=none",
        "data_workers=0",
        f"data_paths=[{data}]",
        f"+checkpoint_path={run_dir}",
        f"seed={seed}",
        f"global_batch_size={settings.batch_size}",
        f"epochs={epochs}",
        f"eval_interval={epochs}",
        f"max_steps={settings.steps}",
        f"lr={settings.lr}",
        f"lr_warmup_steps={settings.warmup_steps}",
        f"arch.hidden_size={settings.hidden_size}",
        f"arch.num_heads={settings.num_heads}",
        f"arch.H_cycles={settings.H_cycles}",
        f"arch.L_cycles={settings.L_cycles}",
        f"arch.halt_max_steps={settings.halt_max_steps}",
        f"arch.puzzle_emb_len={settings.context_tokens}",
        *([] if settings.canvas_side == st.ARC_CANVAS else ["evaluators=[]"]),
        *settings.overrides,
    ]
    return load_pretrain_config(compose(overrides=overrides))


def train(config: PretrainConfig) -> RunOutcome:
    """``run_training`` in this process with the configured evaluators and no W&B."""
    assert config.checkpoint_path is not None
    logger = build_logger("none", project="icl", run_name="icl", config={},
                          run_dir=config.checkpoint_path, is_main=True)  # fmt: skip
    return run_training(
        config,
        DistInfo(),
        logger=logger,
        evaluators_factory=lambda data: build_evaluators(
            config.evaluators, data.config.dataset_paths, data.identifier_offsets
        ),
    )


def _without_demos(loader: Iterable) -> Iterator:
    """The loader's batches with every demonstration slot marked empty."""
    for set_name, batch, global_effective in loader:
        masked = {**batch, "demo_mask": torch.zeros_like(batch["demo_mask"])}
        yield set_name, masked, global_effective


def evaluate_without_demos(config: PretrainConfig, checkpoint: Path) -> dict[str, float]:
    """The metrics of a demonstration-reading checkpoint on its test split with every demo
    masked: the same weights, made demo-free."""
    dist_info = DistInfo()
    shared, _ = load_checkpoint_files(checkpoint, rank=0)
    loader, data = create_dataloader(config, "test", dist_info, test_set_mode=True)
    head, family = build_model(config, data, dist_info)
    load_model_weights(head, evaluation_weights(shared, use_ema=True), resize_puzzle_emb=False,
                       source=str(checkpoint))  # fmt: skip
    state = TrainState(head, family, family.capabilities(config.arch, head))
    evaluators = build_evaluators(
        config.evaluators, data.config.dataset_paths, data.identifier_offsets
    )
    result = evaluate(config, state, _without_demos(loader), evaluators, dist_info, None)
    return result.metrics


def train_accuracy(run_dir: Path, last: int = 20) -> float:
    """Mean training exact accuracy (at halting) over the last ``last`` logged steps."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [m["train/exact_accuracy"] for m in lines if "train/exact_accuracy" in m]
    return statistics.fmean(values[-last:]) if values else float("nan")


def run_seed(
    root: Path, settings: IclSettings, seed: int, archs: Sequence[str] = ARCHS
) -> dict[str, float]:
    """Build the data, then train and evaluate every model of ``archs``, for one seed.

    Keys: ``seed``, ``demo_free_bound``, ``eval_queries`` (the evaluation tasks' test pairs);
    per model ``<arch>_exact`` (held-out exact accuracy), ``<arch>_train_exact`` and
    ``<arch>_seconds``; for ETRM ``etrm_masked_exact`` (demos masked at evaluation); on the
    30 × 30 canvas ``<arch>_pass@1`` and ``etrm_masked_pass@1`` too.
    """
    data, bound = build_family_data(root / f"seed{seed}", settings, seed)
    tasks = json.loads((data / "test_puzzles.json").read_text())
    out: dict[str, float] = {
        "seed": seed,
        "demo_free_bound": bound,
        "eval_queries": sum(len(task["test"]) for task in tasks.values()),
    }
    for arch in archs:
        run_dir = root / f"seed{seed}" / arch
        config = train_config(arch, data, run_dir, settings, seed)
        started = time.perf_counter()
        outcome = train(config)
        out[f"{arch}_seconds"] = round(time.perf_counter() - started, 1)
        out[f"{arch}_exact"] = outcome.eval_metrics[EXACT]
        out[f"{arch}_train_exact"] = train_accuracy(run_dir)
        if PASS_AT_1 in outcome.eval_metrics:
            out[f"{arch}_pass@1"] = outcome.eval_metrics[PASS_AT_1]
        if arch == "etrm":
            assert outcome.last_checkpoint is not None
            masked = evaluate_without_demos(config, outcome.last_checkpoint)
            out["etrm_masked_exact"] = masked[EXACT]
            if PASS_AT_1 in masked:
                out["etrm_masked_pass@1"] = masked[PASS_AT_1]
    return out


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, minimum and maximum over seeds of every figure but the seed."""
    return {
        key: {
            "mean": statistics.fmean(r[key] for r in runs),
            "min": min(r[key] for r in runs),
            "max": max(r[key] for r in runs),
        }
        for key in runs[0]
        if key != "seed"
    }


def main(argv: Sequence[str] | None = None) -> None:
    defaults = IclSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--workdir", help="keep the data and runs here (default: a temporary folder)")
    p.add_argument("--heldout-offsets", type=int, nargs="*",
                   default=list(defaults.family.heldout_offsets),
                   help="steps (B - A) mod 9 of the rules only evaluation tasks get")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for every model (repeatable)")  # fmt: skip
    family_fields = [f.name for f in fields(st.SubstitutionFamily) if f.name != "heldout_offsets"]
    settings_fields = [f.name for f in fields(IclSettings) if f.name not in ("family", "overrides")]
    for name in family_fields + settings_fields:
        owner = defaults.family if name in family_fields else defaults
        value = getattr(owner, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    a = vars(p.parse_args(argv))
    family = st.SubstitutionFamily(
        heldout_offsets=tuple(a["heldout_offsets"]), **{k: a[k] for k in family_fields}
    )
    settings = IclSettings(
        family=family, overrides=tuple(a["overrides"]), **{k: a[k] for k in settings_fields}
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_icl_") as tmp:
        root = Path(a["workdir"]) if a["workdir"] else Path(tmp)
        for seed in a["seeds"]:
            figures = run_seed(root, settings, seed, a["archs"])
            print(json.dumps(figures), flush=True)
            runs.append(figures)
    print(json.dumps({"settings": asdict(settings), "runs": runs, "summary": summarise(runs)}))


if __name__ == "__main__":
    main()
