"""Architecture name → model class, and the constructors the training code calls.

Names are those of ``config/arch/*.yaml`` (``ARCH_CONFIGS``); upstream's ``module@Class``
strings resolve through the config registry's aliases before they get here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.arch_config import ARCH_CONFIGS, ArchConfig
from models.recursive_reasoning.act import ACTModel
from models.recursive_reasoning.common import ModelDims
from models.sparse_embedding import CastedSparseEmbedding
from utils.registry import Registry

MODELS: Registry[type[ACTModel]] = Registry(
    "architecture",
    modules=[
        "models.recursive_reasoning.trm",
        "models.recursive_reasoning.trmjd",
        "models.recursive_reasoning.trm_singlez",
        "models.recursive_reasoning.trm_hier6",
        "models.recursive_reasoning.hrm",
        "models.recursive_reasoning.transformers_baseline",
        "models.etrm.model",
        "models.etrm.etrmtrm",
    ],
)


def build_model(config: ArchConfig, dims: ModelDims) -> ACTModel:
    """The ACT model for a validated architecture config."""
    name = ARCH_CONFIGS.canonical(config.name)
    return MODELS.get(name)(config, dims)


def build_loss_head(config: ArchConfig, dims: ModelDims, **head_options: Any) -> nn.Module:
    """``config.loss.name`` wrapped around the model (state-dict keys ``model.inner...``), built
    with ``config.loss.head_options()`` and the family's own ``head_options``."""
    from models.losses import LOSS_HEADS

    model = build_model(config, dims)
    return LOSS_HEADS.get(config.loss.name)(model, **config.loss.head_options(), **head_options)


def describe_model(module: nn.Module) -> dict[str, int]:
    """Sizes every run reports: trainable parameters (upstream's ``num_params``) and the
    puzzle-embedding table, which upstream's count leaves out because it is a buffer (TRM#18)."""
    info = {"num_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    tables = [m for m in module.modules() if isinstance(m, CastedSparseEmbedding)]
    info["puzzle_emb_rows"] = sum(int(t.weights.shape[0]) for t in tables)
    info["puzzle_emb_bytes"] = sum(t.weights.numel() * t.weights.element_size() for t in tables)
    return info
