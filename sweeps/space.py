"""The sweep file (``config/sweep/*.yaml``): its schema, loading, and sampled values as overrides.

A sweep file names the metric to optimise, the search space (each parameter is a Hydra override
key of ``pretrain.py``, e.g. ``arch.H_cycles`` or ``lr``, with categorical ``values`` or a
``min``/``max`` range), the base overrides of every trial, the trial budget and the
early-termination settings of both backends (W&B hyperband, Optuna's median pruner). Every
mistake is one ``ConfigError`` line naming the file and the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from utils.config import validate_model
from utils.schema import ConfigError, StrictModel

Scalar = bool | int | float | str
# Overrides the sweep itself sets on every trial; a base override may not set them.
RESERVED_KEYS = ("run_name", "checkpoint_path")


class CategoricalParam(StrictModel):
    """A parameter drawn from a fixed list of ``values``."""

    values: list[Scalar] = Field(min_length=1, description="the candidate values")

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalParam:
        if len({repr(v) for v in self.values}) != len(self.values):
            raise ValueError(f"values repeat an entry ({self.values})")
        return self


class RangeParam(StrictModel):
    """A parameter drawn from ``[min, max]``, on a log scale if ``log``, in steps of ``step``.

    ``type`` is ``int`` when both bounds are written as integers, unless given.
    """

    min: float
    max: float
    type: Literal["int", "float"] = "float"
    log: bool = Field(False, description="sample uniformly in log space (min > 0)")
    step: float | None = Field(None, gt=0, description="grid spacing (not with log)")

    @model_validator(mode="before")
    @classmethod
    def _infer_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" not in data:
            bounds = (data.get("min"), data.get("max"))
            ints = all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
            data = {**data, "type": "int" if ints else "float"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RangeParam:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if self.log and self.min <= 0:
            raise ValueError(f"log needs min > 0 (got {self.min})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop one")
        if self.type == "int":
            for name in ("min", "max", "step"):
                value = getattr(self, name)
                if value is not None and value != int(value):
                    raise ValueError(f"{name} of an int range must be a whole number")
        return self

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in the range (and on its grid)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and value != int(value):
            return False
        if not self.min <= value <= self.max:
            return False
        if self.step is None:
            return True
        ticks = (value - self.min) / self.step
        return abs(ticks - round(ticks)) < 1e-9


Param = CategoricalParam | RangeParam


class Metric(StrictModel):
    """The evaluation metric a trial is scored by, as ``pretrain.py`` logs it."""

    name: str = Field(description="e.g. all/exact_accuracy or ARC/pass@2")
    goal: Literal["maximize", "minimize"]


class EarlyTerminate(StrictModel):
    """W&B's hyperband early termination (its ``early_terminate`` section)."""

    type: Literal["hyperband"] = "hyperband"
    min_iter: int | None = Field(None, ge=1, description="first bracket, in evaluations")
    max_iter: int | None = Field(None, ge=1, description="last bracket, in evaluations")
    eta: int = Field(3, ge=2, description="bracket multiplier")
    s: int | None = Field(None, ge=1, description="number of brackets (with max_iter)")

    @model_validator(mode="after")
    def _one_bound(self) -> EarlyTerminate:
        if self.min_iter is None and self.max_iter is None:
            raise ValueError("hyperband needs min_iter or max_iter")
        return self


class Pruner(StrictModel):
    """Optuna's pruner: ``median`` stops a trial whose evaluation is worse than the median of
    earlier trials' evaluations at the same step; ``none`` never stops one."""

    type: Literal["median", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0, description="finished trials before pruning starts")
    n_warmup_steps: int = Field(0, ge=0, description="training steps before a trial can stop")
    interval_steps: int = Field(1, ge=1, description="check every this many reported steps")


class Sampler(StrictModel):
    """Optuna's TPE sampler."""

    n_startup_trials: int = Field(10, ge=0, description="random trials before TPE's model")
    seed: int | None = Field(None, description="seeds the sampler (reproducible suggestions)")


class SweepConfig(StrictModel):
    """One sweep file, validated."""

    name: str = Field(description="the Optuna study and W&B sweep name")
    project: str | None = Field(None, description="W&B project (default: the sweep's name)")
    metric: Metric
    parameters: dict[str, Param] = Field(min_length=1)
    trials: int = Field(ge=1, description="number of trials (W&B agent count, Optuna trials)")
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) per trial")
    launcher: Literal["auto", "torchrun", "python"] = Field(
        "auto", description="auto: torchrun when nproc_per_node > 1, else one python process"
    )
    base_overrides: list[str] = Field(default_factory=list, description="every trial's overrides")
    timeout_s: float | None = Field(None, gt=0, description="a trial running longer fails")
    kill_grace_s: float = Field(30.0, ge=0, description="SIGTERM to SIGKILL, stopping a trial")
    early_terminate: EarlyTerminate | None = None
    pruner: Pruner = Field(default_factory=Pruner)
    sampler: Sampler = Field(default_factory=Sampler)
    enqueue: list[dict[str, Scalar]] = Field(
        default_factory=list, description="points the first Optuna trials evaluate, in order"
    )

    @model_validator(mode="before")
    @classmethod
    def _parameter_kinds(cls, data: Any) -> Any:
        # A parameter's kind follows from its keys; validating each against its own schema
        # gives one readable error instead of a union's two.
        if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict):
            return data
        parsed: dict[str, Any] = {}
        for key, spec in data["parameters"].items():
            if isinstance(spec, CategoricalParam | RangeParam):
                parsed[key] = spec
                continue
            if not isinstance(spec, dict):
                raise ValueError(f"parameters.{key}: expected a mapping with values or min/max")
            if "values" not in spec and "min" not in spec and "max" not in spec:
                keys = sorted({*CategoricalParam.model_fields, *RangeParam.model_fields})
                close = {m for k in spec for m in difflib.get_close_matches(str(k), keys, n=1)}
                hint = f"; did you mean {' or '.join(sorted(close))}?" if close else ""
                raise ValueError(
                    f"parameters.{key}: give values: [...] or a range min:/max: (got keys "
                    f"{', '.join(map(str, spec)) or 'none'}){hint}"
                )
            kind = CategoricalParam if "values" in spec else RangeParam
            parsed[key] = validate_model(kind, spec, prefix=f"parameters.{key}")
        return {**data, "parameters": parsed}

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        if self.launcher == "python" and self.nproc_per_node > 1:
            raise ValueError(
                f"launcher: python runs one process per trial, not nproc_per_node="
                f"{self.nproc_per_node}; use launcher: torchrun (or auto)"
            )
        for key in self.parameters:
            if override_key(key) in RESERVED_KEYS or not key or key != key.strip():
                raise ValueError(f"parameters.{key}: not a parameter the sweep can set")
        for override in self.base_overrides:
            key = override_key(override)
            if key in RESERVED_KEYS:
                raise ValueError(f"base_overrides: {override!r} is set by the sweep for each trial")
            if key in {override_key(k) for k in self.parameters}:
                raise ValueError(f"base_overrides: {override!r} is also a swept parameter")
        for i, point in enumerate(self.enqueue):
            for key, value in point.items():
                spec = self.parameters.get(key)
                if spec is None:
                    raise ValueError(f"enqueue.{i}.{key}: not one of the parameters")
                inside = value in spec.values if isinstance(spec, CategoricalParam) else (
                    spec.contains(value)
                )  # fmt: skip
                if not inside:
                    raise ValueError(f"enqueue.{i}.{key}: {value!r} is outside the parameter")
        return self

    @property
    def wandb_project(self) -> str:
        """The W&B project the sweep is created in."""
        return self.project or self.name


def override_key(override: str) -> str:
    """The config key a Hydra override sets: ``++arch.H_cycles=3`` → ``arch.H_cycles``."""
    return override.split("=", 1)[0].lstrip("+~")


def format_value(value: Scalar) -> str:
    """A sampled value as Hydra reads it on the command line (``True`` → ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_overrides(params: dict[str, Scalar]) -> list[str]:
    """Sampled ``{key: value}`` → ``["key=value", ...]`` in the given order."""
    return [f"{key}={format_value(value)}" for key, value in params.items()]


def load_sweep_config(path: str | Path, *, name_default: str | None = None) -> SweepConfig:
    """Read and validate a sweep file; ``ConfigError`` (one line, naming the file) otherwise.

    ``name`` defaults to the file's stem.
    """
    from omegaconf import OmegaConf  # reads 1e-4 as a float, unlike PyYAML's YAML 1.1

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found (see config/sweep/ for examples)")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # omegaconf raises several unrelated types for bad YAML
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a readable YAML file ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data.setdefault("name", name_default or path.stem)
    try:
        # Parameters first, so that their errors name their own keys.
        data = SweepConfig._parameter_kinds(data)
        return validate_model(SweepConfig, data)
    except ValueError as e:  # ConfigError included
        # A check of the whole file has no key of its own to report: its message names one.
        raise ConfigError(f"{path}: {str(e).removeprefix('config: ')}") from None
