"""``sweep.py``'s command line: read the sweep file, choose the backend, run it.

Exit codes: 0 when the sweep ran (failed trials included; they are recorded), 2 for input
problems (one ``error:`` line), 130 after Ctrl-C (the running trial is stopped and the sweep can
be resumed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sweeps.space import SweepConfig, load_sweep_config
from utils.schema import ConfigError, UserError

SWEEP_DIR = Path(__file__).resolve().parent.parent / "config" / "sweep"
BACKENDS = ("auto", "wandb", "optuna")


def resolve_sweep_file(name: str) -> Path:
    """A path as given, or the name of a file in ``config/sweep/`` (``trm_seeds``)."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml") or "/" in name:
        return path
    return SWEEP_DIR / f"{name}.yaml"


def choose_backend(requested: str) -> str:
    """``auto`` → ``wandb`` when W&B would log online (an API key or netrc entry, no
    ``WANDB_MODE`` saying otherwise), else ``optuna``."""
    if requested != "auto":
        return requested
    from utils.logging import resolve_wandb_mode

    return "wandb" if resolve_wandb_mode("auto") == "online" else "optuna"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its ``--help`` is the usage)."""
    parser = argparse.ArgumentParser(
        prog="sweep.py",
        description="Hyper-parameter sweep over pretrain.py: a W&B Bayesian sweep with an "
        "account, else a local Optuna study (TPE, median pruning, SQLite).",
    )
    parser.add_argument("sweep", help="sweep file, or a name in config/sweep/ (trm_seeds)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every trial")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--trials", type=int, default=None, help="override the file's trials")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="Optuna: sweep folder (default checkpoints/sweeps/<name>)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna: storage URL (default: study.db in the sweep folder)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="Optuna: continue the study of an interrupted sweep"
    )
    parser.add_argument(
        "--create-only",
        action="store_true",
        help="W&B: create the sweep and print the agent command",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the backend's sweep definition and exit"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; ``UserError`` for input problems."""
    config: SweepConfig = load_sweep_config(resolve_sweep_file(args.sweep))
    if args.trials is not None:
        if args.trials < 1:
            raise ConfigError(f"--trials must be at least 1 (got {args.trials})")
        config = config.model_copy(update={"trials": args.trials})
    backend = choose_backend(args.backend)
    if backend == "wandb":
        from sweeps.wandb_backend import run_wandb_sweep, wandb_sweep_dict

        if args.print_config:
            print(json.dumps(wandb_sweep_dict(config, args.overrides), indent=2))
            return 0
        if args.resume or args.output_dir or args.storage:
            raise ConfigError(
                "--resume, --output-dir and --storage are Optuna options; W&B keeps the "
                "sweep's state (rerun its `wandb agent` command)"
            )
        run_wandb_sweep(config, extra_overrides=args.overrides, create_only=args.create_only)
        return 0
    from sweeps.optuna_backend import distributions, run_optuna_sweep

    if args.print_config:
        print(json.dumps({k: repr(v) for k, v in distributions(config).items()}, indent=2))
        return 0
    if args.create_only:
        raise ConfigError("--create-only is a W&B option; the Optuna backend runs its trials")
    sweep_dir = args.output_dir or Path("checkpoints") / "sweeps" / config.name
    outcome = run_optuna_sweep(
        config,
        sweep_dir,
        storage=args.storage,
        resume=args.resume,
        extra_overrides=args.overrides,
    )
    print(f"study '{outcome.study_name}' in {outcome.storage}")
    if outcome.best is None:
        print("no trial completed")
    else:
        best = outcome.best
        print(
            f"best trial {best['number']}: {config.metric.name}={best['value']:.6g} "
            f"{json.dumps(best['params'])} run {best['run_dir']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; input problems print one ``error:`` line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial was stopped; continue with --resume", file=sys.stderr)
        return 130
