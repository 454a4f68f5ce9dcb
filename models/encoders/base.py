"""The interface every demonstration encoder implements, and the registry that names them.

ETRM (bdsaglam/etrm, ``models/encoders/base.py``) conditions the TRM decoder on its task's
demonstration pairs instead of a learned per-puzzle vector: an encoder reads a padded set of
K demo pairs and returns T context tokens that take the puzzle embedding's place as the prefix.
Shapes: B batch rows, K demo slots (``max_demos``), S grid tokens (900), T context tokens
(``puzzle_emb_len``), D hidden size.

An encoder is an ``nn.Module`` subclassing ``DemoEncoder``, built from an ``EncoderConfig`` and
registered under ETRM's ``encoder_type`` name::

    @ENCODERS.register("standard")
    class StandardDemoEncoder(DemoEncoder): ...

Its ``forward(demo_inputs [B, K, S], demo_labels [B, K, S], demo_mask [B, K])`` returns an
``EncoderOutput``. Every row must come out finite, a row without any valid demo included (its
context is then whatever the encoder makes of an empty set, and its KL is 0).

Packed encoding: ETRM runs its grid encoder on all K slots, empty ones included (3-4 real
demos of 10 on ARC, so 65-70 % of that work is wasted). ``encode_demo_slots`` runs it once on
the valid (row, slot) pairs only and scatters the vectors back to [B, K, Dg], zeros elsewhere;
``DemoEncoder.pack_demos = False`` selects the padded all-slots path instead, which gives the
same result (it is kept for comparisons and for compilers that want static shapes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
from pydantic import Field
from torch import nn

from utils.registry import Registry
from utils.schema import StrictModel


class EncoderConfig(StrictModel):
    """What every encoder is built from (ETRM's ``DemoEncoderConfig``, minus its dead fields).

    The architecture config (``arch.encoder_*``) fills it; ``hidden_size``, ``num_heads``,
    ``expansion``, ``rms_norm_eps`` and ``forward_dtype`` are the decoder's, ``output_tokens`` is
    its ``puzzle_emb_len``.
    """

    encoder_type: str = Field("standard", description="ENCODERS name")
    hidden_size: int = Field(512, ge=1, description="D: the decoder's width")
    num_heads: int = Field(8, ge=1, description="attention heads")
    num_layers: int = Field(2, ge=1, description="grid-encoder depth (arch.encoder_num_layers)")
    output_tokens: int = Field(16, ge=1, description="T context tokens (arch.puzzle_emb_len)")
    vocab_size: int = Field(12, ge=2, description="0 = PAD, 1 = EOS, 2..11 = colours")
    seq_len: int = Field(900, ge=1, description="S tokens per grid (30 × 30)")
    expansion: float = Field(4.0, gt=0, description="SwiGLU width / hidden_size")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMS norm epsilon")
    forward_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="activation dtype"
    )
    pooling_method: Literal["mean", "attention", "weighted"] = Field(
        "mean", description="grid-encoder pooling (standard family)"
    )
    set_encoder_layers: int = Field(1, ge=1, description="cross-attention layers over demos")
    layer_scale_init: float = Field(0.0, ge=0, description="CaiT layer scale; 0 = off")
    norm_style: Literal["post", "pre"] = Field("post", description="standard family blocks")
    qk_norm: bool = Field(False, description="RMS-normalise queries and keys per head")
    lpn_latent_dim: int = Field(32, ge=1, description="latent width of lpn_var")
    # Recurrent encoders (arch=etrmtrm) only.
    encoder_h_cycles: int = Field(3, ge=1, description="recurrent encoders: outer cycles")
    encoder_l_cycles: int = Field(1, ge=1, description="recurrent encoders: inner cycles")


@dataclass
class EncoderOutput:
    """What an encoder returns.

    * ``context`` [B, T, D] in the forward dtype, with gradient: the decoder's prefix tokens.
    * ``z_pooled`` [B, Dz]: one vector per row, for diagnostics (ETRM's: the context's token mean,
      or the pooled latent); Dz = D except for ``lpn`` (128, its own width) and ``lpn_var``
      (``lpn_latent_dim``).
    * ``kl_per_sample`` [B] float32, variational encoders only: each row's KL divergence to the
      unit Gaussian, summed over latent dimensions (averaged over a row's valid demos for
      per-demo latents), 0 for rows without demos. The loss head sums it like the LM loss.
    * ``mu``, ``logvar``: the posterior's parameters, variational encoders only.
    * ``state``: recurrent encoders only, the carried state after this step (detached).
    """

    context: torch.Tensor
    z_pooled: torch.Tensor | None = None
    kl_per_sample: torch.Tensor | None = None
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    state: dict[str, torch.Tensor] | None = None


class DemoEncoder(nn.Module, ABC):
    """A demonstration encoder: demo pairs in, ``output_tokens`` context tokens out.

    Capability flags the model and training side read instead of encoder names:

    * ``is_variational``: samples a latent in training (and uses its mean at evaluation), so it
      returns ``kl_per_sample``;
    * ``is_recurrent``: carries a state across ACT steps (``initial_state`` and the ``state``
      argument), so its context cannot be cached;
    * ``deterministic_at_eval``: in eval mode the same demos always give the same context, so an
      evaluation may encode each item once instead of at every ACT step.
    """

    is_variational: ClassVar[bool] = False
    is_recurrent: ClassVar[bool] = False

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.forward_dtype: torch.dtype = getattr(torch, config.forward_dtype)
        self.pack_demos = True  # encode only the valid demo slots (module doc)

    @property
    def deterministic_at_eval(self) -> bool:
        return not self.is_recurrent

    def as_context(self, flat: torch.Tensor) -> torch.Tensor:
        """[B, T·D] → the context [B, T, D] in the forward dtype."""
        tokens = flat.unflatten(-1, (self.config.output_tokens, self.config.hidden_size))
        return tokens.to(self.forward_dtype)

    def initial_state(
        self, batch_size: int, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Recurrent encoders: the state of a row that starts a new item."""
        return {}

    @abstractmethod
    def forward(
        self,
        demo_inputs: torch.Tensor,
        demo_labels: torch.Tensor,
        demo_mask: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
    ) -> EncoderOutput:
        """demo_inputs, demo_labels int [B, K, S] (PAD 0), demo_mask bool [B, K] → output."""


class GridEncoder(Protocol):
    """What ``encode_demo_slots`` needs of a grid encoder: input and output grids int [N, S]
    → [N, output_size] in ``output_dtype``."""

    output_size: int
    output_dtype: torch.dtype

    def __call__(self, input_grid: torch.Tensor, output_grid: torch.Tensor) -> torch.Tensor: ...


def encode_demo_slots(
    grid_encoder: GridEncoder,
    demo_inputs: torch.Tensor,
    demo_labels: torch.Tensor,
    demo_mask: torch.Tensor,
    pack: bool = True,
) -> torch.Tensor:
    """Every valid demo slot through ``grid_encoder``: int [B, K, S] × 2, bool [B, K] →
    [B, K, Dg] with zeros at the invalid slots.

    ``pack``: gather the valid slots into [N_valid, S], encode them in one call and scatter the
    result back; otherwise encode all B·K slots (ETRM's way) and zero the invalid ones.
    """
    B, K, S = demo_inputs.shape
    if demo_labels.shape != demo_inputs.shape or demo_mask.shape != (B, K):
        raise ValueError(
            f"demo_inputs {tuple(demo_inputs.shape)}, demo_labels {tuple(demo_labels.shape)} "
            f"and demo_mask {tuple(demo_mask.shape)} must be [B, K, S], [B, K, S] and [B, K]"
        )
    inputs, labels = demo_inputs.reshape(B * K, S), demo_labels.reshape(B * K, S)
    mask = demo_mask.reshape(B * K).to(torch.bool)
    if not pack:
        encoded = grid_encoder(inputs, labels)
        return (encoded * mask.unsqueeze(-1).to(encoded.dtype)).view(B, K, -1)
    slots = torch.zeros(
        B * K, grid_encoder.output_size, dtype=grid_encoder.output_dtype, device=mask.device
    )
    valid = mask.nonzero().squeeze(-1)  # one host sync: N_valid decides the work
    if valid.numel() > 0:
        slots = slots.index_copy(0, valid, grid_encoder(inputs[valid], labels[valid]))
    return slots.view(B, K, -1)


def masked_mean_over_demos(x_BKD: torch.Tensor, demo_mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, K, D] over each row's valid slots (demo_mask bool [B, K]) → [B, D];
    0 for a row without any."""
    weights = demo_mask.unsqueeze(-1).to(x_BKD.dtype)
    return (x_BKD * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class PerDemoEncoder(DemoEncoder):
    """An encoder that reads each demo pair on its own with ``self.grid_encoder`` (a
    ``GridEncoder``), then ``aggregate``s the slot vectors into the output."""

    grid_encoder: nn.Module

    def forward(
        self,
        demo_inputs: torch.Tensor,
        demo_labels: torch.Tensor,
        demo_mask: torch.Tensor,
        state: dict[str, torch.Tensor] | None = None,
    ) -> EncoderOutput:
        demo_mask = demo_mask.to(torch.bool)
        slots = encode_demo_slots(
            self.grid_encoder, demo_inputs, demo_labels, demo_mask, self.pack_demos
        )
        return self.aggregate(slots, demo_mask)

    @abstractmethod
    def aggregate(self, slots: torch.Tensor, demo_mask: torch.Tensor) -> EncoderOutput:
        """slots [B, K, Dg] (zeros at invalid slots), demo_mask bool [B, K] → output."""


ENCODERS: Registry[type[DemoEncoder]] = Registry(
    "encoder_type",
    # Each encoder module adds itself here.
    modules=[
        "models.encoders.standard",
        "models.encoders.variational",
        "models.encoders.lpn_standard",
        "models.encoders.lpn_variational",
        "models.encoders.hybrid_standard",
        "models.encoders.hybrid_variational",
        "models.encoders.lpn",
        "models.encoders.trm_style",
        "models.encoders.recurrent_standard",
    ],
)


def build_encoder(config: EncoderConfig) -> DemoEncoder:
    """The registered encoder ``config.encoder_type`` names."""
    return ENCODERS.get(config.encoder_type)(config)
