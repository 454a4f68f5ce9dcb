"""The run's configuration: ``config/cfg_pretrain.yaml`` and ``config/cfg_evaluate.yaml``.

Entry points call ``load_pretrain_config(dict_config)`` right after ``@hydra.main``. The
architecture section is validated by the schema registered under its ``name``
(``models.arch_config.ARCH_CONFIGS``), each evaluator by its own
(``evaluators.base.EVALUATOR_CONFIGS``), the objective by ``training.objectives``. Any problem
raises ``ConfigError`` naming the dotted path, what is wrong and, for unknown keys, the allowed
ones. Keys, meanings and defaults are upstream's (``config/cfg_pretrain.yaml`` and
``PretrainConfig`` in the original ``pretrain.py``); keys upstream lacks default to its
behaviour.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from evaluators.base import EVALUATOR_CONFIGS, EvaluatorConfig
from models.arch_config import ARCH_CONFIGS, ArchConfig
from training.latent_search import TTOConfig
from training.objectives import (
    MODES,
    AggregatorConfig,
    ObjectiveSpec,
    fold_fork_knobs,
    mode_fits,
    partial_jd_problem,
)
from utils.config import validate_model, validate_named
from utils.schema import ConfigError, StrictModel


class PretrainConfig(StrictModel):
    """``config/cfg_pretrain.yaml``: upstream's keys, meanings and defaults.

    ``project_name``, ``run_name``, ``checkpoint_path``, ``load_checkpoint`` and
    ``eval_save_outputs`` are absent from the YAML, as upstream, so ``+run_name=...`` works.
    """

    arch: SerializeAsAny[ArchConfig] = Field(description="architecture (arch=<name>)")
    data_paths: list[str] = Field(min_length=1, description="training dataset folders")
    data_paths_test: list[str] = Field(
        default_factory=list, description="evaluation dataset folders (empty: data_paths)"
    )
    evaluators: list[SerializeAsAny[EvaluatorConfig]] = Field(
        default_factory=list, description="evaluators run at every evaluation"
    )

    global_batch_size: int = Field(gt=0, description="examples per step over all processes")
    epochs: int = Field(gt=0, description="passes over the training groups")
    eval_interval: int | None = Field(
        None, gt=0, description="epochs between evaluations (None: only at the end)"
    )
    checkpoint_every_eval: bool = Field(False, description="save step_N at every evaluation")

    lr: float = Field(ge=0, description="AdamATan2 learning rate of the weights")
    lr_min_ratio: float = Field(ge=0, le=1, description="cosine floor as a fraction of lr")
    lr_warmup_steps: int = Field(ge=0, description="linear warm-up steps")
    beta1: float = Field(ge=0, lt=1, description="AdamATan2 beta1")
    beta2: float = Field(ge=0, lt=1, description="AdamATan2 beta2")
    weight_decay: float = Field(ge=0, description="AdamATan2 weight decay")
    puzzle_emb_weight_decay: float = Field(ge=0, description="sign-SGD weight decay")
    puzzle_emb_lr: float = Field(ge=0, description="sign-SGD learning rate of puzzle embeddings")

    seed: int = Field(0, description="seeds torch (plus the rank) and the data sampler")
    min_eval_interval: int | None = Field(
        0, ge=0, description="iterations to train before the first evaluation"
    )
    ema: bool = Field(False, description="evaluate and checkpoint an EMA of the weights")
    ema_rate: float = Field(0.999, gt=0, lt=1, description="EMA decay")
    freeze_weights: bool = Field(False, description="train only the puzzle embedding")

    project_name: str | None = Field(None, description="W&B project (default: from data)")
    run_name: str | None = Field(None, description="W&B run (default: model class + slug)")
    checkpoint_path: str | None = Field(
        None, description="run folder (default: checkpoints/<project>/<run>)"
    )
    load_checkpoint: str | None = Field(
        None, description="initial weights: a step_N folder or an upstream state-dict file"
    )
    eval_save_outputs: list[str] = Field(
        default_factory=list, description="per-example tensors saved at evaluation"
    )

    # New keys (not in upstream), all defaulting to upstream's behaviour.
    resume: str | None = Field(
        None, description="'auto' (latest step_N in checkpoint_path) or a step_N folder"
    )
    keep_last: int | None = Field(None, ge=1, description="checkpoints kept (None: all)")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="extra resumable saves")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    logger: Literal["wandb", "wandb_offline", "none"] = Field(
        "wandb", description="wandb (online with an account, else offline) | wandb_offline | none"
    )
    device: str = Field("auto", description="auto (cuda → mps → cpu), cpu, cuda, cuda:N, mps")
    compile: bool | Literal["auto"] = Field("auto", description="auto: on CUDA only")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms")
    detect_anomaly: bool = Field(
        False, description="torch.autograd anomaly detection (slow; for debugging NaNs)"
    )
    grad_clip_norm: float | None = Field(
        None, ge=0, description="global-norm clip after the cross-rank sum; None or 0: none"
    )
    data_workers: int = Field(1, ge=0, le=1, description="DataLoader workers (upstream: 1)")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN/inf loss or gradient norm: stop (before any update) or skip the "
        "batch's update and go on",
    )
    nonfinite_max_skips: int = Field(
        5, ge=1, description="nonfinite=skip: stop after this many skipped steps in a row"
    )
    dist_timeout_s: float = Field(
        300.0, gt=0, description="seconds a collective may wait for the other ranks"
    )
    dist_timeout_slow_s: float = Field(
        1800.0, gt=0, description="the same for the first step (compilation) and evaluation"
    )
    allow_data_mismatch: bool = Field(
        False, description="resume/load a checkpoint written on another build of the data"
    )
    sampler: str | None = Field(
        None, description="training sampler (dataset.sampling.SAMPLERS); None: uniform (upstream)"
    )
    step_strategy: str = Field(
        "auto",
        description="training.strategies.STEP_STRATEGIES entry; auto: gradient_descent for "
        "objective=sum, jacobian_descent otherwise",
    )
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="losses → objectives (Jacobian descent)"
    )
    # ETRM's top-level keys: max_demos, target_policy and batch_fill concern demonstration-
    # conditioned models (arch=etrm, etrm_fct, etrmtrm); the group limits apply to every family.
    max_demos: int = Field(10, ge=1, description="demo slots K per item (ETRM: 10)")
    max_train_groups: int | None = Field(
        None, ge=1, description="train on the first N task groups only (None: all)"
    )
    max_eval_groups: int | None = Field(
        None, ge=1, description="evaluate the first N task groups only (None: all)"
    )
    target_policy: Literal["test_pairs", "leave_one_out"] = Field(
        "test_pairs",
        description="training queries: the ARC test pairs (ETRM) or every pair in turn, the "
        "others as its demos (LPN)",
    )
    batch_fill: Literal["continue", "etrm"] = Field(
        "continue",
        description="few-shot training batches: continue (the visit that fills a batch goes on "
        "in the next one, every visited query trained) or etrm (ETRM's batches bit for bit: a "
        "random subset of that visit's queries, the rest lost)",
    )
    encoder_lr_scale: float = Field(
        0.0, ge=0, description="> 0: the encoder trains at lr × this, weight decay × 0.1"
    )
    load_pretrained_decoder: str | None = Field(
        None, description="a TRM checkpoint whose decoder (EMA when present) starts the model"
    )
    freeze_decoder_steps: int = Field(
        0,
        ge=0,
        description="train only the encoder for the first N optimizer steps (the decoder's "
        "weights, optimizer moments and EMA stay as they were)",
    )
    allow_contaminated_decoder: bool = Field(
        False,
        description="evaluate on tasks whose demos the pretrained decoder was trained on "
        "(logged and written into every result)",
    )
    updates_per_batch: int | None = Field(
        None,
        ge=1,
        description="fixed computation time for any model: N optimizer steps per batch, the "
        "carry reset per batch (arch=etrm_fct takes arch.num_act_steps instead)",
    )
    log_predictions_every: int | None = Field(
        None,
        ge=0,
        description="ARC only: log input | target | prediction images of training rows every N "
        "optimizer steps and of evaluation rows at every evaluation (None or 0: never)",
    )
    log_predictions_max_samples: int = Field(
        32, ge=1, description="rows per prediction-image log (the first real rows)"
    )
    log_predictions_crop: bool = Field(
        True,
        description="crop each grid as the ARC evaluator does; False: the whole 30x30 canvas",
    )
    aggregator: AggregatorConfig = Field(
        default_factory=AggregatorConfig, description="TorchJD aggregator of the objectives"
    )
    # Gradient accumulation (the JD fork's keys): k micro-batches of global_batch_size per
    # optimizer step. Absent from the YAML, as in the fork, so +effective_batch_size=... works.
    effective_batch_size: int | None = Field(
        None,
        gt=0,
        description="examples per optimizer step over all processes and micro-batches (a "
        "multiple of global_batch_size); None: global_batch_size",
    )
    grad_accum_steps: int | None = Field(
        None,
        ge=1,
        description="micro-batches per optimizer step (None: from effective_batch_size, else 1)",
    )
    ema_every: Literal["auto", "micro", "update"] = Field(
        "auto",
        description="EMA update after every micro-batch (the fork) or every optimizer step; "
        "auto: micro when effective_batch_size is given, else update",
    )

    # Hard-example sampling (the JD fork's ``custom_sampling``, training.hard_examples).
    sampling: Literal["uniform", "hard_examples"] = Field(
        "uniform",
        description="which augmented variant of a group a training visit picks: uniform "
        "(upstream) or hard_examples (weighted by 1 - correct/(seen + 1) of every variant's "
        "training rows so far, the weights rebuilt after each iteration from all ranks)",
    )
    # The JD fork's loop knobs, with its key names (absent from the YAML: +start_step=...).
    start_step: int = Field(
        0, ge=0, description="the step counter of a fresh run starts here (schedule, logs)"
    )
    run_evaluator_only_at_end: bool = Field(
        False, description="evaluate at the last iteration only (checkpoints as configured)"
    )
    in_sweep: bool = Field(
        False,
        description="a W&B sweep trial started by `wandb agent`: the run joins the agent's W&B "
        "run and takes its sampled values from wandb.config (the fork's keys data, H_cycles, "
        "L_cycles, halt_max_steps, lr, or any dotted key)",
    )
    lr_first_step: Literal[0, 1] = Field(
        1,
        description="the schedule's step of the first optimizer step: 1 (upstream counts the "
        "step before computing its lr) or 0 (the JD fork counts it after: warm-up starts at lr "
        "0)",
    )
    cap_total_steps: bool = Field(
        True,
        description="batches past total_steps are not trained on (upstream); False: every "
        "batch the data yields is, the cosine continuing past its end (the JD fork)",
    )
    log_param_grad_norms_every: int | None = Field(
        None,
        ge=0,
        description="log each parameter's gradient norm as train/grad_norm_<name> every N "
        "optimizer steps (the JD fork: every step; None or 0: never)",
    )
    save_code: bool = Field(
        True,
        description="write the resolved config (all_config.yaml) and the code (code/) into "
        "the run folder at start",
    )
    # Loss scaling for forward_dtype=float16 (training.loss_scaling).
    loss_scaling: Literal["auto", "dynamic", "none"] = Field(
        "auto",
        description="dynamic loss scaling: auto (on when arch.forward_dtype is float16), "
        "dynamic or none",
    )
    loss_scale_init: float = Field(2.0**16, gt=0, description="the first loss scale")
    loss_scale_growth_interval: int = Field(
        2000, ge=1, description="finite steps in a row before the scale doubles"
    )

    @field_validator("grad_clip_norm")
    @classmethod
    def _no_clip(cls, value: float | None) -> float | None:
        return None if value == 0 else value  # ETRM's spelling of "no clipping"

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
        if self.effective_batch_size is not None:
            if self.effective_batch_size % self.global_batch_size != 0:
                raise ValueError(
                    f"effective_batch_size ({self.effective_batch_size}) must be a multiple of "
                    f"global_batch_size ({self.global_batch_size}); change one of them"
                )
            implied = self.effective_batch_size // self.global_batch_size
            if self.grad_accum_steps is not None and self.grad_accum_steps != implied:
                raise ValueError(
                    f"grad_accum_steps ({self.grad_accum_steps}) and effective_batch_size "
                    f"({self.effective_batch_size} = {implied} x global_batch_size "
                    f"{self.global_batch_size}) disagree; give one of them"
                )
        if self.sampling == "hard_examples" and self.sampler not in (None, "uniform"):
            raise ValueError(
                f"sampling=hard_examples weights the uniform sampler's variant picks; it does "
                f"not apply to sampler={self.sampler}: drop one of them"
            )
        if self.in_sweep and self.logger == "none":
            raise ValueError("in_sweep=True reads its values from W&B; drop no_wandb/logger=none")
        if self.freeze_decoder_steps and not self.objective.is_gradient_descent:
            raise ValueError(
                f"freeze_decoder_steps trains with the summed loss only; use objective=sum with "
                f"it (got objective '{self.objective.name}')"
            )
        return self

    @property
    def iterations(self) -> int:
        """Train/eval cycles: ``epochs // eval_interval`` (one when eval_interval is unset)."""
        return self.epochs // self.eval_interval if self.eval_interval else 1

    @property
    def epochs_per_iteration(self) -> int:
        return self.eval_interval or self.epochs

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: ``grad_accum_steps``, else
        ``effective_batch_size // global_batch_size`` (the validator makes them agree when both
        are given), else 1."""
        if self.grad_accum_steps is not None:
            return self.grad_accum_steps
        if self.effective_batch_size is not None:
            return self.effective_batch_size // self.global_batch_size
        return 1

    @property
    def loss_scaled(self) -> bool:
        """Whether gradients come from a dynamically scaled loss (``loss_scaling``)."""
        if self.loss_scaling == "auto":
            return getattr(self.arch, "forward_dtype", None) == "float16"
        return self.loss_scaling == "dynamic"

    @property
    def ema_per_micro_batch(self) -> bool:
        """Whether the EMA shadow follows every micro-batch (``ema_every``; ``auto`` does when
        the fork's ``effective_batch_size`` is given, as the fork does)."""
        if self.ema_every == "auto":
            return self.effective_batch_size is not None
        return self.ema_every == "micro"


class EvaluateConfig(StrictModel):
    """``config/cfg_evaluate.yaml``; unset keys come from the checkpoint's own config."""

    checkpoint: str = Field(description="a step_N folder or an upstream state-dict file")
    arch: dict[str, Any] | None = Field(
        None, description="arch=<name> replaces the checkpoint's; +arch.<key> adjusts it"
    )
    data_paths: list[str] | None = Field(None, description="evaluation data (default: the run's)")
    global_batch_size: int | None = Field(None, gt=0, description="default: the run's")
    evaluators: list[dict[str, Any]] | None = Field(None, description="default: the run's")
    eval_save_outputs: list[str] = Field(
        default_factory=list, description="per-example tensors written to eval_outputs.pt"
    )
    output_dir: str | None = Field(None, description="default: <checkpoint>_eval")
    use_ema: bool = Field(True, description="evaluate the EMA weights when the checkpoint has them")
    allow_data_mismatch: bool = Field(
        False, description="evaluate on another build of the data than the run trained on"
    )
    max_eval_groups: int | None = Field(
        None, ge=1, description="evaluate the first N task groups only (default: the run's)"
    )
    allow_contaminated_decoder: bool = Field(
        False,
        description="evaluate on strict-split tasks whose demos the weights were trained on "
        "(flagged in every result)",
    )
    device: str = Field("auto", description="auto (cuda → mps → cpu), cpu, cuda, cuda:N, mps")
    tto: TTOConfig = Field(
        default_factory=TTOConfig,
        description="test-time latent search on each row's demos (training.latent_search); "
        "off while tto.steps is 0",
    )


def check_world_size(config: PretrainConfig, world_size: int) -> int:
    """The local batch size; ``ConfigError`` if the global batch does not split evenly."""
    if config.global_batch_size % world_size != 0:
        raise ConfigError(
            f"global_batch_size ({config.global_batch_size}) must be divisible by the number of "
            f"processes ({world_size}); change global_batch_size or --nproc-per-node"
        )
    return config.global_batch_size // world_size


def validate_pretrain_config(data: dict[str, Any]) -> PretrainConfig:
    """Validate plain config data (as composed by Hydra) into a ``PretrainConfig``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    try:
        data = fold_fork_knobs(dict(data))
    except ValueError as e:
        raise ConfigError(f"grad_aggregation: {e}") from None
    data = fold_fork_loop_knobs(data)
    if "arch" not in data:
        raise ConfigError("arch: required key is missing; pick one with arch=<name>")
    data["arch"] = validate_named(ARCH_CONFIGS, data["arch"], "arch")
    evaluators = data.get("evaluators", [])
    if not isinstance(evaluators, list):
        raise ConfigError(f"evaluators: expected a list (got {evaluators!r})")
    data["evaluators"] = [
        validate_named(EVALUATOR_CONFIGS, ev, f"evaluators.{i}") for i, ev in enumerate(evaluators)
    ]
    config = validate_model(PretrainConfig, data)
    _check_objective_fits_arch(config)
    return config


def fold_fork_loop_knobs(data: dict[str, Any]) -> dict[str, Any]:
    """The JD fork's ``+dropout``, ``+no_wandb`` and ``+custom_sampling`` → ``arch.dropout``,
    ``logger=none`` and ``sampling``; a value that contradicts the key it folds into is refused.
    """
    data = dict(data)
    if "dropout" in data:
        arch = data.get("arch")
        if not isinstance(arch, dict):
            raise ConfigError("dropout: needs an arch section to set arch.dropout in")
        data["arch"] = {**arch, "dropout": data.pop("dropout")}
    if "no_wandb" in data:
        no_wandb = data.pop("no_wandb")
        if not isinstance(no_wandb, bool):
            raise ConfigError(f"no_wandb: expected true or false (got {no_wandb!r})")
        if no_wandb:
            data["logger"] = "none"
    if "custom_sampling" in data:
        custom = data.pop("custom_sampling")
        if not isinstance(custom, bool):
            raise ConfigError(f"custom_sampling: expected true or false (got {custom!r})")
        wanted = "hard_examples" if custom else "uniform"
        if data.get("sampling", wanted) != wanted:
            raise ConfigError(
                f"custom_sampling={custom} means sampling={wanted}, but sampling="
                f"{data['sampling']} is also given; keep one of them"
            )
        data["sampling"] = wanted
    return data


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
    problem = None
    if spec.internal != "none" and not arch.has_cycle_losses:
        problem = f"needs per-H-cycle losses, which arch={arch.name} does not output (trmjd does)"
    elif spec.halt in ("out", "separate") and not arch.has_halting:
        problem = f"puts the halting loss in objectives, but arch={arch.name} has no halting head"
    if problem is None:
        return
    caps = {"has_cycle_losses": arch.has_cycle_losses, "has_halting": arch.has_halting}
    fits = [m for m in MODES if mode_fits(m, **caps)]
    raise ConfigError(
        f"objective.name: '{spec.name}' {problem}; modes that fit arch={arch.name}: "
        f"{', '.join(fits)}"
    )


def load_pretrain_config(cfg: Any) -> PretrainConfig:
    """Convert a Hydra DictConfig (or a plain dict) and validate it."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    return validate_pretrain_config(data)
