"""Recording the latents of a forward, for step-by-step tracing.

A model whose inner module is a ``RecordingSite`` (every ``RecursiveInner``) hands each latent
update to the recorder that ``record_steps`` installs; without one, ``record`` is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class StepRecord:
    """One latent update, R the recorded rows (all B unless ``record_steps`` got ``rows``).

    * ``name``: the latent updated (``"z_H"``, ``"z_L"``, ``"z_L3"``...);
    * ``h_cycle``: its outer (H) cycle; ``l_step``: its inner (L) step, None for an H update;
    * ``value``: the new latent [R, P + S, D], detached, in the forward dtype (only with
      ``latents=True``, else None);
    * ``preds``: ``argmax(lm_logits(latent))`` int64 [R, S], what the LM head would predict from
      this latent, prefix dropped (only with ``decode=True``, else None).
    """

    name: str
    h_cycle: int
    l_step: int | None
    value: torch.Tensor | None
    preds: torch.Tensor | None


Decoder = Callable[[torch.Tensor], torch.Tensor]  # latent [R, P + S, D] → logits [R, S, V]


@dataclass
class StepRecorder:
    """Collects the latent updates of the forwards run inside ``record_steps``.

    ``act_steps[k]`` lists the updates of the k-th supervision step, in execution order.
    ``rows`` (int64 [R] or None for every row), ``latents`` and ``decode`` say what each
    ``StepRecord`` keeps.
    """

    rows: torch.Tensor | None = None
    latents: bool = False
    decode: bool = True
    act_steps: list[list[StepRecord]] = field(default_factory=list)

    def start_step(self) -> None:
        self.act_steps.append([])

    def add(
        self,
        name: str,
        h_cycle: int,
        l_step: int | None,
        latent: torch.Tensor,
        decoder: Decoder,
    ) -> None:
        """Record ``latent`` [B, P + S, D]; ``decoder`` maps latents to logits [R, S, V]."""
        if not self.act_steps:
            self.start_step()
        with torch.no_grad():
            z = latent.detach()
            if self.rows is not None:
                z = z.index_select(0, self.rows.to(z.device))  # a copy of the rows
            elif self.latents:
                z = z.clone()
            value = z if self.latents else None
            preds = decoder(z).argmax(-1) if self.decode else None
        self.act_steps[-1].append(StepRecord(name, h_cycle, l_step, value, preds))


class RecordingSite(nn.Module):
    """A module that reports its latent updates to the active ``StepRecorder``.

    Subclasses call ``start_record_step()`` once per supervision step and
    ``record(name, h_cycle, l_step, latent)`` after each update, and implement
    ``lm_logits`` (latent [R, P + S, D] → logits [R, S, V]), which decodes them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._recorder: StepRecorder | None = None

    def lm_logits(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def record(self, name: str, h_cycle: int, l_step: int | None, value: torch.Tensor) -> None:
        """Hand the latent ``value`` [B, P + S, D] to the active recorder, if any."""
        if self._recorder is not None:
            self._recorder.add(name, h_cycle, l_step, value, self.lm_logits)

    def start_record_step(self) -> None:
        if self._recorder is not None:
            self._recorder.start_step()

    @contextlib.contextmanager
    def recording_paused(self) -> Iterator[None]:
        """Forwards inside are not recorded (e.g. the extra step of a bootstrapped Q target)."""
        recorder, self._recorder = self._recorder, None
        try:
            yield
        finally:
            self._recorder = recorder


@contextlib.contextmanager
def record_steps(
    model: nn.Module,
    rows: torch.Tensor | None = None,
    latents: bool = False,
    decode: bool = True,
) -> Iterator[StepRecorder]:
    """Record every latent update of every forward of ``model`` (any module holding a
    ``RecursiveInner``), for the batch rows ``rows`` (a 1-D integer index tensor [R]; None
    records all B).

    ``latents=True`` keeps each latent [R, P + S, D]; ``decode=True`` (the default) keeps the LM
    head's prediction from it, int64 [R, S] over the grid tokens, decoded by the inner model's
    own ``lm_logits``. So by default no [B, P + S, D] latent outlives its step. Recording runs
    under ``torch.no_grad()`` and consumes no random numbers: the model computes exactly what it
    would without the recorder, outputs and gradients alike.
    """
    if rows is not None and (
        rows.ndim != 1 or rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex()
    ):
        raise ValueError(
            f"rows must be a 1-D integer index tensor, got {rows.dtype} of shape "
            f"{tuple(rows.shape)}"
        )
    inners = [m for m in model.modules() if isinstance(m, RecordingSite)]
    if not inners:
        raise ValueError(f"{type(model).__name__} has no recursive inner model to record")
    recorder = StepRecorder(
        rows=None if rows is None else rows.to(torch.long), latents=latents, decode=decode
    )
    for inner in inners:
        inner._recorder = recorder
    try:
        yield recorder
    finally:
        for inner in inners:
            inner._recorder = None
