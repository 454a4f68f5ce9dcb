"""The recursive-reasoning family: TRM, its ablations, HRM, the transformer baseline, trmjd.

Conditioned on a learned per-puzzle embedding (``puzzle_identifiers``), trained by sign-SGD on
the table's rows and AdamATan2 on every weight, as upstream ``pretrain.py``
(``create_model``) does.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from models.arch_config import ArchConfig
from models.family import FAMILIES, Capabilities, ModelFamily, OptimizerGroup
from models.per_sample import uncollected_parameters
from models.recursive_reasoning.common import ModelDims
from models.registry import build_loss_head
from utils.schema import ConfigError


class RecursiveFamily(ModelFamily):
    """Puzzle-id conditioned ACT models (``ARCH_CONFIGS`` entries with ``family = "recursive"``)."""

    name: ClassVar[str] = "recursive"
    batch_fields: ClassVar[tuple[str, ...]] = ("inputs", "labels", "puzzle_identifiers")

    def build(self, arch: ArchConfig, dims: ModelDims) -> nn.Module:
        return build_loss_head(arch, dims)

    def optimizer_groups(
        self, head: nn.Module, freeze_weights: bool, encoder_lr_scale: float = 0.0
    ) -> dict[str, OptimizerGroup]:
        if encoder_lr_scale > 0:
            raise ConfigError(
                "encoder_lr_scale applies to models with a demonstration encoder (arch=etrm, "
                "etrm_fct, etrmtrm); this model has none: leave encoder_lr_scale at 0"
            )
        groups: dict[str, OptimizerGroup] = {}
        table = self.puzzle_embedding(head)
        if table is not None:
            groups["puzzle_emb"] = OptimizerGroup("sign_sgd", list(table.buffers()))
        if freeze_weights:
            if table is None:
                raise ConfigError(
                    "freeze_weights trains only the puzzle embedding, but it is disabled "
                    "(arch.puzzle_emb_ndim=0)"
                )
            # Only the embedding trains: no gradient is computed for the other weights at all.
            for p in head.parameters():
                p.requires_grad_(False)
        else:
            groups["weights"] = OptimizerGroup("adam_atan2", list(head.parameters()))
        return groups

    def capabilities(self, arch: ArchConfig, head: nn.Module) -> Capabilities:
        return Capabilities(
            halting=arch.has_halting,
            cycle_losses=arch.has_cycle_losses,
            sparse_embedding=self.puzzle_embedding(head) is not None,
            per_sample_layers=next(uncollected_parameters(head), None) is None,
            traceable=True,
        )


FAMILIES.add("recursive", RecursiveFamily())
