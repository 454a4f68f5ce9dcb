"""Run naming, metric loggers (W&B, JSON lines, none) and the rank-0 progress bar.

Besides scalars, a logger takes images (RGB uint8 arrays with captions, ``log_images``) and
curves (several named series over one x axis, ``log_curve``). W&B keeps them as
``wandb.Image`` lists, tables and line-series charts (in the run folder when offline); the
JSON-lines logger writes them beside ``metrics.jsonl``: ``predictions/<key>_step<N>_<i>.png``
with ``predictions/<key>_step<N>.json`` (file names and captions), and
``curves/<key>_step<N>.json`` with a PNG line plot ``curves/<key>_step<N>.png`` drawn with
Pillow. Pillow is imported only when an image or curve is written.

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
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import coolname
import numpy as np
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
# Series colours of the PNG curves (the ARC palette's blue, red, green, orange, magenta, cyan).
_CURVE_COLOURS = ((0, 116, 217), (255, 65, 54), (46, 204, 64), (255, 133, 27), (240, 18, 190),
                  (127, 219, 255))  # fmt: skip
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_CODE_FILES = (".py", ".yaml", ".txt")  # what W&B's code artifact keeps of the code folder


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
    """Where rank 0 sends scalar metrics (``{"train/lm_loss": 0.5, ...}`` at a step), config,
    images and curves.

    ``log_images``: ``images`` are RGB uint8 arrays [H, W, 3], one caption each.
    ``log_curve``: ``ys`` maps each series name to one value per entry of ``xs``; ``x_name``
    labels the x axis.
    """

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_images(
        self, key: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int
    ) -> None: ...

    def log_curve(
        self,
        key: str,
        xs: Sequence[float],
        ys: Mapping[str, Sequence[float]],
        step: int,
        x_name: str,
    ) -> None: ...

    def finish(self) -> None: ...


@runtime_checkable
class CodeLogger(Protocol):
    """A logger that takes the run's source code: ``log_code(folder)`` with the code folder that
    ``training.run_files`` writes (W&B stores it as the run's code artifact; the JSON-lines and
    null loggers ignore it, the copy on disk being the record). Separate from ``RunLogger`` so
    that a logger without it still is one."""

    def log_code(self, folder: str | os.PathLike[str]) -> None: ...


def check_images(images: Sequence[np.ndarray], captions: Sequence[str]) -> list[np.ndarray]:
    """``images`` as C-contiguous RGB uint8 arrays [H, W, 3]; one caption per image."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    checked = []
    for i, image in enumerate(images):
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
            raise ValueError(f"image {i} must be RGB uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
        checked.append(np.ascontiguousarray(arr))
    return checked


def check_curve(xs: Sequence[float], ys: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """``ys`` as lists of floats, each as long as ``xs``; at least one series."""
    if not ys:
        raise ValueError("a curve needs at least one series")
    series = {name: [float(v) for v in values] for name, values in ys.items()}
    for name, values in series.items():
        if len(values) != len(xs):
            raise ValueError(f"curve series {name!r} has {len(values)} values for {len(xs)} xs")
    return series


class NullLogger:
    """Drops everything: non-main ranks, and runs that want no logging at all."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Ignore ``metrics``."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Ignore ``config``."""

    def log_images(
        self, key: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int
    ) -> None:
        """Ignore ``images``."""

    def log_curve(
        self,
        key: str,
        xs: Sequence[float],
        ys: Mapping[str, Sequence[float]],
        step: int,
        x_name: str,
    ) -> None:
        """Ignore the curve."""

    def log_code(self, folder: str | os.PathLike[str]) -> None:
        """Ignore the code folder."""

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

    def log_images(
        self, key: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int
    ) -> None:
        """Write ``predictions/<key>_step<N>_<i>.png`` for each image and
        ``predictions/<key>_step<N>.json`` (``{"key", "step", "images": [{"file", "caption"}]}``)
        next to the metrics file; characters other than ``A-Za-z0-9_.-`` in ``key`` become
        ``_``."""
        from PIL import Image

        checked = check_images(images, captions)
        folder = self.path.parent / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{_file_stem(key)}_step{int(step)}"
        entries = []
        for i, (image, caption) in enumerate(zip(checked, captions, strict=True)):
            name = f"{stem}_{i}.png"
            Image.fromarray(image).save(folder / name)
            entries.append({"file": name, "caption": str(caption)})
        index = {"key": key, "step": int(step), "images": entries}
        (folder / f"{stem}.json").write_text(json.dumps(index, indent=1) + "\n")

    def log_curve(
        self,
        key: str,
        xs: Sequence[float],
        ys: Mapping[str, Sequence[float]],
        step: int,
        x_name: str,
    ) -> None:
        """Write ``curves/<key>_step<N>.json`` (``{"key", "step", "x_name", "xs", "ys"}``, the
        numbers as ``log`` writes them) and its line plot ``curves/<key>_step<N>.png``."""
        from PIL import Image

        series = check_curve(xs, ys)
        folder = self.path.parent / "curves"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{_file_stem(key)}_step{int(step)}"
        record = {
            "key": key,
            "step": int(step),
            "x_name": x_name,
            "xs": [_json_number(x) for x in xs],
            "ys": {name: [_json_number(v) for v in values] for name, values in series.items()},
        }
        (folder / f"{stem}.json").write_text(json.dumps(record, allow_nan=False) + "\n")
        image = curve_image(xs, series, x_name=x_name, title=f"{key} (step {int(step)})")
        Image.fromarray(image).save(folder / f"{stem}.png")

    def log_code(self, folder: str | os.PathLike[str]) -> None:
        """Ignore the code folder: it is already in the run folder."""

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

    Given ``run``, a run already started (a W&B sweep trial's, ``sweeps.in_sweep``), it logs
    into that run instead of calling ``wandb.init`` a second time, and adds ``config`` to the
    run's config at its first use.
    """

    def __init__(
        self,
        project: str,
        run_name: str,
        config: Mapping[str, Any],
        run_dir: str | os.PathLike[str],
        mode: str,
        run: Any = None,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ConfigError(f"unknown W&B mode {mode!r}; choose one of {list(WANDB_MODES)}")
        import wandb  # fails here, at start-up, when wandb is not installed

        self._wandb = wandb
        self._init_args = (project, run_name, dict(config), os.fspath(run_dir), mode)
        self._run: Any = run
        self._joined_config = dict(config) if run is not None else None

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
        elif self._joined_config is not None:
            self._run.config.update(self._joined_config, allow_val_change=True)
            self._joined_config = None
        return self._run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """``wandb.log(metrics, step=step)``; steps must not decrease."""
        self.run.log(dict(metrics), step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Add or overwrite keys of the run's config."""
        self.run.config.update(dict(config), allow_val_change=True)

    def log_images(
        self, key: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int
    ) -> None:
        """``key``: a list of ``wandb.Image`` with their captions, at ``step``."""
        checked = check_images(images, captions)
        media = [
            self._wandb.Image(image, caption=str(caption))
            for image, caption in zip(checked, captions, strict=True)
        ]
        self.run.log({key: media}, step=step)

    def log_curve(
        self,
        key: str,
        xs: Sequence[float],
        ys: Mapping[str, Sequence[float]],
        step: int,
        x_name: str,
    ) -> None:
        """``key``: a ``wandb.plot.line_series`` chart of every series over ``xs`` (W&B stores
        its data as the table ``<key>_table``, one row per point), and ``<key>_data``: a
        ``wandb.Table`` with columns ``x_name`` then one per series, one row per x."""
        series = check_curve(xs, ys)
        names = list(series)
        table = self._wandb.Table(
            columns=[x_name, *names],
            data=[[float(x), *(series[n][i] for n in names)] for i, x in enumerate(xs)],
        )
        chart = self._wandb.plot.line_series(
            xs=[float(x) for x in xs],
            ys=[series[n] for n in names],
            keys=names,
            title=key,
            xname=x_name,
        )
        self.run.log({key: chart, f"{key}_data": table}, step=step)

    def log_code(self, folder: str | os.PathLike[str]) -> None:
        """``run.log_code(folder)``: its ``.py``, ``.yaml`` and ``.txt`` files become the run's
        code artifact."""
        self.run.log_code(os.fspath(folder), include_fn=lambda path: path.endswith(_CODE_FILES))

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

    def log_images(
        self, key: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int
    ) -> None:
        """Log the images to every logger."""
        for logger in self.loggers:
            logger.log_images(key, images, captions, step)

    def log_curve(
        self,
        key: str,
        xs: Sequence[float],
        ys: Mapping[str, Sequence[float]],
        step: int,
        x_name: str,
    ) -> None:
        """Log the curve to every logger."""
        for logger in self.loggers:
            logger.log_curve(key, xs, ys, step, x_name)

    def log_code(self, folder: str | os.PathLike[str]) -> None:
        """Send the code folder to every logger that takes code."""
        for logger in self.loggers:
            if isinstance(logger, CodeLogger):
                logger.log_code(folder)

    def finish(self) -> None:
        """Finish every logger."""
        for logger in self.loggers:
            logger.finish()


def _file_stem(key: str) -> str:
    """``key`` as a file-name stem: ``"eval/predictions"`` → ``"eval_predictions"``."""
    return _UNSAFE_FILE_CHARS.sub("_", key).strip("_") or "untitled"


CURVE_SIZE = (480, 320)  # width, height of ``curve_image``
CURVE_PLOT_BOX = (56, 44, 464, 276)  # left, top, right, bottom of its plot area, in pixels


def curve_image(
    xs: Sequence[float], ys: Mapping[str, Sequence[float]], *, x_name: str, title: str
) -> np.ndarray:
    """A line plot of each series of ``ys`` over ``xs`` as an RGB uint8 array
    [CURVE_SIZE[1], CURVE_SIZE[0], 3], white background.

    Inside ``CURVE_PLOT_BOX`` the y axis runs from min(0, values) at the bottom edge to
    max(1, values) at the top edge (so accuracies keep a fixed 0..1 frame) and the x axis from
    min(xs) to max(xs) (a single x sits in the middle). Series take the colours of
    ``_CURVE_COLOURS`` in order; non-finite values leave a gap.
    """
    from PIL import Image, ImageDraw, ImageFont

    series = check_curve(xs, ys)
    left, top, right, bottom = CURVE_PLOT_BOX
    finite = [v for values in series.values() for v in values if math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([1.0, *finite])
    x_lo, x_hi = (min(xs), max(xs)) if len(xs) else (0.0, 1.0)

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = 0.5 if x_hi == x_lo else (x - x_lo) / (x_hi - x_lo)
        return left + fx * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top)

    image = Image.new("RGB", CURVE_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        _, y = to_px(x_lo, value)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 6, y), f"{value:.2f}", fill=(0, 0, 0), font=font, anchor="rm")
    tick_every = max(1, math.ceil(len(xs) / 12))
    for x in list(xs)[::tick_every]:
        px, _ = to_px(float(x), lo)
        draw.line([(px, bottom), (px, bottom + 4)], fill=(0, 0, 0))
        draw.text((px, bottom + 6), f"{x:g}", fill=(0, 0, 0), font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text(((left + right) / 2, bottom + 22), x_name, fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((left, 8), title, fill=(0, 0, 0), font=font, anchor="lt")
    legend_x = left
    for k, (name, values) in enumerate(series.items()):
        colour = _CURVE_COLOURS[k % len(_CURVE_COLOURS)]
        draw.rectangle([legend_x, 26, legend_x + 10, 34], fill=colour)
        draw.text((legend_x + 14, 30), name, fill=(0, 0, 0), font=font, anchor="lm")
        legend_x += 24 + int(draw.textlength(name, font=font))
        segments: list[list[tuple[float, float]]] = [[]]
        for x, v in zip(xs, values, strict=True):
            if math.isfinite(v):
                segments[-1].append(to_px(float(x), v))
            elif segments[-1]:
                segments.append([])
        for segment in segments:
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
            for px, py in segment:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    return np.asarray(image, dtype=np.uint8).copy()


def build_logger(
    kind: str,
    *,
    project: str,
    run_name: str,
    config: Mapping[str, Any],
    run_dir: str | os.PathLike[str],
    is_main: bool,
    wandb_run: Any = None,
) -> RunLogger:
    """The run's logger: ``NullLogger`` off rank 0; on rank 0 ``run_dir/metrics.jsonl`` (with the
    config in ``metrics.config.json``) plus, for ``wandb`` (online if a key is available, else
    offline) or ``wandb_offline``, a W&B run unless ``resolve_wandb_mode`` disables it. Files
    and the W&B run are created at the first metrics, not here. ``wandb_run``: a W&B run already
    started (a sweep trial's, ``sweeps.in_sweep``) that the W&B logger uses instead of its own.
    """
    if kind not in LOGGER_KINDS:
        raise ConfigError(f"unknown logger {kind!r}; choose one of {list(LOGGER_KINDS)}")
    if not is_main:
        return NullLogger()
    loggers: list[RunLogger] = [JsonlLogger(Path(run_dir) / "metrics.jsonl", config)]
    if kind != "none":
        mode = resolve_wandb_mode("auto" if kind == "wandb" else "offline")
        if mode != "disabled" or wandb_run is not None:
            loggers.append(WandbLogger(project, run_name, config, run_dir, mode, run=wandb_run))
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
