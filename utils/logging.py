"""Run naming, metric loggers (W&B, JSON lines, none) and the rank-0 progress bar.

Upstream calls ``wandb.init`` unconditionally on rank 0, so a machine without a W&B login either
prompts or needs ``WANDB_MODE``. Here the mode is chosen without network access
(``resolve_wandb_mode``), rank 0 always also writes ``metrics.jsonl``, and other ranks get a
``NullLogger``. Loggers create nothing (files, folders, W&B runs) before their first metrics,
so a run that fails at start-up leaves no run folder. ``wandb`` is imported only when a
``WandbLogger`` is built.
"""

from __future__ import annotations

import json
import math
import netrc
import numbers
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import coolname
from tqdm import tqdm

from utils.schema import ConfigError

WANDB_MODES = ("online", "offline", "disabled")
LOGGER_KINDS = ("wandb", "wandb_offline", "none")
_REQUESTED_MODES = {
    "auto": "auto",
    "online": "online",
    "offline": "offline",
    "none": "disabled",
    "disabled": "disabled",
}
# WANDB_MODE values that wandb itself accepts, mapped to the three modes used here.
_ENV_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def default_project_name(data_paths: Sequence[str]) -> str:
    """Upstream's W&B project, from the first dataset folder.

    ``["data/sudoku-extreme-1k-aug-1000/"]`` → ``"Sudoku-extreme-1k-aug-1000-ACT-torch"``.
    """
    if not data_paths:
        raise ConfigError("data_paths is empty: give at least one dataset folder")
    return f"{os.path.basename(data_paths[0].rstrip('/' + os.sep)).capitalize()}-ACT-torch"


def default_run_name(model_class_name: str, rng: random.Random | None = None) -> str:
    """Upstream's run name ``"<model_class_name> <adjective>-<noun>"``.

    The slug comes from coolname; with ``rng`` it is drawn from that generator (deterministic),
    otherwise from the global ``random`` module, as upstream.
    """
    if rng is None:
        return f"{model_class_name} {coolname.generate_slug(2)}"
    coolname.replace_random(rng)
    try:
        return f"{model_class_name} {coolname.generate_slug(2)}"
    finally:
        coolname.replace_random(None)


def _wandb_api_key_available() -> bool:
    """Whether wandb would find credentials (env var or netrc entry), read locally, no network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(requested: str) -> str:
    """Map ``auto|online|offline|none|disabled`` to the wandb mode ``online|offline|disabled``.

    ``none``/``disabled`` always disable. Otherwise a ``WANDB_MODE`` environment variable wins;
    ``auto`` means online only when an API key is available locally, else offline. Online without
    a key raises, because wandb would then stop and prompt for a login.
    """
    if requested not in _REQUESTED_MODES:
        raise ConfigError(f"unknown W&B mode {requested!r}; choose one of {list(_REQUESTED_MODES)}")
    mode = _REQUESTED_MODES[requested]
    if mode == "disabled":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        if env_mode not in _ENV_MODES:
            raise ConfigError(f"WANDB_MODE={env_mode!r} is not one of {list(_ENV_MODES)}")
        mode = _ENV_MODES[env_mode]
    has_key = _wandb_api_key_available()
    if mode == "auto":
        mode = "online" if has_key else "offline"
    if mode == "online" and not has_key:
        raise ConfigError(
            "W&B online mode needs an API key: run `wandb login` or set WANDB_API_KEY, "
            "or log offline (WANDB_MODE=offline) and `wandb sync` later"
        )
    return mode


@runtime_checkable
class RunLogger(Protocol):
    """Where rank 0 sends scalar metrics (``{"train/lm_loss": 0.5, ...}`` at a step) and config."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullLogger:
    """Drops everything: non-main ranks, and runs that want no logging at all."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Ignore ``metrics``."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Ignore ``config``."""

    def finish(self) -> None:
        """Nothing to close."""


def _json_number(value: Any) -> int | float | str:
    """Integers stay integers; other values become floats, non-finite ones the strings
    ``"NaN"``/``"Infinity"``/``"-Infinity"``: strict JSON has no NaN, and ``float()`` reads them.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    number = float(value)
    if math.isfinite(number):
        return number
    return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")


class JsonlLogger:
    """Appends ``{"step": step, **metrics}`` as one strict-JSON line per ``log`` call to ``path``.

    Nothing is created before the first ``log`` or ``log_config`` call (a run that fails its
    start-up checks leaves no folder behind); ``config``, if given, is written to
    ``<stem>.config.json`` then. The file is opened in append mode and flushed after every
    line, so a resumed run continues the same file and a crash loses nothing. ``log_config``
    merges into ``<stem>.config.json``.
    """

    def __init__(
        self, path: str | os.PathLike[str], config: Mapping[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self._file: Any = None
        self._pending_config = dict(config) if config is not None else None

    def _open(self) -> Any:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            if self._pending_config is not None:
                self.log_config({})
        return self._file

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write one line with ``step`` and every metric as a number."""
        record = {"step": int(step)} | {key: _json_number(v) for key, v in metrics.items()}
        file = self._open()
        file.write(json.dumps(record, allow_nan=False) + "\n")
        file.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Merge ``config`` into ``<stem>.config.json``; values JSON cannot hold become str."""
        config_path = self.path.with_suffix(".config.json")
        config_path.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(config_path.read_text()) if config_path.exists() else {}
        merged.update(self._pending_config or {})
        self._pending_config = None
        merged.update(config)
        config_path.write_text(json.dumps(merged, indent=2, default=str) + "\n")

    def finish(self) -> None:
        """Close the file (if anything was logged)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbLogger:
    """A W&B run, as upstream: ``wandb.init(project, name=run_name, config, _disable_stats)``.

    ``mode`` is ``online``, ``offline`` or ``disabled`` (see ``resolve_wandb_mode``); the run's
    files go under ``run_dir/wandb``. The run starts at the first ``log``/``log_config`` call
    or ``run`` access, so nothing is created before the run has something to say. ``run`` is
    the ``wandb`` run, e.g. for ``run.log_code``.
    """

    def __init__(
        self,
        project: str,
        run_name: str,
        config: Mapping[str, Any],
        run_dir: str | os.PathLike[str],
        mode: str,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ConfigError(f"unknown W&B mode {mode!r}; choose one of {list(WANDB_MODES)}")
        import wandb  # fails here, at start-up, when wandb is not installed

        self._wandb = wandb
        self._init_args = (project, run_name, dict(config), os.fspath(run_dir), mode)
        self._run: Any = None

    @property
    def run(self) -> Any:
        """The ``wandb`` run, started on first access."""
        if self._run is None:
            project, run_name, config, run_dir, mode = self._init_args
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._run = self._wandb.init(
                project=project,
                name=run_name,
                config=config,
                dir=run_dir,
                mode=mode,
                settings=self._wandb.Settings(x_disable_stats=True),
            )
        return self._run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """``wandb.log(metrics, step=step)``; steps must not decrease."""
        self.run.log(dict(metrics), step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Add or overwrite keys of the run's config."""
        self.run.config.update(dict(config), allow_val_change=True)

    def finish(self) -> None:
        """Finish the run if it started (an offline run can then be uploaded with
        ``wandb sync``)."""
        if self._run is not None:
            self._run.finish()
            self._run = None


class MultiLogger:
    """Sends every call to each of ``loggers`` in order."""

    def __init__(self, loggers: Sequence[RunLogger]) -> None:
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log to every logger."""
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Log the config to every logger."""
        for logger in self.loggers:
            logger.log_config(config)

    def finish(self) -> None:
        """Finish every logger."""
        for logger in self.loggers:
            logger.finish()


def build_logger(
    kind: str,
    *,
    project: str,
    run_name: str,
    config: Mapping[str, Any],
    run_dir: str | os.PathLike[str],
    is_main: bool,
) -> RunLogger:
    """The run's logger: ``NullLogger`` off rank 0; on rank 0 ``run_dir/metrics.jsonl`` (with the
    config in ``metrics.config.json``) plus, for ``wandb`` (online if a key is available, else
    offline) or ``wandb_offline``, a W&B run unless ``resolve_wandb_mode`` disables it. Files
    and the W&B run are created at the first metrics, not here."""
    if kind not in LOGGER_KINDS:
        raise ConfigError(f"unknown logger {kind!r}; choose one of {list(LOGGER_KINDS)}")
    if not is_main:
        return NullLogger()
    loggers: list[RunLogger] = [JsonlLogger(Path(run_dir) / "metrics.jsonl", config)]
    if kind != "none":
        mode = resolve_wandb_mode("auto" if kind == "wandb" else "offline")
        if mode != "disabled":
            loggers.append(WandbLogger(project, run_name, config, run_dir, mode))
    return MultiLogger(loggers)


class ProgressBar:
    """A tqdm bar on the main rank, a no-op elsewhere; ``update(n, loss=..., ex_per_s=...)``."""

    def __init__(self, total: int, is_main: bool, initial: int = 0) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not is_main, dynamic_ncols=True)

    @property
    def disabled(self) -> bool:
        """True off the main rank."""
        return bool(self.bar.disable)

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advance by ``n``; ``postfix`` values are shown at the bar's next redraw."""
        if self.bar.disable:
            return
        if postfix:
            # refresh=False: tqdm redraws at its own rate instead of once per step.
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_bar(total: int, is_main: bool, initial: int = 0) -> ProgressBar:
    """A ``ProgressBar`` over ``total`` steps starting at ``initial`` (for resumed runs)."""
    return ProgressBar(total, is_main, initial)


class StepProgress:
    """The rank-0 step bar of a training run, created once the number of steps is known
    (``training.loop.Progress``)."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.bar: ProgressBar | None = None

    def start(self, total: int, initial: int) -> None:
        self.bar = progress_bar(total, self.is_main, initial=initial)

    def update(self, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(1, **postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
