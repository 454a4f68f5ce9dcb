"""The base of every architecture schema (``config/arch/*.yaml``) and its registry.

An architecture config names its model (``name``, canonical after validation), its loss head
(``loss``) and answers what the training side asks of it: whether the model learns to halt,
whether it produces per-H-cycle losses or a KL term, and how many optimizer steps it takes per
batch. Schemas register themselves in ``ARCH_CONFIGS`` under a short name with upstream's
``module@Class`` string as an alias.
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from utils.registry import Registry
from utils.schema import StrictModel

# Canonical loss-head name → upstream aliases (``arch.loss.name: losses@ACTLossHead``).
LOSS_HEAD_ALIASES: dict[str, tuple[str, ...]] = {
    "ACTLossHead": ("losses@ACTLossHead",),
    "NoACTLossHead": ("losses@NoACTLossHead",),
}


class LossConfig(StrictModel):
    """``arch.loss``: the loss head wrapping the model and its per-token loss function."""

    name: str = Field("ACTLossHead", description="loss head: ACTLossHead or NoACTLossHead")
    loss_type: Literal["stablemax_cross_entropy", "softmax_cross_entropy"] = Field(
        "stablemax_cross_entropy", description="per-token loss (upstream: stablemax)"
    )
    differential_loss: bool = Field(
        False, description="the LM loss sees logits minus the previous step's (arch=trmjd)"
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data:
            name = data["name"]
            for canonical, aliases in LOSS_HEAD_ALIASES.items():
                if name == canonical or name in aliases:
                    return {**data, "name": canonical}
            choices = ", ".join(LOSS_HEAD_ALIASES)
            raise ValueError(f"unknown loss head '{name}'; choose one of: {choices}")
        return data

    def head_options(self) -> dict[str, Any]:
        """Keyword arguments of the loss head (``LOSS_HEADS``) besides the model."""
        return {"loss_type": self.loss_type, "differential_loss": self.differential_loss}


class ArchConfig(StrictModel):
    """Base of every architecture schema: ``name`` and ``loss``, plus the model's capabilities.

    ``family`` names the model family (``models.family.FAMILIES``) that builds the model.
    """

    family: ClassVar[str] = "recursive"

    name: str = Field(description="architecture (config/arch/<name>.yaml)")
    loss: LossConfig = Field(default_factory=LossConfig, description="the loss head")

    @property
    def has_halting(self) -> bool:
        """Whether the model has a Q head whose halting losses are trained."""
        return True

    @property
    def has_cycle_losses(self) -> bool:
        """Whether the model outputs per-H-cycle logits (``internal_token_loss``)."""
        return False

    @property
    def has_kl_loss(self) -> bool:
        """Whether the loss has a KL term (a variational encoder, ``LossOutput.kl_loss``)."""
        return False

    @property
    def optimizer_steps_per_batch(self) -> int | None:
        """Optimizer steps taken on each batch, a fixed number for fixed-computation-time
        models (ETRM-FCT: ``num_act_steps``); None for dynamic ACT, one step per batch with
        the carry persisting across batches."""
        return None


ARCH_CONFIGS: Registry[type[ArchConfig]] = Registry(
    "architecture",
    modules=["models.recursive_reasoning.configs", "models.etrm.configs", "models.etrm.etrmtrm"],
)


LOSS_TYPES: tuple[str, ...] = typing.get_args(LossConfig.model_fields["loss_type"].annotation)
