"""What every recursive-reasoning architecture shares: blocks, input embedding and heads.

An architecture is an ``_Inner`` module (one supervision step of recursion, subclassing
``RecursiveInner``) wrapped by ``ACTModel`` (adaptive computation time over supervision steps,
with the carry that persists across batches; ``models.recursive_reasoning.act``). Module and
buffer names follow upstream so that its checkpoints load: ``inner.embed_tokens``,
``inner.lm_head``, ``inner.q_head``, ``inner.puzzle_emb``, ``inner.rotary_emb`` /
``inner.embed_pos``, ``inner.L_level.layers.N``...

Seams for the roadmap:
* conditioning: ``RecursiveInner.condition(batch)`` produces the prefix tokens [B, P, D]; the
  puzzle embedding is today's implementation, a demonstration encoder can override it;
* recording (``models.recursive_reasoning.recording``): ``record_steps(model, rows=...,
  latents=..., decode=...)`` collects every latent update of a forward without gradients, for
  step-by-step tracing: by default only what the LM head predicts from each latent, for the
  rows asked for; ``probes=True`` adds the decode of ``probe_h_update`` after every inner
  update, and ``perturbing_injection`` alters the input injection (``input_embeddings``).

Each inner model's ``forward`` returns an ``InnerOutput``; ``ACTModel`` turns it into the
outputs dict the loss head reads (upstream ``models/recursive_reasoning/trm.py``,
``TinyRecursiveReasoningModel_ACTV1.forward``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.common import trunc_normal_init_
from models.layers import (
    Attention,
    CastedEmbedding,
    CastedLinear,
    CosSin,
    RotaryEmbedding,
    SwiGLU,
    rms_norm,
)
from models.recursive_reasoning.configs import ACTArchConfig
from models.recursive_reasoning.recording import RecordingSite
from models.sparse_embedding import CastedSparseEmbedding

Batch = dict[str, torch.Tensor]
InnerCarry = dict[str, torch.Tensor]  # named latents, e.g. {"z_H": [B, S, D], "z_L": [B, S, D]}


@dataclass(frozen=True)
class InnerOutput:
    """What one supervision step of an inner model returns (upstream returned the tuple
    ``(carry, logits, (q_halt, q_continue))``).

    Shapes: B batch, P prefix positions, S grid tokens, D hidden, V vocabulary, T ``H_cycles``.

    * ``carry``: the latents after the step, detached: {name: [B, P + S, D]} in the forward
      dtype (TRM-JD also carries ``output_logits`` [B, S, V]).
    * ``logits`` [B, S, V] in the forward dtype, prefix dropped, with grad: the step's prediction.
    * ``q_halt``, ``q_continue`` [B] float32 (constant zeros for a model without a Q head).
    * ``cycle_logits``: for models scored after every H-cycle (TRM-JD), T + 1 tensors
      [B, S, V], entry 0 zeros and entry T ``logits`` itself; None for the others.
    """

    carry: InnerCarry
    logits: torch.Tensor
    q_halt: torch.Tensor
    q_continue: torch.Tensor
    cycle_logits: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class ModelDims:
    """Sizes that come from the data, not the architecture config (upstream injected them)."""

    batch_size: int  # local (per-process) batch size: the sparse embedding's gradient buffer
    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{name}'")
    return dtype


def prefix_length(puzzle_emb_ndim: int, hidden_size: int, puzzle_emb_len: int) -> int:
    """Prefix positions: ``puzzle_emb_len``, or ceil(ndim / hidden) when it is 0; none without
    a puzzle embedding (upstream still reserved ``puzzle_emb_len`` positions then and crashed)."""
    if puzzle_emb_ndim == 0:
        return 0
    return puzzle_emb_len if puzzle_emb_len > 0 else -(puzzle_emb_ndim // -hidden_size)


class ReasoningBlock(nn.Module):
    """Post-norm block: ``h = rms(h + mix(h)); h = dropout(rms(h + SwiGLU(h)))``.

    ``mix`` is non-causal self-attention (``self_attn``), or with ``mlp_t`` a SwiGLU over the
    sequence axis (``mlp_t``). In ``mlp_t`` mode the residual and the RMS norm are applied while
    transposed, so the norm runs over the sequence axis — upstream's behaviour, kept on purpose.
    Dropout (the JD fork's) exists only when ``config.dropout > 0``; upstream has none.
    """

    def __init__(self, config: ACTArchConfig, total_seq_len: int) -> None:
        super().__init__()
        self.mlp_t_mode = config.mlp_t
        self.norm_eps = config.rms_norm_eps
        if self.mlp_t_mode:
            self.mlp_t = SwiGLU(hidden_size=total_seq_len, expansion=config.expansion)
        else:
            self.self_attn = Attention(
                hidden_size=config.hidden_size,
                head_dim=config.hidden_size // config.num_heads,
                num_heads=config.num_heads,
                num_key_value_heads=config.num_heads,
                causal=False,
            )
        self.mlp = SwiGLU(hidden_size=config.hidden_size, expansion=config.expansion)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, cos_sin: CosSin | None, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, S, D] → [B, S, D]."""
        h = hidden_states
        if self.mlp_t_mode:
            h_BDS = h.transpose(1, 2)
            h = rms_norm(h_BDS + self.mlp_t(h_BDS), self.norm_eps).transpose(1, 2)
        else:
            h = rms_norm(h + self.self_attn(cos_sin=cos_sin, hidden_states=h), self.norm_eps)
        h = rms_norm(h + self.mlp(h), self.norm_eps)
        return h if self.dropout is None else self.dropout(h)


class ReasoningModule(nn.Module):
    """``f(h, injection) = layers(h + injection)`` (or ``layers(h)`` without injection);
    ``layers`` is a ModuleList of blocks."""

    def __init__(self, layers: list[ReasoningBlock]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_injection: torch.Tensor | None,
        cos_sin: CosSin | None,
    ) -> torch.Tensor:
        h = hidden_states if input_injection is None else hidden_states + input_injection
        for layer in self.layers:
            h = layer(cos_sin=cos_sin, hidden_states=h)
        return h


# ----------------------------------------------------------------------------------------------
# Inner model base
# ----------------------------------------------------------------------------------------------
class RecursiveInner(RecordingSite):
    """Embeddings, heads and conditioning of one recursive model; subclasses define
    ``empty_carry``, ``reset_carry`` and ``forward``.

    Input embedding: ``x = √D · [prefix; embed_tokens(inputs)]`` ([B, P + S, D]), with learned
    positions added as ``(x + pos)/√2`` before the scale, as upstream.
    """

    def __init__(self, config: ACTArchConfig, dims: ModelDims, puzzle_emb_len: int) -> None:
        super().__init__()
        self.config = config
        self.dims = dims
        self.forward_dtype = torch_dtype(config.forward_dtype)
        self.puzzle_emb_len = prefix_length(
            config.puzzle_emb_ndim, config.hidden_size, puzzle_emb_len
        )
        self.total_seq_len = dims.seq_len + self.puzzle_emb_len

        D = config.hidden_size
        self.embed_scale = math.sqrt(D)
        embed_init_std = 1.0 / self.embed_scale
        self.embed_tokens = CastedEmbedding(dims.vocab_size, D, embed_init_std, self.forward_dtype)
        self.lm_head = CastedLinear(D, dims.vocab_size, bias=False)
        if self.uses_q_head():
            self.q_head = CastedLinear(D, 2, bias=True)
        if config.puzzle_emb_ndim > 0:
            # Zero-initialised: every puzzle starts from the same (empty) conditioning.
            self.puzzle_emb = CastedSparseEmbedding(
                dims.num_puzzle_identifiers,
                config.puzzle_emb_ndim,
                batch_size=dims.batch_size,
                init_std=0,
                cast_to=self.forward_dtype,
            )
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(
                dim=D // config.num_heads,
                max_position_embeddings=self.total_seq_len,
                base=config.rope_theta,
            )
        elif config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(
                self.total_seq_len, D, embed_init_std, self.forward_dtype
            )

    def uses_q_head(self) -> bool:
        """Whether the model has a Q head (``q_head``); called once, from ``__init__``."""
        return True

    def _init_q_head(self) -> None:
        if not hasattr(self, "q_head"):
            return
        # q ≈ −5 at start: sigmoid ≈ 0.007, so nothing halts before the head has learnt.
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5)  # type: ignore[union-attr]

    def _init_buffer(self, name: str) -> None:
        """A fixed random start state [D] in the forward dtype (never trained)."""
        init = torch.empty(self.config.hidden_size, dtype=self.forward_dtype)
        self.register_buffer(name, trunc_normal_init_(init, std=1), persistent=True)

    def blocks(self, n: int) -> ReasoningModule:
        return ReasoningModule([ReasoningBlock(self.config, self.total_seq_len) for _ in range(n)])

    def cos_sin(self) -> CosSin | None:
        return self.rotary_emb() if hasattr(self, "rotary_emb") else None

    def condition(self, batch: Batch) -> torch.Tensor | None:
        """The prefix tokens [B, P, D] (the conditioning seam), or None without a prefix.

        Today: the puzzle's learned vector [B, ndim], zero-padded to P·D and viewed as P tokens.
        """
        if self.config.puzzle_emb_ndim == 0:
            return None
        emb = self.puzzle_emb(batch["puzzle_identifiers"])
        pad = self.puzzle_emb_len * self.config.hidden_size - emb.shape[-1]
        if pad > 0:
            emb = F.pad(emb, (0, pad))
        return emb.view(-1, self.puzzle_emb_len, self.config.hidden_size)

    def input_embeddings(self, batch: Batch) -> torch.Tensor:
        """x [B, P + S, D] in the forward dtype."""
        x = self.embed_tokens(batch["inputs"].to(torch.int32))
        prefix = self.condition(batch)
        if prefix is not None:
            x = torch.cat((prefix.to(x.dtype), x), dim=-2)
        if self.config.pos_encodings == "learned":
            # 1/√2 keeps the variance of the sum of two unit-variance terms at 1.
            x = 0.707106781 * self.embed_pos.add_table(x)
        x = self.embed_scale * x
        return x if self.injection_hook is None else self.injection_hook(x)

    def probe_h_update(self, latents: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The H update the latest latents {name: [R, P + S, D]} would give now, [R, P + S, D]
        (the L-step probe; never fed back); None for a model without inner updates.

        The rule every architecture here follows: the answer state (``z_H``, or ``z_L`` for a
        single-latent model) goes through the H network (``H_level``, else the shared
        ``L_level``) with the sum of the other latents as injection (none when there is
        none): TRM ``L_level(z_H, z_L)``, HRM ``H_level(z_H, z_L)``, the multi-scale ablation
        ``L_level(z_H, Σ z_Li)``, single-z ``L_level(z, None)``. An architecture with another
        H update overrides this.
        """
        names = [n for n in self.carry_inits if n in latents]
        if not names or not hasattr(self, "L_level"):
            return None
        state = "z_H" if "z_H" in names else names[0]
        others = [latents[n] for n in names if n != state]
        injection = sum(others[1:], others[0]) if others else None
        level = self.H_level if hasattr(self, "H_level") else self.L_level
        return level(latents[state], injection, cos_sin=self.cos_sin())

    def lm_logits(self, z_H: torch.Tensor) -> torch.Tensor:
        """z_H [B, P + S, D] → logits [B, S, V] in the forward dtype (prefix dropped)."""
        return self.lm_head(z_H)[:, self.puzzle_emb_len :]

    def q_logits(self, z_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_halt [B] and q_continue [B] in float32 from z_H [B, P + S, D].

        The first prefix position acts as a CLS token for the Q head. Without a Q head both
        are constant zeros (no gradient), so halting code and evaluators still run.
        """
        if not hasattr(self, "q_head"):
            zeros = torch.zeros(z_H.shape[0], dtype=torch.float32, device=z_H.device)
            return zeros, zeros
        q = self.q_head(z_H[:, 0]).to(torch.float32)
        return q[..., 0], q[..., 1]

    def readout(self, carry: InnerCarry, z_H: torch.Tensor) -> InnerOutput:
        """The step's ``InnerOutput``: ``carry`` (already detached) with the LM logits
        [B, S, V] (prefix dropped) and the Q logits [B] read from z_H [B, P + S, D]."""
        logits = self.lm_logits(z_H)
        q_halt, q_continue = self.q_logits(z_H)
        return InnerOutput(carry, logits, q_halt, q_continue)

    def empty_latent(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.empty(
            batch_size, self.total_seq_len, self.config.hidden_size,
            dtype=self.forward_dtype, device=device,
        )  # fmt: skip

    def empty_carry(self, batch_size: int, device: torch.device | None = None) -> InnerCarry:
        """Uninitialised latents; every slot starts halted, so the first step resets them."""
        return {name: self.empty_latent(batch_size, device) for name in self.carry_inits}

    def reset_carry(self, reset_flag: torch.Tensor, carry: InnerCarry) -> InnerCarry:
        """Slots where ``reset_flag`` [B] is set restart from their init buffers."""
        flag = reset_flag.view(-1, 1, 1)
        return {
            name: torch.where(flag, getattr(self, buf), carry[name])
            for name, buf in self.carry_inits.items()
        }

    # Latent name → init buffer name; set by subclasses (e.g. {"z_H": "H_init", "z_L": "L_init"}).
    carry_inits: ClassVar[dict[str, str]] = {}

    def forward(self, carry: InnerCarry, batch: Batch) -> InnerOutput:
        """One supervision step from ``carry`` on ``batch`` (inputs [B, S])."""
        raise NotImplementedError
