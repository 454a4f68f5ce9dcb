"""The encoder family: models conditioned on their task's demonstrations (ETRM).

They read each row's demo pairs (``demo_inputs``, ``demo_labels``, ``demo_mask``) and its task
group (``group_ids``, for the collapse diagnostics) besides TRM's fields, have no puzzle table,
and train every weight with AdamATan2: in one optimizer, or, with ``encoder_lr_scale > 0``, the
encoder in a second one at that learning-rate scale and a tenth of the weight decay (ETRM's
``pretrain_etrm.py``). The loss head also reports ETRM's all-steps metrics.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from models.arch_config import ArchConfig
from models.encoders.base import DemoEncoder
from models.family import FAMILIES, Capabilities, ModelFamily, OptimizerGroup
from models.recursive_reasoning.common import ModelDims
from models.registry import build_loss_head
from utils.schema import ConfigError

ENCODER_WEIGHT_DECAY_SCALE = 0.1  # ETRM: the encoder's optimizer has weight_decay × 0.1


def encoder_of(head: nn.Module) -> DemoEncoder:
    """The demonstration encoder inside ``head``."""
    encoders = [m for m in head.modules() if isinstance(m, DemoEncoder)]
    if len(encoders) != 1:
        raise ValueError(f"expected one demonstration encoder in the model, found {len(encoders)}")
    return encoders[0]


def _split(head: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder parameters, the others), each in module order."""
    encoder_ids = {id(p) for p in encoder_of(head).parameters()}
    params = list(head.parameters())
    return (
        [p for p in params if id(p) in encoder_ids],
        [p for p in params if id(p) not in encoder_ids],
    )


class EncoderFamily(ModelFamily):
    """Demonstration-conditioned ACT models (``ARCH_CONFIGS`` entries with
    ``family = "encoder"``: ``etrm``, ``etrm_fct``)."""

    name: ClassVar[str] = "encoder"
    batch_fields: ClassVar[tuple[str, ...]] = (
        "inputs",
        "labels",
        "puzzle_identifiers",
        "demo_inputs",
        "demo_labels",
        "demo_mask",
        "group_ids",
    )

    def build(self, arch: ArchConfig, dims: ModelDims) -> nn.Module:
        return build_loss_head(arch, dims, all_steps_metrics=True)

    def optimizer_groups(
        self, head: nn.Module, freeze_weights: bool, encoder_lr_scale: float = 0.0
    ) -> dict[str, OptimizerGroup]:
        """``weights`` (every parameter), or with ``encoder_lr_scale > 0`` ``weights`` (the
        decoder) and ``encoder``."""
        if freeze_weights:
            raise ConfigError(
                "freeze_weights trains only a puzzle embedding, which encoder-conditioned "
                "models do not have; drop freeze_weights (arch.freeze_encoder freezes the encoder)"
            )
        if encoder_lr_scale < 0:
            raise ConfigError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
        if encoder_lr_scale == 0:
            return {"weights": OptimizerGroup("adam_atan2", list(head.parameters()))}
        encoder, decoder = _split(head)
        return {
            "weights": OptimizerGroup("adam_atan2", decoder),
            "encoder": OptimizerGroup(
                "adam_atan2",
                encoder,
                lr_scale=encoder_lr_scale,
                weight_decay_scale=ENCODER_WEIGHT_DECAY_SCALE,
            ),
        }

    def capabilities(self, arch: ArchConfig, head: nn.Module) -> Capabilities:
        return Capabilities(
            halting=arch.has_halting,
            cycle_losses=arch.has_cycle_losses,
            sparse_embedding=False,
            # The encoder runs the valid demo slots packed, [Σ demos, S, D]: its layers' leading
            # axis is not the samples', so per-sample gradients of its weights do not exist, and
            # Jacobian descent is refused (the summed objective trains it).
            per_sample_layers=False,
            traceable=True,
            kl_loss=arch.has_kl_loss,
            jacobian_descent=False,
        )

    def norm_groups(self, head: nn.Module) -> dict[str, list[nn.Parameter]]:
        """``encoder`` and ``decoder`` (everything else): their trainable parameters."""
        encoder, decoder = _split(head)
        return {
            "encoder": [p for p in encoder if p.requires_grad],
            "decoder": [p for p in decoder if p.requires_grad],
        }


FAMILIES.add("encoder", EncoderFamily())
