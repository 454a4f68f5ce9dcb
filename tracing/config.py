"""The trace command's options (``trace.*``) and the perturbation specs they name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from utils.schema import ConfigError, StrictModel

TARGETS = ("z_H", "z_L", "injection")


@dataclass(frozen=True)
class Perturbation:
    """``z ← z + sigma_rel · RMS(z) · ε`` at ACT step ``step`` (1-based) on ``target``, ε seeded
    from ``seed``, the record and the step. ``tag``, the spec in canonical form, names the variant
    in the trace."""

    step: int
    target: str
    sigma_rel: float
    seed: int

    @property
    def tag(self) -> str:
        sigma = f"{self.sigma_rel:g}"
        return f"step={self.step},target={self.target},sigma_rel={sigma},seed={self.seed}"

    def as_json(self) -> dict[str, object]:
        return {
            "tag": self.tag,
            "step": self.step,
            "target": self.target,
            "sigma_rel": self.sigma_rel,
            "seed": self.seed,
        }


def parse_perturbation(spec: str, named: bool = True) -> Perturbation:
    """``"step=5,target=z_L,sigma_rel=0.5,seed=0"`` → ``Perturbation``; ``ConfigError`` naming
    the field otherwise (prefixed with ``trace.perturb`` and the spec when ``named``; the
    config validation adds them itself). ``target`` defaults to z_L, ``seed`` to 0; ``step``
    and ``sigma_rel`` are required."""

    def error(message: str) -> ConfigError:
        return ConfigError(f"trace.perturb '{spec}': {message}" if named else message)

    fields: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("step", "target", "sigma_rel", "seed") or key in fields:
            raise error(
                f"'{part}' is not one of step=N, target=z_H|z_L|injection, sigma_rel=X, seed=N "
                "(each once, comma-separated)"
            )
        fields[key] = value.strip()
    missing = [k for k in ("step", "sigma_rel") if k not in fields]
    if missing:
        raise error(f"give {' and '.join(missing)} (e.g. step=5,sigma_rel=0.5)")
    target = fields.get("target", "z_L")
    if target not in TARGETS:
        raise error(f"target must be one of {', '.join(TARGETS)}, got '{target}'")
    try:
        step, seed = int(fields["step"]), int(fields.get("seed", "0"))
        sigma = float(fields["sigma_rel"])
    except ValueError:
        raise error("step and seed must be integers, sigma_rel a number") from None
    if step < 1 or sigma < 0 or not sigma == sigma:
        raise error("step must be >= 1 and sigma_rel >= 0")
    return Perturbation(step=step, target=target, sigma_rel=sigma, seed=seed)


class TraceConfig(StrictModel):
    """``trace.*``: what ``python -m tracing.trace`` (or ``evaluate.py trace.enabled=True``)
    records."""

    enabled: bool = Field(False, description="evaluate.py: trace instead of evaluating")
    groups: int | None = Field(
        None, ge=1, description="trace the first N task groups of the test split (default: all)"
    )
    aug: Literal["identity", "all"] = Field(
        "identity", description="identity: only the unaugmented copy of each test input; all"
    )
    probe_l_steps: bool = Field(
        False, description="decode the H update the latents would give after every L-step"
    )
    perturb: list[str] = Field(
        default_factory=list,
        description='perturbations, each "step=5,target=z_L|z_H|injection,sigma_rel=0.5,seed=0"; '
        "a list sweeps several",
    )
    out: str = Field("traces", description="output folder (index.json, per_step.json, shards)")
    shard_size: int = Field(256, ge=1, description="records per JSONL shard")

    @field_validator("perturb", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("perturb")
    @classmethod
    def _parse(cls, value: list[str]) -> list[str]:
        tags = [parse_perturbation(spec, named=False).tag for spec in value]
        if len(set(tags)) != len(tags):
            raise ConfigError("the same perturbation is given twice; give each once")
        return value

    def perturbations(self) -> list[Perturbation]:
        """The parsed ``perturb`` specs, in order."""
        return [parse_perturbation(spec) for spec in self.perturb]
