"""Config schemas of the encoder-conditioned TRM architectures (``arch=etrm``, ``arch=etrm_fct``).

ETRM (bdsaglam/etrm, ``models/recursive_reasoning/etrm.py``, ``TRMEncoderConfig``) keeps TRM's
decoder and its keys (H/L cycles, layers, width, halting) and replaces the learned puzzle
embedding with a demonstration encoder whose ``puzzle_emb_len`` output tokens become the prefix;
``puzzle_emb_ndim`` stays 0 as in ETRM's YAML. Key names and defaults are ETRM's
(``config/arch/etrm.yaml``; the FCT variant's ``num_act_steps`` from ``config/arch/
trm_encoder.yaml`` at 67e3e0b), plus three of ours that make ETRM's implicit choices explicit:
``context_scale``, ``conditioning_refresh``, ``eval_context`` and the encoder family's optimizer
handling.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from models.arch_config import ARCH_CONFIGS, LossConfig
from models.encoders.base import ENCODERS, EncoderConfig
from models.recursive_reasoning.configs import TRMConfig

ContextScale = Literal["embed_scale", "none", "learned"]
ConditioningRefresh = Literal["every_step", "on_reset_detached"]
EvalContext = Literal["cached", "reencode"]


class ETRMLossConfig(LossConfig):
    """``arch.loss`` of the encoder models: TRM's loss head plus the KL weight."""

    kl_weight: float = Field(
        1e-4,
        ge=0,
        description="β: weight of a variational encoder's KL term, Σ_b KL_b reduced like the LM "
        "loss (ETRM: 1e-4, then effectively divided by the batch once more)",
    )

    def head_options(self) -> dict[str, Any]:
        return {**super().head_options(), "kl_weight": self.kl_weight}


@ARCH_CONFIGS.register(
    "etrm",
    aliases=[
        "recursive_reasoning.etrm@TRMWithEncoder",
        # The same loop's earlier module (config/arch/trm_encoder_original.yaml at 67e3e0b).
        "recursive_reasoning.etrm_original@TRMWithEncoder",
    ],
)
class ETRMConfig(TRMConfig):
    """TRMWithEncoder: TRM's decoder conditioned on an encoder of the task's demonstrations.

    One call is one ACT step with TRM's carry, halting and exploration; the demonstrations are
    re-encoded at every step with gradient (``conditioning_refresh=every_step``).
    """

    family: ClassVar[str] = "encoder"

    loss: ETRMLossConfig = Field(
        default_factory=ETRMLossConfig, description="the loss head, with the KL weight"
    )
    puzzle_emb_ndim: int = Field(
        0, ge=0, description="must be 0: the encoder's context replaces the puzzle embedding"
    )
    puzzle_emb_len: int = Field(
        16, ge=1, description="T: context tokens the encoder emits, the decoder's prefix"
    )
    halt_exploration_prob: float = Field(
        0.1,
        ge=0,
        le=1,
        description="probability of a random minimum step count in training (TRM's 0.1; "
        "ETRM's reported runs used 0.5)",
    )

    encoder_type: str = Field("standard", description="demonstration encoder (ENCODERS name)")
    encoder_num_layers: int = Field(2, ge=1, description="depth of the per-demo grid encoder")
    encoder_pooling_method: Literal["mean", "attention", "weighted"] = Field(
        "mean", description="grid-encoder pooling over a demo's tokens"
    )
    encoder_set_layers: int = Field(
        1, ge=1, description="cross-attention layers of the set encoder over the demos"
    )
    encoder_layer_scale_init: float = Field(
        0.0, ge=0, description="CaiT layer-scale initial value; 0 disables it"
    )
    encoder_norm_style: Literal["post", "pre"] = Field(
        "post", description="RMS-norm placement in the encoder blocks"
    )
    encoder_qk_norm: bool = Field(
        False, description="RMS-normalise the encoder's queries and keys per head"
    )
    lpn_latent_dim: int = Field(
        32, ge=1, description="latent width of lpn_var (ETRM never passed it on: always 32)"
    )
    freeze_encoder: bool = Field(
        False, description="the encoder's weights get no gradient (a diagnostic)"
    )
    context_scale: ContextScale = Field(
        "embed_scale",
        description="how the context enters: embed_scale multiplies it by √hidden_size with "
        "the grid tokens (ETRM; about 22× their RMS at D=512), none leaves it unscaled, learned "
        "multiplies by a learned scale that starts at √hidden_size",
    )
    conditioning_refresh: ConditioningRefresh = Field(
        "every_step",
        description="every_step re-encodes every row at every step with gradient (ETRM); "
        "on_reset_detached encodes only rows that start an item and carries the context "
        "detached (ETRM's deprecated cached mode: starves the encoder of gradient)",
    )

    eval_context: EvalContext = Field(
        "cached",
        description="evaluation: cached encodes an item's demos once, when it starts, and reuses "
        "the context for its later steps (encoders deterministic at evaluation; the same "
        "outputs); reencode runs the encoder at every step, as ETRM did",
    )

    @field_validator("encoder_type")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        return ENCODERS.canonical(value)

    @model_validator(mode="after")
    def _check_encoder_keys(self) -> ETRMConfig:
        if self.puzzle_emb_ndim != 0:
            raise ValueError(
                f"puzzle_emb_ndim is {self.puzzle_emb_ndim}, but arch={self.name} is conditioned "
                "on its demonstrations, not on a puzzle table: set arch.puzzle_emb_ndim=0"
            )
        if self.has_kl_loss and self.loss.kl_weight == 0:
            raise ValueError(
                f"encoder_type '{self.encoder_type}' is variational and needs a KL term: set "
                "arch.loss.kl_weight > 0 (ETRM: 1e-4)"
            )
        return self

    @property
    def has_kl_loss(self) -> bool:
        return ENCODERS.get(self.encoder_type).is_variational

    def encoder_config(self, vocab_size: int, seq_len: int) -> EncoderConfig:
        """The encoder's config: the decoder's width, heads, expansion, norm epsilon and
        dtype, ``output_tokens = puzzle_emb_len``, and the ``encoder_*`` keys."""
        return EncoderConfig(
            encoder_type=self.encoder_type,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_layers=self.encoder_num_layers,
            output_tokens=self.puzzle_emb_len,
            vocab_size=vocab_size,
            seq_len=seq_len,
            expansion=self.expansion,
            rms_norm_eps=self.rms_norm_eps,
            forward_dtype=self.forward_dtype,
            pooling_method=self.encoder_pooling_method,
            set_encoder_layers=self.encoder_set_layers,
            layer_scale_init=self.encoder_layer_scale_init,
            norm_style=self.encoder_norm_style,
            qk_norm=self.encoder_qk_norm,
            lpn_latent_dim=self.lpn_latent_dim,
        )


@ARCH_CONFIGS.register("etrm_fct")
class ETRMFCTConfig(ETRMConfig):
    """ETRM-FCT, fixed computation time (ETRM's ``pretrain_encoder.py`` at 67e3e0b): each batch
    gets ``num_act_steps`` ACT steps, each with its own optimizer step, from a fresh carry; no
    halting in training. Evaluation is ETRM's (``halt_max_steps`` steps)."""

    num_act_steps: int = Field(
        4, ge=1, description="N: ACT steps, each an optimizer step, per training batch"
    )

    @property
    def optimizer_steps_per_batch(self) -> int | None:
        return self.num_act_steps
