"""The rollout: a batch run from a fresh carry through its ACT steps, one step at a time.

Evaluation, step-by-step tracing and test-time search consume the same generator instead of
writing the run-until-halted loop again. The model is the loss head (``ACTLossHead``): each
step yields its ``LossOutput`` (losses, per-row metrics, predictions and the requested
outputs), the carry after it and which slots halted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.losses import LossOutput
from models.recursive_reasoning.act import ACTCarry


@dataclass(frozen=True)
class RolloutStep:
    """One ACT step of a rollout (B = rows of the batch).

    ``index`` counts from 0; ``newly_halted`` [B] marks the slots that halted at this step for
    the first time, ``done`` [B] those halted at or before it. Once a slot is done, later
    steps' values for it belong to a restarted slot and are to be ignored.
    """

    index: int
    out: LossOutput
    carry: ACTCarry
    newly_halted: torch.Tensor
    done: torch.Tensor


def rollout(
    model: nn.Module, batch: dict[str, torch.Tensor], return_keys: Sequence[str] = ()
) -> Iterator[RolloutStep]:
    """Run ``model`` on ``batch`` from its initial carry until every slot has halted.

    Without ``halt_at_eval`` every slot halts at ``halt_max_steps`` in evaluation mode, so the
    rollout has exactly that many steps; with it, slots stop on their Q head.
    """
    carry = model.initial_carry(batch)
    done = torch.zeros(batch["inputs"].shape[0], dtype=torch.bool, device=batch["inputs"].device)
    index = 0
    while True:
        out: LossOutput = model(carry=carry, batch=batch, return_keys=sorted(return_keys))
        carry = out.new_carry
        newly = carry.halted & ~done
        done = done | newly
        yield RolloutStep(index, out, carry, newly, done)
        if bool(done.all()):
            return
        index += 1


def keep_at_first_halt(
    kept: dict[str, torch.Tensor], values: Mapping[str, torch.Tensor], newly_halted: torch.Tensor
) -> None:
    """Evaluation's rule, one step of it: ``kept[k]`` takes ``values[k]`` [B, ...] for the rows
    that halted at this step for the first time (``RolloutStep.newly_halted`` [B]); a key seen
    for the first time is copied whole. After the last step every row holds its value at the
    step it first halted."""
    for k, v in values.items():
        if k not in kept:
            kept[k] = v.clone()
            continue
        mask = newly_halted.view(-1, *([1] * (v.ndim - 1)))
        kept[k] = torch.where(mask, v, kept[k])
