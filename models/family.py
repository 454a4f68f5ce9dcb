"""Model families: what the training side needs to know about a kind of model.

A family (after torchtitan's ``TrainSpec``) builds the loss head for an architecture config,
names its optimizer groups, declares the batch fields it reads and what it can do. The training
loop, checkpoints and evaluation ask the family instead of inspecting the model: adding a model
family is one module that registers a ``ModelFamily`` in ``FAMILIES`` plus its architecture
schemas (``ArchConfig.family`` names the family).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from models.arch_config import ArchConfig
from models.recursive_reasoning.common import ModelDims
from models.sparse_embedding import CastedSparseEmbedding
from utils.registry import Registry


@dataclass(frozen=True)
class Capabilities:
    """What a built model supports; the training side branches on these, never on names."""

    halting: bool  # a trained Q head (halting losses are objectives)
    cycle_losses: bool  # per-H-cycle losses (``LossOutput.internal_token_loss``)
    sparse_embedding: bool  # a puzzle-embedding table trained row-sparsely by sign-SGD
    per_sample_layers: bool  # every weight lives in a layer that can keep per-sample gradients
    traceable: bool  # ``record_steps`` can record its latents
    # The loss has a KL term (``LossOutput.kl_loss``, a variational encoder) that only the
    # summed objective includes: Jacobian-descent objectives do not split it.
    kl_loss: bool = False
    # Jacobian-descent objectives can be formed for it (per-sample or per-objective gradients
    # of every trainable weight).
    jacobian_descent: bool = True


@dataclass
class OptimizerGroup:
    """Tensors one optimizer trains.

    ``kind`` names the optimizer (``sign_sgd`` for row-sparse tables, ``adam_atan2`` for dense
    weights); ``lr_scale`` multiplies the run's learning rate of that kind and
    ``weight_decay_scale`` its weight decay (ETRM's separate encoder optimizer: 0.1).
    """

    kind: str
    tensors: list[torch.Tensor] = field(default_factory=list)
    lr_scale: float = 1.0
    weight_decay_scale: float = 1.0


class ModelFamily(ABC):
    """Builds models of one family and answers the training side's questions about them."""

    name: ClassVar[str]
    batch_fields: ClassVar[tuple[str, ...]]

    @abstractmethod
    def build(self, arch: ArchConfig, dims: ModelDims) -> nn.Module:
        """The loss head around a fresh model (state-dict keys ``model.inner....``)."""

    @abstractmethod
    def optimizer_groups(
        self, head: nn.Module, freeze_weights: bool, encoder_lr_scale: float = 0.0
    ) -> dict[str, OptimizerGroup]:
        """Optimizer groups by name, in a fixed order (checkpoints key optimizers by it).

        ``freeze_weights`` trains only the row-sparse tables: the dense weights get
        ``requires_grad_(False)`` and no group. ``encoder_lr_scale > 0`` gives a demonstration
        encoder its own group at that learning-rate scale (families without one refuse it).
        """

    @abstractmethod
    def capabilities(self, arch: ArchConfig, head: nn.Module) -> Capabilities:
        """What the built ``head`` supports."""

    def puzzle_embedding(self, head: nn.Module) -> CastedSparseEmbedding | None:
        """The row-sparse puzzle table of ``head``, or None."""
        tables = [m for m in head.modules() if isinstance(m, CastedSparseEmbedding)]
        return tables[0] if tables else None

    def norm_groups(self, head: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named parts of ``head``'s trainable parameters whose gradient norms are logged apart
        (before clipping), e.g. ``{"encoder": [...], "decoder": [...]}``; none by default."""
        return {}


FAMILIES: Registry[ModelFamily] = Registry(
    "model family", modules=["models.recursive_reasoning.family", "models.etrm.family"]
)


def family_of(arch: ArchConfig) -> ModelFamily:
    """The family that builds ``arch``."""
    return FAMILIES.get(arch.family)
