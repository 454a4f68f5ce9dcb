"""Optimizers from a model family's named groups, and their learning-rate schedule.

A family names its groups and their kind (``models.family.OptimizerGroup``); this module maps
each kind to an optimizer and to the run's hyper-parameters of that kind, as upstream
``pretrain.py`` (``create_model``) does: sign-SGD with ``puzzle_emb_lr`` /
``puzzle_emb_weight_decay`` for the puzzle table, AdamATan2 with ``lr``, ``weight_decay``,
``beta1``, ``beta2`` for the weights. Both follow warm-up + cosine, indexed by optimizer step
(with gradient accumulation, one per window of micro-batches). A group's ``lr_scale`` and
``weight_decay_scale`` multiply its kind's learning rate and weight decay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.family import OptimizerGroup
from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
from training.config import PretrainConfig
from utils.optim import AdamATan2, cosine_schedule_with_warmup_lr_lambda, set_lr
from utils.registry import Registry


@dataclass(frozen=True)
class OptimizerKind:
    """How to build one kind of optimizer and which run keys set its hyper-parameters."""

    build: Callable[[list[torch.Tensor], PretrainConfig, int], torch.optim.Optimizer]
    base_lr: Callable[[PretrainConfig], float]
    # Hyper-parameters the run's configuration sets on every param group (also after resume:
    # the configuration wins over what a checkpoint stored).
    hyperparameters: Callable[[PretrainConfig], dict[str, object]]


OPTIMIZER_KINDS: Registry[OptimizerKind] = Registry("optimizer kind")

OPTIMIZER_KINDS.add(
    "sign_sgd",
    OptimizerKind(
        build=lambda tensors, config, world_size: CastedSparseEmbeddingSignSGD_Distributed(
            tensors,
            world_size=world_size,
            lr=0,  # set every step by the schedule
            weight_decay=config.puzzle_emb_weight_decay,
        ),
        base_lr=lambda config: config.puzzle_emb_lr,
        hyperparameters=lambda config: {"weight_decay": config.puzzle_emb_weight_decay},
    ),
)
OPTIMIZER_KINDS.add(
    "adam_atan2",
    OptimizerKind(
        build=lambda tensors, config, world_size: AdamATan2(
            tensors, lr=0, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
        ),
        base_lr=lambda config: config.lr,
        hyperparameters=lambda config: {
            "weight_decay": config.weight_decay,
            "betas": (config.beta1, config.beta2),
        },
    ),
)


@dataclass
class NamedOptimizer:
    """One optimizer of the run with its group's kind, base learning rate and weight-decay
    scale."""

    kind: str
    optimizer: torch.optim.Optimizer
    base_lr: float
    weight_decay_scale: float = 1.0


def build_optimizers(
    groups: dict[str, OptimizerGroup], config: PretrainConfig, world_size: int
) -> dict[str, NamedOptimizer]:
    """One optimizer per named group, in the family's order."""
    optimizers = {}
    for name, group in groups.items():
        kind = OPTIMIZER_KINDS.get(group.kind)
        named = NamedOptimizer(
            kind=group.kind,
            optimizer=kind.build(group.tensors, config, world_size),
            base_lr=kind.base_lr(config) * group.lr_scale,
            weight_decay_scale=group.weight_decay_scale,
        )
        apply_run_hyperparameters(named, config)
        optimizers[name] = named
    return optimizers


def apply_run_hyperparameters(named: NamedOptimizer, config: PretrainConfig) -> None:
    """Set the run's weight decay (times the group's scale) and betas on every param group,
    e.g. after loading a state saved by a run with other values."""
    values = dict(OPTIMIZER_KINDS.get(named.kind).hyperparameters(config))
    weight_decay = values.get("weight_decay")
    if isinstance(weight_decay, int | float):
        values["weight_decay"] = weight_decay * named.weight_decay_scale
    for group in named.optimizer.param_groups:
        group.update(values)


def scheduled_lr(
    named: NamedOptimizer, step: int, total_steps: int, config: PretrainConfig
) -> float:
    """Upstream's warm-up + cosine learning rate of ``named`` for optimizer step ``step`` (the
    counter once the step is counted): read at ``step`` (``lr_first_step=1``, upstream counts
    the step first) or at ``step - 1`` (``0``, the JD fork counts it after the update, so
    warm-up starts at lr 0)."""
    return cosine_schedule_with_warmup_lr_lambda(
        step - 1 + config.lr_first_step,
        base_lr=named.base_lr,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total_steps,
        min_ratio=config.lr_min_ratio,
    )


def keep_micro_batch_gradients(optimizers: dict[str, NamedOptimizer]) -> None:
    """Between two micro-batches of one optimizer step: the puzzle-embedding optimizers set the
    micro-batch's (ids, gradient rows) aside, since the next forward looks up other puzzles
    (``models.sparse_embedding``). Dense gradients need nothing: backward adds to ``.grad``."""
    for named in optimizers.values():
        if isinstance(named.optimizer, CastedSparseEmbeddingSignSGD_Distributed):
            named.optimizer.keep_micro_batch()


def step_optimizers(
    optimizers: dict[str, NamedOptimizer], step: int, total_steps: int, config: PretrainConfig
) -> float:
    """Set each scheduled lr, step and zero every optimizer; returns the last group's lr
    (upstream logs the lr of its last optimizer)."""
    lr = 0.0
    for named in optimizers.values():
        lr = scheduled_lr(named, step, total_steps, config)
        set_lr(named.optimizer, lr)
        named.optimizer.step()
        named.optimizer.zero_grad()
    return lr
