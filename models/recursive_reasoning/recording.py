"""Recording the latents of a forward, for step-by-step tracing.

A model whose inner module is a ``RecordingSite`` (every ``RecursiveInner``) hands each latent
update to the recorder that ``record_steps`` installs; without one, ``record`` is a no-op.
With ``probes=True`` the recorder also decodes, after every inner (L) update, the answer the
next H update would give from the current latents (``RecordingSite.probe_h_update``), which is
not fed back. ``perturbing_injection`` lets a caller alter the input injection of the next
forwards (a reproducible perturbation).
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
      this latent, prefix dropped (only with ``decode=True``, else None);
    * ``probe``: for an inner update (``l_step`` set) with ``probes=True``, int64 [R, S], the
      LM head's prediction from the H update the latents would give now,
      ``argmax(lm_logits(probe_h_update(latents)))``; None otherwise.
    """

    name: str
    h_cycle: int
    l_step: int | None
    value: torch.Tensor | None
    preds: torch.Tensor | None
    probe: torch.Tensor | None = None


Decoder = Callable[[torch.Tensor], torch.Tensor]  # latent [R, P + S, D] → logits [R, S, V]
# Latest latents {name: [R, P + S, D]} → the H update they would give [R, P + S, D], or None.
Prober = Callable[[dict[str, torch.Tensor]], "torch.Tensor | None"]


@dataclass
class StepRecorder:
    """Collects the latent updates of the forwards run inside ``record_steps``.

    ``act_steps[k]`` lists the updates of the k-th supervision step, in execution order.
    ``rows`` (int64 [R] or None for every row), ``latents``, ``decode`` and ``probes`` say what
    each ``StepRecord`` keeps. ``current`` holds the latest value of every latent of the step
    being recorded (the recorded rows, detached), which the probes read.
    """

    rows: torch.Tensor | None = None
    latents: bool = False
    decode: bool = True
    probes: bool = False
    act_steps: list[list[StepRecord]] = field(default_factory=list)
    current: dict[str, torch.Tensor] = field(default_factory=dict)

    def start_step(self) -> None:
        self.act_steps.append([])

    def _rows_of(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.detach()
        if self.rows is not None:
            z = z.index_select(0, self.rows.to(z.device))  # a copy of the rows
        return z

    def start_forward(self, carry: dict[str, torch.Tensor]) -> None:
        """The latents [B, P + S, D] a forward starts from (only the probes need them)."""
        if self.probes:
            with torch.no_grad():
                self.current = {name: self._rows_of(z) for name, z in carry.items()}

    def add(
        self,
        name: str,
        h_cycle: int,
        l_step: int | None,
        latent: torch.Tensor,
        decoder: Decoder,
        prober: Prober | None = None,
    ) -> None:
        """Record ``latent`` [B, P + S, D]; ``decoder`` maps latents to logits [R, S, V] and
        ``prober`` (used with ``probes``) the latest latents to the H update they would give."""
        if not self.act_steps:
            self.start_step()
        with torch.no_grad():
            z = self._rows_of(latent)
            if self.rows is None and self.latents:
                z = z.clone()
            value = z if self.latents else None
            preds = decoder(z).argmax(-1) if self.decode else None
            probe = None
            if self.probes:
                self.current[name] = z
                if l_step is not None and prober is not None:
                    probed = prober(self.current)
                    probe = None if probed is None else decoder(probed).argmax(-1)
        self.act_steps[-1].append(StepRecord(name, h_cycle, l_step, value, preds, probe))


class RecordingSite(nn.Module):
    """A module that reports its latent updates to the active ``StepRecorder``.

    Subclasses call ``start_record_step()`` once per supervision step and
    ``record(name, h_cycle, l_step, latent)`` after each update, and implement
    ``lm_logits`` (latent [R, P + S, D] → logits [R, S, V]), which decodes them, and
    ``probe_h_update`` (the latest latents → the H update they would give, for the probes).
    Their forward takes the carry of latents as its first argument. ``injection_hook``, when
    set (``perturbing_injection``), maps the input injection [B, P + S, D] to the one used.
    """

    def __init__(self) -> None:
        super().__init__()
        self._recorder: StepRecorder | None = None
        self.injection_hook: Callable[[torch.Tensor], torch.Tensor] | None = None

    def lm_logits(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probe_h_update(self, latents: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The H update [R, P + S, D] the latents {name: [R, P + S, D]} would give now; None
        for a model without one."""
        return None

    def record(self, name: str, h_cycle: int, l_step: int | None, value: torch.Tensor) -> None:
        """Hand the latent ``value`` [B, P + S, D] to the active recorder, if any."""
        if self._recorder is not None:
            self._recorder.add(name, h_cycle, l_step, value, self.lm_logits, self.probe_h_update)

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
    probes: bool = False,
) -> Iterator[StepRecorder]:
    """Record every latent update of every forward of ``model`` (any module holding a
    ``RecursiveInner``), for the batch rows ``rows`` (a 1-D integer index tensor [R]; None
    records all B).

    ``latents=True`` keeps each latent [R, P + S, D]; ``decode=True`` (the default) keeps the LM
    head's prediction from it, int64 [R, S] over the grid tokens, decoded by the inner model's
    own ``lm_logits``. So by default no [B, P + S, D] latent outlives its step. ``probes=True``
    adds to every inner update the decode of the H update the latents would give then
    (``StepRecord.probe``; one extra H-level call per inner update, never fed back). Recording
    runs under ``torch.no_grad()`` and consumes no random numbers: the model computes exactly
    what it would without the recorder, outputs and gradients alike (in evaluation mode; a
    probe's dropout would draw random numbers in training mode).
    """
    if rows is not None and (
        rows.ndim != 1 or rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex()
    ):
        raise ValueError(
            f"rows must be a 1-D integer index tensor, got {rows.dtype} of shape "
            f"{tuple(rows.shape)}"
        )
    inners = recording_sites(model, "record")
    recorder = StepRecorder(
        rows=None if rows is None else rows.to(torch.long),
        latents=latents,
        decode=decode,
        probes=probes,
    )
    handles = []
    for inner in inners:
        inner._recorder = recorder
        if probes:
            handles.append(inner.register_forward_pre_hook(_start_forward))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
        for inner in inners:
            inner._recorder = None


def recording_sites(model: nn.Module, purpose: str) -> list[RecordingSite]:
    """The recursive inner models of ``model``, in module order; a one-line ``ValueError``
    (``... has no recursive inner model to <purpose>``) when it has none."""
    sites = [m for m in model.modules() if isinstance(m, RecordingSite)]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no recursive inner model to {purpose}")
    return sites


def _start_forward(site: nn.Module, args: tuple[object, ...]) -> None:
    recorder = site._recorder if isinstance(site, RecordingSite) else None
    carry = args[0] if args else None
    if recorder is not None and isinstance(carry, dict):
        recorder.start_forward(carry)


@contextlib.contextmanager
def perturbing_injection(
    model: nn.Module, hook: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Inside, every recursive inner model of ``model`` uses ``hook(x)`` as its input
    injection, x [B, P + S, D] (the scaled input embedding, prefix included)."""
    inners = recording_sites(model, "perturb")
    for inner in inners:
        inner.injection_hook = hook
    try:
        yield
    finally:
        for inner in inners:
            inner.injection_hook = None
