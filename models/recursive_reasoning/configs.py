"""Config schemas of the recursive-reasoning architectures (``config/arch/*.yaml``).

Keys, meanings and defaults are upstream's (``config/arch/*.yaml`` and the ``*Config`` classes
of ``models/recursive_reasoning/*.py`` in SamsungSAILMontreal/TinyRecursiveModels); paper
symbols (T, n, N_sup) in the descriptions. Every architecture, the transformer baseline
included, shares ``ACTArchConfig``. Each schema is registered under a short name with
upstream's ``module@Class`` string as an alias. Keys the model gets from the data
(``batch_size``, ``seq_len``, ``vocab_size``, ``num_puzzle_identifiers``) are not part of the
YAML and are passed separately (``ModelDims``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.arch_config import ARCH_CONFIGS, ArchConfig

PosEncodings = Literal["rope", "learned", "none"]
ForwardDtype = Literal["bfloat16", "float16", "float32"]


class ACTArchConfig(ArchConfig):
    """Keys shared by every ACT architecture: sizes, halting, positions and precision."""

    halt_exploration_prob: float = Field(
        0.1, ge=0, le=1, description="probability of a random minimum step count in training"
    )
    halt_max_steps: int = Field(16, ge=1, description="N_sup: maximum supervision (ACT) steps")
    H_cycles: int = Field(3, ge=1, description="T: outer recursions per ACT step")
    L_cycles: int = Field(6, ge=1, description="n: latent updates per outer recursion")
    H_layers: int = Field(0, ge=0, description="blocks of the high-level network (HRM)")
    L_layers: int = Field(2, ge=1, description="blocks of the (low-level) network")
    hidden_size: int = Field(512, ge=1, description="D: model width")
    num_heads: int = Field(8, ge=1, description="attention heads")
    expansion: float = Field(4, gt=0, description="SwiGLU width / hidden_size")
    puzzle_emb_ndim: int = Field(512, ge=0, description="0 disables the puzzle embedding")
    pos_encodings: PosEncodings = Field("rope", description="rope | learned | none")
    forward_dtype: ForwardDtype = Field("bfloat16", description="activation dtype")
    mlp_t: bool = Field(False, description="mix tokens with an MLP over the sequence axis")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMS norm epsilon")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    no_ACT_continue: bool = Field(
        False,
        description="halt on q_halt > 0 alone instead of q_halt > q_continue; TRM (default "
        "True there) then also skips the bootstrapped Q-continue target, HRM keeps it",
    )
    halt_at_eval: bool = Field(
        False, description="new: evaluation stops a sample once its Q head says halt"
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="after each block's final norm (the JD fork's; 0 = upstream)"
    )


class RecursiveArchConfig(ACTArchConfig):
    """The recursive architectures: attention heads must split the width evenly."""

    @model_validator(mode="after")
    def _check_heads(self) -> RecursiveArchConfig:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        return self


@ARCH_CONFIGS.register("trm", aliases=["recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"])
class TRMConfig(RecursiveArchConfig):
    """TinyRecursiveReasoningModel_ACTV1: one shared network f, z ← f(z + y + x), y ← f(y + z)."""

    puzzle_emb_len: int = Field(16, ge=0, description="prefix positions; 0 = ceil(ndim/hidden)")
    no_ACT_continue: bool = Field(True, description="halt on q_halt > 0 alone (TRM's default)")

    @model_validator(mode="after")
    def _check_prefix(self) -> TRMConfig:
        if (
            self.puzzle_emb_len > 0
            and self.puzzle_emb_ndim > self.puzzle_emb_len * self.hidden_size
        ):
            raise ValueError(
                f"puzzle_emb_ndim ({self.puzzle_emb_ndim}) does not fit in puzzle_emb_len "
                f"({self.puzzle_emb_len}) × hidden_size ({self.hidden_size}) prefix positions"
            )
        return self


@ARCH_CONFIGS.register(
    "trmjd", aliases=["recursive_reasoning.trmjd@TinyRecursiveReasoningModelJD_V1"]
)
class TRMJDConfig(TRMConfig):
    """The Jacobian-descent fork's TRM: every H-cycle with gradient (truncated after each),
    per-cycle logits, the previous step's logits in the carry and, with ``no_act``, exactly
    ``halt_max_steps`` supervision steps per sample."""

    no_act: bool = Field(True, description="no Q head: every sample runs halt_max_steps steps")
    dropout: float = Field(0.1, ge=0, lt=1, description="the fork's default")

    @property
    def has_halting(self) -> bool:
        return not self.no_act

    @property
    def has_cycle_losses(self) -> bool:
        return True


@ARCH_CONFIGS.register(
    "trm_singlez", aliases=["recursive_reasoning.trm_singlez@TinyRecursiveReasoningModel_ACTV1"]
)
class TRMSingleZConfig(TRMConfig):
    """Single-latent ablation: only z is carried, z ← f(z + x) n times then z ← f(z)."""


@ARCH_CONFIGS.register(
    "trm_hier6", aliases=["recursive_reasoning.trm_hier6@TinyRecursiveReasoningModel_ACTV1"]
)
class TRMHier6Config(TRMConfig):
    """Multi-scale ablation with six latents z_L1..z_L6; needs L_cycles <= 6."""

    @model_validator(mode="after")
    def _check_l_cycles(self) -> TRMHier6Config:
        if self.L_cycles > 6:
            raise ValueError(
                f"trm_hier6 has six latents: L_cycles must be <= 6, got {self.L_cycles}"
            )
        return self


@ARCH_CONFIGS.register("hrm", aliases=["recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1"])
class HRMConfig(RecursiveArchConfig):
    """HRM re-implemented in the TRM code: separate H_level and L_level, one-step gradient."""

    H_cycles: int = Field(2, ge=1, description="T: high-level updates per ACT step")
    L_cycles: int = Field(2, ge=1, description="low-level updates per high-level update")
    H_layers: int = Field(4, ge=1, description="blocks of the high-level network")
    L_layers: int = Field(4, ge=1, description="blocks of the low-level network")


@ARCH_CONFIGS.register(
    "transformers_baseline", aliases=["recursive_reasoning.transformers_baseline@Model_ACTV2"]
)
class TransformerBaselineConfig(ACTArchConfig):
    """Non-recursive baseline: z_H ← H_level(z_H + x) once per ACT step.

    ``num_heads`` need not divide ``hidden_size`` here (upstream's 12 heads of 42 on 512).
    """

    H_cycles: int = Field(1, ge=1, description="ignored (kept for compatibility)")
    L_cycles: int = Field(1, ge=1, description="ignored (kept for compatibility)")
    H_layers: int = Field(8, ge=1, description="transformer blocks")
    L_layers: int = Field(0, ge=0, description="ignored (kept for compatibility)")
    num_heads: int = Field(12, ge=1, description="attention heads")
    pos_encodings: Literal["rope", "learned"] = Field("rope", description="rope | learned")
    act_enabled: bool = Field(True, description="ACT halting in training")
    act_inference: bool = Field(False, description="ACT halting at evaluation")
    compute_target_q: bool = Field(
        False, description="train q_continue on a bootstrapped target (upstream: never)"
    )

    @model_validator(mode="after")
    def _check_halting_keys(self) -> TransformerBaselineConfig:
        # The baseline's own ACT switches replace the shared halting keys.
        if self.halt_at_eval:
            raise ValueError("transformers_baseline halts at evaluation with act_inference=True")
        if self.no_ACT_continue:
            raise ValueError(
                "transformers_baseline always halts on q_halt > q_continue; no_ACT_continue "
                "is not supported (compute_target_q trains q_continue)"
            )
        return self
