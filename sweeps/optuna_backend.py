"""The local backend: an Optuna study (TPE sampler, median pruner, SQLite storage) whose trials
are ``pretrain.py`` launches.

The sweep folder holds ``study.db`` (the study: every trial's state, parameters, reported
evaluations and value), ``trials.jsonl`` (one line per finished trial), ``best.json`` (the best
completed trial so far) and one run folder per trial, ``trial_NNNN/`` (checkpoints,
``metrics.jsonl``, ``train.log``). An interrupted sweep resumes the same study: trials it left
running are marked failed and their parameters queued again, and the sweep runs until the study
has ``trials`` finished trials.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.launcher import TrialResult, run_trial, trial_command, trial_overrides
from sweeps.space import CategoricalParam, SweepConfig, to_overrides
from sweeps.trial_config import check_trial_overrides
from utils.schema import ConfigError

STUDY_FILE = "study.db"
TRIALS_FILE = "trials.jsonl"
BEST_FILE = "best.json"


def default_storage(sweep_dir: Path) -> str:
    """``sqlite:///<sweep_dir>/study.db``."""
    return f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def trial_dir(sweep_dir: Path, number: int) -> Path:
    """The run folder of trial ``number``."""
    return sweep_dir / f"trial_{number:04d}"


def distributions(config: SweepConfig) -> dict[str, Any]:
    """The search space as Optuna distributions, in the file's order."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for key, spec in config.parameters.items():
        if isinstance(spec, CategoricalParam):
            out[key] = CategoricalDistribution(spec.values)
        elif spec.type == "int":
            step = int(spec.step) if spec.step is not None else 1
            out[key] = IntDistribution(int(spec.min), int(spec.max), log=spec.log, step=step)
        else:
            out[key] = FloatDistribution(spec.min, spec.max, log=spec.log, step=spec.step)
    return out


def make_pruner(config: SweepConfig) -> Any:
    """The study's pruner (``MedianPruner`` or ``NopPruner``)."""
    import optuna

    p = config.pruner
    if p.type == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials,
        n_warmup_steps=p.n_warmup_steps,
        interval_steps=p.interval_steps,
    )


def _space_record(config: SweepConfig) -> dict[str, Any]:
    """What a resumed study must share with the file it was created from."""
    dumped = config.model_dump(mode="json")
    return {"parameters": dumped["parameters"], "metric": dumped["metric"]}


@dataclass
class SweepOutcome:
    """The study after a sweep: its name, storage URL and best trial record (None if none
    completed)."""

    study_name: str
    storage: str
    best: dict[str, Any] | None


def _prepare_dir(sweep_dir: Path, storage: str | None, resume: bool) -> None:
    """Refuse to start a new sweep in a non-empty folder or to resume one that is not there;
    never deletes anything."""
    if resume:
        if storage is None and not (sweep_dir / STUDY_FILE).is_file():
            raise ConfigError(
                f"--resume: {sweep_dir / STUDY_FILE} does not exist; give the sweep folder of "
                f"the sweep to resume (--output-dir) or its --storage"
            )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(
            f"sweep folder {sweep_dir} is not empty: pass --resume to continue its study, or "
            f"choose another --output-dir"
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)


def _record(trial: Any, state: str, result: TrialResult | None, **extra: Any) -> dict[str, Any]:
    values = result.values if result is not None else []
    return {
        "number": trial.number,
        "state": state,
        "params": dict(trial.params),
        "value": result.value if result is not None and state != "failed" else None,
        "values": [[step, value] for step, value in values],
        **extra,
    }


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _best_record(study: Any, config: SweepConfig, sweep_dir: Path) -> dict[str, Any] | None:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    return {
        "number": best.number,
        "params": best.params,
        "value": best.value,
        "metric": config.metric.name,
        "goal": config.metric.goal,
        "run_dir": str(trial_dir(sweep_dir, best.number)),
    }


def _requeue_interrupted(study: Any, sweep_dir: Path) -> None:
    """Trials a stopped sweep left running become failed, and their parameters run again."""
    import optuna
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        optuna.trial.Trial(study, trial._trial_id).set_user_attr("interrupted", True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params))
        reason = "interrupted; parameters queued again"
        _append(sweep_dir / TRIALS_FILE, _record(trial, "failed", None, reason=reason))


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=done)
    return sum(1 for t in trials if not t.user_attrs.get("interrupted"))


def run_optuna_sweep(
    config: SweepConfig,
    sweep_dir: Path,
    *,
    storage: str | None = None,
    resume: bool = False,
    extra_overrides: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run the sweep until its study holds ``config.trials`` finished trials (complete, pruned
    or failed); with ``resume``, continue the study already in ``storage``.

    Each trial's command line is ``base_overrides + extra_overrides + sampled`` and is checked
    with ``pretrain.py``'s schema before launch; a refused or failing trial is recorded as
    failed (with its reason and log) and the sweep goes on. A trial reports every evaluation of
    ``config.metric`` to the pruner and is stopped as soon as it says so; its score is its last
    evaluation.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _prepare_dir(sweep_dir, storage, resume)
    url = storage or default_storage(sweep_dir)
    base = [*config.base_overrides, *(extra_overrides or [])]
    # Every trial would be refused alike when the base is wrong: say so once, before any launch.
    probe = {k: _first_value(spec) for k, spec in config.parameters.items()}
    try:
        check_trial_overrides(trial_overrides(base, to_overrides(probe), "probe", sweep_dir))
    except ConfigError as e:
        raise ConfigError(f"the base overrides, each parameter at its first value: {e}") from None

    sampler = optuna.samplers.TPESampler(
        n_startup_trials=config.sampler.n_startup_trials, seed=config.sampler.seed
    )
    study = None
    if resume:
        try:
            study = optuna.load_study(
                study_name=config.name, storage=url, sampler=sampler, pruner=make_pruner(config)
            )
        except KeyError:
            raise ConfigError(
                f"--resume: storage {url} has no study named '{config.name}'"
            ) from None
    if study is None:
        try:
            study = optuna.create_study(
                storage=url,
                study_name=config.name,
                sampler=sampler,
                pruner=make_pruner(config),
                direction=config.metric.goal,
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise ConfigError(
                f"storage {url} already has a study named '{config.name}': pass --resume to "
                f"continue it, or rename the sweep (name: in the sweep file)"
            ) from None
        study.set_user_attr("space", _space_record(config))
        for point in config.enqueue:
            study.enqueue_trial(point)
    elif study.user_attrs.get("space") != _space_record(config):
        raise ConfigError(
            f"--resume: study '{config.name}' in {url} was created with other parameters or "
            f"another metric; resume with the sweep file it was made from"
        )
    _requeue_interrupted(study, sweep_dir)

    space = distributions(config)
    while _finished(study) < config.trials:
        trial = study.ask(space)
        run_dir = trial_dir(sweep_dir, trial.number)
        log_path = run_dir / "train.log"
        params = {k: trial.params[k] for k in config.parameters}
        overrides = trial_overrides(base, to_overrides(params), run_dir.name, run_dir)
        shown = " ".join(to_overrides(params))
        echo(f"trial {trial.number}: {shown}")
        try:
            check_trial_overrides(overrides)
        except ConfigError as e:
            trial.set_user_attr("reason", str(e))
            study.tell(trial, state=TrialState.FAIL)
            _append(sweep_dir / TRIALS_FILE, _record(trial, "failed", None, reason=str(e)))
            echo(f"trial {trial.number}: failed, refused: {e}")
            continue

        def pruned(step: int, value: float, trial: Any = trial) -> bool:
            trial.report(value, step)
            return bool(trial.should_prune())

        result = run_trial(
            trial_command(config.launcher, config.nproc_per_node, overrides),
            run_dir,
            log_path,
            config.metric.name,
            pruned,
            timeout_s=config.timeout_s,
            kill_grace_s=config.kill_grace_s,
        )
        paths = {"run_dir": str(run_dir), "log": str(log_path)}
        for key, value in paths.items():
            trial.set_user_attr(key, value)
        if result.status == "complete":
            study.tell(trial, result.value)
            state = "complete"
        elif result.status == "stopped":
            study.tell(trial, state=TrialState.PRUNED)
            state = "pruned"
        else:
            trial.set_user_attr("reason", result.reason)
            study.tell(trial, state=TrialState.FAIL)
            state = "failed"
        record = _record(
            trial, state, result, **paths, returncode=result.returncode, reason=result.reason
        )
        _append(sweep_dir / TRIALS_FILE, record)
        score = "" if record["value"] is None else f" {config.metric.name}={record['value']:.6g}"
        note = f" ({result.reason})" if result.reason else ""
        echo(f"trial {trial.number}: {state}{score}{note}")
        best = _best_record(study, config, sweep_dir)
        if best is not None:
            (sweep_dir / BEST_FILE).write_text(json.dumps(best, indent=2) + "\n")

    best = _best_record(study, config, sweep_dir)
    return SweepOutcome(config.name, url, best)


def _first_value(spec: Any) -> Any:
    """A value of the parameter, to check the base overrides with."""
    if isinstance(spec, CategoricalParam):
        return spec.values[0]
    return int(spec.min) if spec.type == "int" else spec.min
