"""ETRM: TRM's decoder conditioned on an encoder of the task's demonstrations.

ETRM (bdsaglam/etrm, ``models/recursive_reasoning/etrm.py``, ``TRMWithEncoder``) keeps TRM's
inner model and ACT loop and replaces the learned puzzle embedding with the context an encoder
computes from the row's demo pairs: ``encoder(demo_inputs, demo_labels, demo_mask)`` gives
[B, T, D], which takes the puzzle embedding's place as the T prefix tokens (all T filled, where
TRM's 512-d vector fills token 0 and zero-pads the rest). Here the difference to TRM is exactly
``condition()``: the inner model is TRM's, its forward reused.

One call is one ACT step, as TRM's: halted rows reload every field from the batch (their demos
included) and restart from the init states; the carry persists across batches. Where the
context comes from:

* training, ``conditioning_refresh=every_step`` (ETRM): every row is re-encoded at every step,
  with gradient, so the encoder learns from every row;
* training, ``on_reset_detached`` (ETRM's deprecated cached mode, an ablation): only rows that
  start an item are encoded; the others reuse their context, detached, from the carry, so the
  encoder learns only from the few rows that reset;
* evaluation with an encoder that is deterministic there (``eval_context=cached``, the
  default): each item is encoded once, when it starts, and its context reused for its later
  steps, with the same outputs; ``eval_context=reencode`` encodes at all 16, as ETRM did.

A cached context lives in the carry's ``current_data["context"]`` (it belongs to the row's
item like its demos), so it persists across batches and checkpoints.

``TRMWithEncoderFCT`` (ETRM-FCT, ``arch=etrm_fct``) never halts in training: every row ends its
item after ``num_act_steps`` steps, so the next batch starts from a fresh carry.

Names follow ETRM so that its checkpoints load: ``encoder`` and ``inner`` (``embed_tokens``,
``lm_head``, ``q_head``, ``L_level.layers.N``, ``H_init``, ``L_init``, ``rotary_emb``), no
``puzzle_emb``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from models.encoders.base import EncoderOutput, build_encoder
from models.etrm.configs import ETRMConfig, ETRMFCTConfig
from models.etrm.diagnostics import context_diagnostics
from models.losses import DIAGNOSTICS_OUTPUT, KL_OUTPUT
from models.recursive_reasoning.act import ACTCarry, ACTModel
from models.recursive_reasoning.common import Batch, InnerCarry, ModelDims
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1_Inner
from models.registry import MODELS

CONTEXT = "context"  # the inner model's batch key for the prefix, and the carry's cached context
DEMO_FIELDS = ("demo_inputs", "demo_labels", "demo_mask")


class TRMEncoderInner(TinyRecursiveReasoningModel_ACTV1_Inner):
    """TRM's inner model with the encoder's context as its prefix (ETRM's ``TRMEncoderInner``).

    ``forward(carry, batch)`` is TRM's; ``batch["context"]`` [B, T, D] holds the context, and
    the input embedding is ``√D · [context · g; embed_tokens(inputs)]`` with ``g`` set by
    ``context_scale``: 1 for ``embed_scale`` (ETRM: the context is scaled with the grid tokens),
    1/√D for ``none`` (the context enters as it is), and exp(``context_log_scale``)/√D for
    ``learned``, a learned log-scale that starts at ln √D, i.e. at ETRM's scale (weight decay
    draws it towards the unscaled context).
    """

    # Not part of a TRM decoder: ``load_pretrained_decoder`` leaves it as initialised.
    keys_outside_decoder: ClassVar[tuple[str, ...]] = ("context_log_scale",)

    def __init__(self, config: ETRMConfig, dims: ModelDims) -> None:
        super().__init__(config, dims)
        if config.context_scale == "learned":
            self.context_log_scale = nn.Parameter(torch.tensor(math.log(self.embed_scale)))

    # The prefix is the encoder's ``puzzle_emb_len`` tokens. ``RecursiveInner`` derives it from
    # the puzzle table, which this model has none of (``puzzle_emb_ndim`` 0), so the value it
    # assigns is ignored; positions, RoPE tables and sequence lengths then all see T + S.
    @property
    def puzzle_emb_len(self) -> int:
        return self.config.puzzle_emb_len

    @puzzle_emb_len.setter
    def puzzle_emb_len(self, derived: int) -> None:
        del derived

    def condition(self, batch: Batch) -> torch.Tensor:
        """The prefix [B, T, D]: ``batch["context"]`` scaled as ``context_scale`` says."""
        context = batch[CONTEXT]
        if self.config.context_scale == "none":
            # input_embeddings multiplies the whole sequence by √D.
            return context / self.embed_scale
        if self.config.context_scale == "learned":
            gain = torch.exp(self.context_log_scale) / self.embed_scale
            return context * gain.to(context.dtype)
        return context


def _reload(halted: torch.Tensor, batch: Batch, current: Batch) -> Batch:
    """Every data field of ``current``, taken from ``batch`` in rows where ``halted`` [B]."""
    return {
        k: torch.where(halted.view(-1, *([1] * (batch[k].ndim - 1))), batch[k], v)
        for k, v in current.items()
        if k != CONTEXT
    }


class TRMWithEncoder(ACTModel):
    """ETRM with TRM's dynamic halting (``arch=etrm``): ``forward(carry, batch)`` is one ACT
    step, ``batch`` holding ``inputs``/``labels`` [B, S], ``puzzle_identifiers`` [B] and
    ``demo_inputs``/``demo_labels`` int [B, K, S] with ``demo_mask`` bool [B, K] (``group_ids``
    [B] optional, for the diagnostics).

    Outputs are TRM's, plus in training ``kl_per_sample`` [B] (variational encoders; 0 for rows
    not encoded at this step) and ``diagnostics`` (``models.etrm.diagnostics``).
    """

    config: ETRMConfig
    inner: TRMEncoderInner

    def __init__(self, config: ETRMConfig, dims: ModelDims) -> None:
        # Encoder first, then the decoder, as ETRM builds them.
        encoder = build_encoder(config.encoder_config(dims.vocab_size, dims.seq_len))
        super().__init__(config, TRMEncoderInner(config, dims))
        self.encoder = encoder
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)

    def caches_context(self) -> bool:
        """Whether a row is encoded only when it starts an item, its context reused after."""
        if self.training:
            return self.config.conditioning_refresh == "on_reset_detached"
        return self.config.eval_context == "cached" and self.encoder.deterministic_at_eval

    def encode(self, data: Batch) -> EncoderOutput:
        """The encoder's output for the demos of ``data`` (rows [b])."""
        return self.encoder(*(data[k] for k in DEMO_FIELDS))

    def _context(
        self, halted: torch.Tensor, data: Batch, cached: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's context [B, T, D] and KL [B] (None when not variational)."""
        if not self.caches_context() or cached is None:
            out = self.encode(data)
            return out.context, out.kl_per_sample
        rows = halted.nonzero().squeeze(1)
        if rows.numel() == halted.numel():
            out = self.encode(data)
            return out.context, out.kl_per_sample
        kl = None
        if self.encoder.is_variational:
            kl = torch.zeros(halted.shape, dtype=torch.float32, device=halted.device)
        if rows.numel() == 0:
            return cached, kl
        out = self.encode({k: data[k].index_select(0, rows) for k in DEMO_FIELDS})
        # Out of place: gradient reaches the encoder through the new rows only.
        context = cached.index_put((rows,), out.context.to(cached.dtype))
        if kl is not None and out.kl_per_sample is not None:
            kl = kl.index_put((rows,), out.kl_per_sample.to(torch.float32))
        return context, kl

    def forward(self, carry: ACTCarry, batch: Batch) -> tuple[ACTCarry, dict[str, Any]]:
        halted = carry.halted
        inner_carry = self.inner.reset_carry(halted, carry.inner_carry)
        steps = torch.where(halted, 0, carry.steps)
        current_data = _reload(halted, batch, carry.current_data)
        context, kl = self._context(halted, current_data, carry.current_data.get(CONTEXT))
        inner_batch = {**current_data, CONTEXT: context}

        self.inner.start_record_step()
        inner_output = self.inner(inner_carry, inner_batch)
        outputs = self.step_outputs(inner_carry, inner_output)
        if self.training:
            if kl is not None:
                outputs[KL_OUTPUT] = kl
            groups = current_data.get("group_ids", current_data["puzzle_identifiers"])
            outputs[DIAGNOSTICS_OUTPUT] = context_diagnostics(
                context, groups, current_data["demo_mask"].any(-1)
            )

        with torch.no_grad():
            steps = steps + 1
            new_halted = self.update_halting(steps, inner_output.carry, inner_batch, outputs)
        if self.caches_context():
            current_data[CONTEXT] = context.detach()
        return ACTCarry(inner_output.carry, steps, new_halted, current_data), outputs


class TRMWithEncoderFCT(TRMWithEncoder):
    """ETRM-FCT (``arch=etrm_fct``): in training, no halting; every row ends its item after
    ``num_act_steps`` steps (each followed by an optimizer step), so the next batch starts
    from a fresh carry. Evaluation is ``TRMWithEncoder``'s."""

    config: ETRMFCTConfig

    def update_halting(
        self,
        steps: torch.Tensor,
        inner_carry: InnerCarry,
        current_data: Batch,
        outputs: dict[str, Any],
    ) -> torch.Tensor:
        if self.training:
            return steps >= self.config.num_act_steps
        return super().update_halting(steps, inner_carry, current_data, outputs)


MODELS.add("etrm", TRMWithEncoder)
MODELS.add("etrm_fct", TRMWithEncoderFCT)
