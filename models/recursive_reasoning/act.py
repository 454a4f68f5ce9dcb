"""Adaptive computation time around an inner model, and the carry that persists across batches.

Upstream ``models/recursive_reasoning/trm.py`` (``TinyRecursiveReasoningModel_ACTV1``,
``..._ACTV1Carry``): one call of ``ACTModel`` is one supervision step; halted slots restart
from the init states with the new batch's data, running slots keep theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from models.recursive_reasoning.common import (
    Batch,
    InnerCarry,
    InnerOutput,
    RecursiveInner,
)
from models.recursive_reasoning.configs import ACTArchConfig


@dataclass
class ACTCarry:
    """The state that persists across batches: latents, steps taken, halted flags, and the data
    each slot is working on (inputs, labels, puzzle_identifiers)."""

    inner_carry: InnerCarry
    steps: torch.Tensor  # int32 [B]
    halted: torch.Tensor  # bool [B]
    current_data: Batch

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, loadable with ``torch.load(weights_only=True)``."""
        return {
            "inner_carry": dict(self.inner_carry),
            "steps": self.steps,
            "halted": self.halted,
            "current_data": dict(self.current_data),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ACTCarry:
        return cls(
            inner_carry=dict(state["inner_carry"]),
            steps=state["steps"],
            halted=state["halted"],
            current_data=dict(state["current_data"]),
        )


class ACTModel(nn.Module):
    """Adaptive computation time around an inner model (one call = one supervision step).

    1. Halted slots restart: latents from the init buffers, steps 0, data from the new batch;
       running slots keep their data (the new batch's samples at those slots are not used).
    2. One inner step; ``steps += 1``; a slot halts at ``halt_max_steps``.
    3. Training only (and ``halt_max_steps > 1``): also halt when ``q_halt > 0``
       (``no_ACT_continue``) or ``q_halt > q_continue``; exploration forces, with probability
       ``halt_exploration_prob``, a minimum step count uniform in [2, halt_max_steps]. Without
       ``no_ACT_continue`` the Q-continue target is bootstrapped from one more inner step.
    4. Evaluation runs every step, unless ``halt_at_eval`` lets slots stop on the Q head.

    Subclasses set ``inner_cls`` and may override ``computes_target_q``.
    """

    inner: RecursiveInner

    def __init__(self, config: ACTArchConfig, inner: RecursiveInner) -> None:
        super().__init__()
        self.config = config
        self.inner = inner

    @property
    def puzzle_emb(self) -> nn.Module:
        return self.inner.puzzle_emb

    @property
    def no_ACT_continue(self) -> bool:
        return self.config.no_ACT_continue

    def computes_target_q(self) -> bool:
        return not self.no_ACT_continue

    def initial_carry(self, batch: Batch) -> ACTCarry:
        """All slots halted, so the first call loads the batch into every slot."""
        B = batch["inputs"].shape[0]
        device = batch["inputs"].device
        return ACTCarry(
            inner_carry=self.inner.empty_carry(B, device),
            steps=torch.zeros(B, dtype=torch.int32, device=device),
            halted=torch.ones(B, dtype=torch.bool, device=device),
            current_data={k: torch.empty_like(v) for k, v in batch.items()},
        )

    def halt_signal(self, q_halt: torch.Tensor, q_continue: torch.Tensor) -> torch.Tensor:
        """Whether the Q head says halt [B]: ``q_halt > 0``, or ``q_halt > q_continue`` when the
        model has a continue logit (what halting decides, before the step cap and exploration;
        tracing records it beside the steps it runs anyway)."""
        return q_halt > 0 if self.no_ACT_continue else q_halt > q_continue

    def _explore(
        self, steps: torch.Tensor, halted: torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """Exploration: with probability ``halt_exploration_prob`` a slot must reach a minimum
        step count drawn uniformly from [2, halt_max_steps] (redrawn at every step)."""
        explore = torch.rand_like(like) < self.config.halt_exploration_prob
        min_steps = explore * torch.randint_like(steps, low=2, high=self.config.halt_max_steps + 1)
        return halted & (steps >= min_steps)

    def _target_q(
        self, is_last_step: torch.Tensor, inner_carry: InnerCarry, current_data: Batch
    ) -> torch.Tensor:
        """Bootstrapped Q-continue target from one more inner step (no replay buffer or target
        network: the many parallel slots play the role of environments)."""
        with self.inner.recording_paused():
            following: InnerOutput = self.inner(inner_carry, current_data)
        q_halt, q_continue = following.q_halt, following.q_continue
        return torch.sigmoid(torch.where(is_last_step, q_halt, torch.maximum(q_halt, q_continue)))

    def update_halting(
        self,
        steps: torch.Tensor,
        inner_carry: InnerCarry,
        current_data: Batch,
        outputs: dict[str, Any],
    ) -> torch.Tensor:
        """The halted flags after a step (under no_grad); may add ``target_q_continue``."""
        q_halt, q_continue = outputs["q_halt_logits"], outputs["q_continue_logits"]
        is_last_step = steps >= self.config.halt_max_steps
        halted = is_last_step
        if self.training and self.config.halt_max_steps > 1:
            halted = self._explore(steps, halted | self.halt_signal(q_halt, q_continue), q_halt)
            if self.computes_target_q():
                outputs["target_q_continue"] = self._target_q(
                    is_last_step, inner_carry, current_data
                )
        elif not self.training and self.config.halt_at_eval:
            halted = halted | self.halt_signal(q_halt, q_continue)
        return halted

    def step_outputs(self, inner_carry: InnerCarry, inner_output: InnerOutput) -> dict[str, Any]:
        """The outputs dict the loss head reads, from the inner model's ``InnerOutput``:
        ``logits`` [B, S, V], ``q_halt_logits`` and ``q_continue_logits`` [B], and
        ``cycle_logits`` (T + 1 × [B, S, V]) when the inner model reports them.
        ``inner_carry`` is the (reset) carry the step started from. Subclasses may add
        entries."""
        outputs: dict[str, Any] = {
            "logits": inner_output.logits,
            "q_halt_logits": inner_output.q_halt,
            "q_continue_logits": inner_output.q_continue,
        }
        if inner_output.cycle_logits is not None:
            outputs["cycle_logits"] = inner_output.cycle_logits
        return outputs

    def forward(self, carry: ACTCarry, batch: Batch) -> tuple[ACTCarry, dict[str, Any]]:
        halted = carry.halted
        inner_carry = self.inner.reset_carry(halted, carry.inner_carry)
        steps = torch.where(halted, 0, carry.steps)
        current_data = {
            k: torch.where(halted.view(-1, *([1] * (batch[k].ndim - 1))), batch[k], v)
            for k, v in carry.current_data.items()
        }

        self.inner.start_record_step()
        inner_output: InnerOutput = self.inner(inner_carry, current_data)
        outputs = self.step_outputs(inner_carry, inner_output)

        with torch.no_grad():
            steps = steps + 1
            new_halted = self.update_halting(steps, inner_output.carry, current_data, outputs)
        return ACTCarry(inner_output.carry, steps, new_halted, current_data), outputs


def perturb_carry(
    carry: ACTCarry, rate: float, generator: torch.Generator | None = None
) -> ACTCarry:
    """A copy of ``carry`` with ``z += rate·ε``, ε ~ N(0, 1) i.i.d., on every latent.

    The JD fork's perturbation between stacked supervision steps (on ``z_H`` and ``z_L`` there;
    here on every latent of the architecture). Carried logits (``output_logits``), steps,
    halted flags and data are shared with ``carry``, which is not modified. The noise is drawn
    in float32 from ``generator`` (on the generator's device, then moved), added in float32 and
    cast back to the latent's dtype.
    """
    inner = dict(carry.inner_carry)
    for name, z in carry.inner_carry.items():
        if name == "output_logits":
            continue
        noise_device = generator.device if generator is not None else z.device
        noise = torch.randn(
            z.shape, generator=generator, dtype=torch.float32, device=noise_device
        ).to(z.device)
        inner[name] = (z.to(torch.float32) + rate * noise).to(z.dtype)
    return replace(carry, inner_carry=inner)
