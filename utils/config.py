"""Typed configuration: Hydra composes ``config/``, pydantic decides.

Entry points call ``load_pretrain_config(dict_config)`` right after ``@hydra.main``; it converts
the DictConfig to plain data and validates it with ``extra="forbid"`` models. The architecture
section is validated by the schema registered under its ``name`` (``ARCH_CONFIGS``), the
evaluators by theirs (``EVALUATOR_CONFIGS``). Any problem raises ``ConfigError`` whose message
names the dotted path, what is wrong and, for unknown keys, the allowed ones.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, model_validator

from utils.objectives import AggregatorConfig, ObjectiveSpec, fold_fork_knobs, partial_jd_problem
from utils.registry import Registry
from utils.schema import ConfigError, StrictModel

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

M = TypeVar("M", bound=BaseModel)


# ----------------------------------------------------------------------------------------------
# Architecture and loss
# ----------------------------------------------------------------------------------------------
LOSS_HEADS = {
    "ACTLossHead": ("losses@ACTLossHead",),
    "NoACTLossHead": ("losses@NoACTLossHead",),
}
LOSS_TYPES = ("stablemax_cross_entropy", "softmax_cross_entropy")


class LossConfig(StrictModel):
    """``arch.loss``: the loss head wrapping the model and its per-token loss function."""

    name: str = "ACTLossHead"
    loss_type: Literal["stablemax_cross_entropy", "softmax_cross_entropy"] = (
        "stablemax_cross_entropy"
    )
    differential_loss: bool = Field(
        False, description="the LM loss sees logits minus the previous step's (arch=trmjd)"
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data:
            name = data["name"]
            for canonical, aliases in LOSS_HEADS.items():
                if name == canonical or name in aliases:
                    return {**data, "name": canonical}
            raise ValueError(f"unknown loss head '{name}'; choose one of: {', '.join(LOSS_HEADS)}")
        return data


class ArchConfig(StrictModel):
    """Base of every architecture schema: ``name`` (canonical after validation) and ``loss``."""

    name: str
    loss: LossConfig = Field(default_factory=LossConfig)


ARCH_CONFIGS: Registry[type[ArchConfig]] = Registry(
    "architecture", modules=["models.recursive_reasoning.configs"]
)


# ----------------------------------------------------------------------------------------------
# Evaluators
# ----------------------------------------------------------------------------------------------
class EvaluatorConfig(StrictModel):
    """Base of every evaluator schema; ``name`` is canonical after validation."""

    name: str


EVALUATOR_CONFIGS: Registry[type[EvaluatorConfig]] = Registry("evaluator")


@EVALUATOR_CONFIGS.register("arc", aliases=["arc@ARC"])
class ARCEvaluatorConfig(EvaluatorConfig):
    """ARC voting evaluator options (spec §7)."""

    name: str = "arc"
    submission_K: int = Field(2, ge=1)
    pass_Ks: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 100, 1000])
    aggregated_voting: bool = True


# ----------------------------------------------------------------------------------------------
# Top level
# ----------------------------------------------------------------------------------------------
class PretrainConfig(StrictModel):
    """``config/cfg_pretrain.yaml``: upstream's keys, meanings and defaults (spec §1.1).

    ``project_name``, ``run_name``, ``checkpoint_path``, ``load_checkpoint`` and
    ``eval_save_outputs`` are absent from the YAML, as upstream, so ``+run_name=...`` works.
    """

    arch: SerializeAsAny[ArchConfig]
    data_paths: list[str] = Field(min_length=1)
    data_paths_test: list[str] = Field(default_factory=list)
    evaluators: list[SerializeAsAny[EvaluatorConfig]] = Field(default_factory=list)

    global_batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    eval_interval: int | None = Field(None, gt=0)
    checkpoint_every_eval: bool = False

    lr: float = Field(ge=0)
    lr_min_ratio: float = Field(ge=0, le=1)
    lr_warmup_steps: int = Field(ge=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    puzzle_emb_weight_decay: float = Field(ge=0)
    puzzle_emb_lr: float = Field(ge=0)

    seed: int = 0
    min_eval_interval: int | None = Field(0, ge=0)
    ema: bool = False
    ema_rate: float = Field(0.999, gt=0, lt=1)
    freeze_weights: bool = False

    project_name: str | None = None
    run_name: str | None = None
    checkpoint_path: str | None = None
    load_checkpoint: str | None = None
    eval_save_outputs: list[str] = Field(default_factory=list)

    # New keys (not in upstream), all defaulting to upstream's behaviour.
    resume: str | None = Field(
        None, description="'auto' (latest step_N in checkpoint_path) or a step_N folder"
    )
    keep_last: int | None = Field(None, ge=1, description="checkpoints kept (None: all)")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="extra resumable saves")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    logger: Literal["wandb", "wandb_offline", "none"] = "wandb"
    device: str = "auto"
    compile: bool | Literal["auto"] = Field("auto", description="auto: on CUDA only")
    deterministic: bool = False
    grad_clip_norm: float | None = Field(None, gt=0, description="None: no clipping (upstream)")
    data_workers: int = Field(1, ge=0, le=1, description="DataLoader workers (upstream: 1)")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> PretrainConfig:
        if self.eval_interval is not None and self.epochs % self.eval_interval != 0:
            raise ValueError(
                f"epochs ({self.epochs}) must be a multiple of eval_interval "
                f"({self.eval_interval}); change one of them"
            )
        if self.resume is not None and self.resume != "auto" and self.load_checkpoint:
            raise ValueError("give either resume=... or load_checkpoint=..., not both")
        if self.resume == "auto" and self.run_name is None and self.checkpoint_path is None:
            raise ValueError(
                "resume=auto needs a fixed run folder: give +run_name=... or +checkpoint_path=... "
                "(the default run name is random)"
            )
        return self

    @property
    def iterations(self) -> int:
        """Train/eval cycles: ``epochs // eval_interval`` (one when eval_interval is unset)."""
        return self.epochs // self.eval_interval if self.eval_interval else 1

    @property
    def epochs_per_iteration(self) -> int:
        return self.eval_interval or self.epochs


class EvaluateConfig(StrictModel):
    """``config/cfg_evaluate.yaml``; unset keys come from the checkpoint's own config."""

    checkpoint: str
    arch: dict[str, Any] | None = None
    data_paths: list[str] | None = None
    global_batch_size: int | None = Field(None, gt=0)
    evaluators: list[dict[str, Any]] | None = None
    eval_save_outputs: list[str] = Field(default_factory=list)
    output_dir: str | None = None
    use_ema: bool = True
    device: str = "auto"


def check_world_size(config: PretrainConfig, world_size: int) -> int:
    """The local batch size; ``ConfigError`` if the global batch does not split evenly."""
    if config.global_batch_size % world_size != 0:
        raise ConfigError(
            f"global_batch_size ({config.global_batch_size}) must be divisible by the number of "
            f"processes ({world_size}); change global_batch_size or --nproc-per-node"
        )
    return config.global_batch_size // world_size


# ----------------------------------------------------------------------------------------------
# Validation with readable errors
# ----------------------------------------------------------------------------------------------
def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated/SerializeAsAny down to the class or container type."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last element of ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (list, tuple) and isinstance(part, int):
            current = get_args(current)[0]
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(
    error: ValidationError, model: type[BaseModel], prefix: str = ""
) -> str:
    """One line per problem: ``<dotted.path>: <what is wrong>`` (+ allowed keys for typos)."""
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in (*([prefix] if prefix else []), *loc)) or "config"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            allowed = ", ".join(sorted(owner.model_fields)) if owner else "?"
            lines.append(f"{path}: unknown key; allowed keys here: {allowed}")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            got = "" if isinstance(value, dict | BaseModel) else f" (got {value!r})"
            lines.append(f"{path}: {msg}{got}")
    return "; ".join(lines)


def validate_model(model: type[M], data: Any, prefix: str = "") -> M:
    """``model.model_validate(data)`` raising ``ConfigError`` with readable paths."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, prefix)) from None


def _validate_named(registry: Registry[type[M]], data: Any, path: str) -> M:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'name' key (got {data!r})")
    if "name" not in data:
        raise ConfigError(f"{path}.name: required key is missing; choose one of: "
                          f"{', '.join(registry.names())}")  # fmt: skip
    try:
        canonical = registry.canonical(str(data["name"]))
    except ValueError as e:
        raise ConfigError(f"{path}.name: {e}") from None
    return validate_model(registry.get(canonical), {**data, "name": canonical}, prefix=path)


def validate_pretrain_config(data: dict[str, Any]) -> PretrainConfig:
    """Validate plain config data (as composed by Hydra) into a ``PretrainConfig``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    try:
        data = fold_fork_knobs(dict(data))
    except ValueError as e:
        raise ConfigError(f"grad_aggregation: {e}") from None
    if "arch" not in data:
        raise ConfigError("arch: required key is missing; pick one with arch=<name>")
    data["arch"] = _validate_named(ARCH_CONFIGS, data["arch"], "arch")
    evaluators = data.get("evaluators", [])
    if not isinstance(evaluators, list):
        raise ConfigError(f"evaluators: expected a list (got {evaluators!r})")
    data["evaluators"] = [
        _validate_named(EVALUATOR_CONFIGS, ev, f"evaluators.{i}") for i, ev in enumerate(evaluators)
    ]
    config = validate_model(PretrainConfig, data)
    _check_objective_fits_arch(config)
    return config


def _check_objective_fits_arch(config: PretrainConfig) -> None:
    """Objectives that need per-cycle losses or a halting head fail early on other models;
    partial Jacobian descent needs a Gramian weighting; Jacobian descent needs trained
    weights."""
    spec, arch = config.objective, config.arch
    if config.freeze_weights and not spec.is_gradient_descent:
        raise ConfigError(
            f"freeze_weights trains only the puzzle embedding, whose rows are not part of the "
            f"Gramian, so objective '{spec.name}' would weight objectives it cannot tell apart; "
            "use objective=sum with freeze_weights"
        )
    problem = partial_jd_problem(spec, config.aggregator)
    if problem is not None:
        raise ConfigError(problem)
    no_halting = bool(getattr(arch, "no_act", False))
    problem = None
    if spec.internal != "none" and arch.name != "trmjd":
        problem = "needs the per-H-cycle losses of arch=trmjd"
    elif spec.halt in ("out", "separate") and no_halting:
        problem = f"puts the halting loss in objectives, but arch={arch.name} has no halting head"
    if problem is None:
        return
    from utils.objectives import MODES, mode_fits

    fits = [m for m in MODES if mode_fits(m, arch.name, no_halting)]
    raise ConfigError(
        f"objective.name: '{spec.name}' {problem}; modes that fit arch={arch.name}: "
        f"{', '.join(fits)}"
    )


def load_pretrain_config(cfg: Any) -> PretrainConfig:
    """Convert a Hydra DictConfig (or a plain dict) and validate it."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return validate_pretrain_config(data)  # type: ignore[arg-type]


def compose(config_name: str = "cfg_pretrain", overrides: list[str] | None = None) -> Any:
    """Compose ``config/<config_name>.yaml`` with Hydra's compose API (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
