"""TRM-JD: TinyRecursiveReasoningModelJD_V1, the Jacobian-descent fork's TRM.

The fork is mattbuot/TinyRecursiveModelsJD, ``models/recursive_reasoning/trmjd.py``.

The recursion is TRM's (``trm.py``): T = ``H_cycles`` outer cycles of n = ``L_cycles`` updates
``z ← f(z + y + x)`` followed by ``y ← f(y + z)``. What differs:

* every H-cycle runs with gradient, but (y, z) are detached after each of the first T−1 cycles:
  truncated back-propagation through one cycle at a time, so each cycle's logits can be a
  separate objective (the fork's "internal" losses) while the graph stays T cycles deep;
* the inner model returns the logits of every cycle, ``[0, lm(y₁), ..., lm(y_T)]``, the zeros
  standing for "no prediction yet" so that the first cycle's differential loss is plain;
* the carry also holds ``output_logits`` [B, S, V], the previous supervision step's (detached)
  final logits, restarting from the fixed buffer ``output_logits_init`` [V] when a slot halts;
  a differential loss head subtracts it;
* with ``no_act`` (the default) there is no Q head: every sample runs exactly
  ``halt_max_steps`` supervision steps, in training and evaluation alike;
* ``perturb_carry`` adds Gaussian noise to the latents between stacked supervision steps.
"""

from __future__ import annotations

from typing import Any

import torch

from models.common import trunc_normal_init_
from models.recursive_reasoning.act import ACTCarry, ACTModel, perturb_carry
from models.recursive_reasoning.common import Batch, InnerCarry, InnerOutput, ModelDims
from models.recursive_reasoning.configs import TRMJDConfig
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1_Inner
from models.registry import MODELS


class TinyRecursiveReasoningModelJD_V1_Inner(TinyRecursiveReasoningModel_ACTV1_Inner):
    """TRM's inner model with per-cycle logits and the previous logits in the carry.

    Carry: ``z_H``, ``z_L`` [B, P + S, D] and ``output_logits`` [B, S, V], all in the forward
    dtype. State-dict keys: TRM's, plus the buffer ``output_logits_init`` [V], minus
    ``q_head.*`` with ``no_act``.
    """

    config: TRMJDConfig

    def __init__(self, config: TRMJDConfig, dims: ModelDims) -> None:
        super().__init__(config, dims)
        init = torch.empty(dims.vocab_size, dtype=self.forward_dtype)
        self.register_buffer("output_logits_init", trunc_normal_init_(init, std=1), persistent=True)

    def uses_q_head(self) -> bool:
        return not self.config.no_act

    def empty_carry(self, batch_size: int, device: torch.device | None = None) -> InnerCarry:
        carry = super().empty_carry(batch_size, device)
        carry["output_logits"] = torch.empty(
            batch_size, self.dims.seq_len, self.dims.vocab_size,
            dtype=self.forward_dtype, device=device,
        )  # fmt: skip
        return carry

    def reset_carry(self, reset_flag: torch.Tensor, carry: InnerCarry) -> InnerCarry:
        new = super().reset_carry(reset_flag, carry)
        new["output_logits"] = torch.where(
            reset_flag.view(-1, 1, 1), self.output_logits_init, carry["output_logits"]
        )
        return new

    def forward(self, carry: InnerCarry, batch: Batch) -> InnerOutput:
        """carry → detached carry, logits, cycle logits, q_halt and q_continue [B].

        Cycle logits: a list of ``H_cycles + 1`` tensors [B, S, V]; entry 0 is zeros and entry
        i the logits of y after cycle i; the last one is the step's prediction, ``logits``
        itself. Entry i back-propagates into cycle i only (and into the input embedding).
        """
        cos_sin = self.cos_sin()
        x = self.input_embeddings(batch)
        z_H, z_L = carry["z_H"], carry["z_L"]
        cycle_logits = [torch.zeros_like(carry["output_logits"])]
        for h in range(self.config.H_cycles):
            if h > 0:
                # Truncated BPTT: cycle h's loss must not reach cycles < h.
                z_H, z_L = z_H.detach(), z_L.detach()
            z_H, z_L = self._cycle(z_H, z_L, x, cos_sin, h)
            cycle_logits.append(self.lm_logits(z_H))
        q_halt, q_continue = self.q_logits(z_H)
        new_carry = {
            "z_H": z_H.detach(),
            "z_L": z_L.detach(),
            "output_logits": cycle_logits[-1].detach(),
        }
        return InnerOutput(new_carry, cycle_logits[-1], q_halt, q_continue, cycle_logits)


class TinyRecursiveReasoningModelJD_V1(ACTModel):
    """TRM-JD with (``no_act=False``) or without (``no_act=True``) adaptive halting.

    ``forward(carry, batch) -> (carry, outputs)`` is one supervision step. ``outputs``:
    ``logits`` [B, S, V] (final), ``cycle_logits`` (list of ``H_cycles + 1`` [B, S, V], see the
    inner model), ``previous_logits`` [B, S, V] (the carry's ``output_logits`` this step started
    from, detached), ``q_halt_logits`` and ``q_continue_logits`` [B] (zeros with ``no_act``),
    and ``target_q_continue`` [B] when ACT bootstraps it.
    """

    config: TRMJDConfig
    inner: TinyRecursiveReasoningModelJD_V1_Inner

    def __init__(self, config: TRMJDConfig, dims: ModelDims) -> None:
        super().__init__(config, TinyRecursiveReasoningModelJD_V1_Inner(config, dims))

    def update_halting(
        self,
        steps: torch.Tensor,
        inner_carry: InnerCarry,
        current_data: Batch,
        outputs: dict[str, Any],
    ) -> torch.Tensor:
        if self.config.no_act:
            return steps >= self.config.halt_max_steps
        return super().update_halting(steps, inner_carry, current_data, outputs)

    def step_outputs(self, inner_carry: InnerCarry, inner_output: InnerOutput) -> dict[str, Any]:
        outputs = super().step_outputs(inner_carry, inner_output)
        outputs["previous_logits"] = inner_carry["output_logits"].detach()
        return outputs

    @staticmethod
    def perturb_carry(
        carry: ACTCarry, rate: float, generator: torch.Generator | None = None
    ) -> ACTCarry:
        """See ``models.recursive_reasoning.common.perturb_carry``."""
        return perturb_carry(carry, rate, generator)


MODELS.add("trmjd", TinyRecursiveReasoningModelJD_V1)
