"""Running a batch through every ACT step with the recorder: the clean rollout and its
perturbed variants, each from the same carry.

Whatever the halting head says, every row runs all ``halt_max_steps`` steps (a slot the model
would halt is kept running); what halting would have decided is recorded beside each step.
Everything is computed under ``torch.inference_mode`` in evaluation mode and the recorder adds
no computation to the model's own, so the clean run's predictions are exactly
``evaluate.py``'s at its last step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from models.recursive_reasoning.act import ACTCarry
from models.recursive_reasoning.recording import (
    RecordingSite,
    StepRecord,
    record_steps,
    recording_sites,
)
from tracing.config import Perturbation
from tracing.perturb import perturbed_forward

Batch = dict[str, torch.Tensor]
RETURN_KEYS = ("q_continue_logits", "q_halt_logits")


@dataclass(frozen=True)
class HCycleCapture:
    """One H-cycle of an ACT step for the R recorded rows: ``preds`` int32 [R, S] (the LM
    head's prediction after the H update) and ``probes`` (one int32 [R, S] per L-step; empty
    without probes)."""

    preds: np.ndarray
    probes: list[np.ndarray]


@dataclass(frozen=True)
class StepCapture:
    """One ACT step for the R recorded rows (arrays [R], host memory).

    ``preds`` int32 [R, S] is the step's prediction (the loss head's ``preds``); ``full_preds``
    [B, S] and ``full_q_halt`` [B] are the same for every row of the batch (the evaluators'
    input). Distances compare the latents after this step with those after the previous one
    over the grid positions (prefix dropped), NaN at the first step or for a missing latent.
    """

    preds: np.ndarray
    q_halt: np.ndarray
    q_continue: np.ndarray
    would_halt: np.ndarray
    token_acc: np.ndarray
    has_labels: np.ndarray
    h_cos_dist: np.ndarray
    l_cos_dist: np.ndarray
    dz_rel_h: np.ndarray
    dz_rel_l: np.ndarray
    h_cycles: list[HCycleCapture]
    full_preds: torch.Tensor
    full_q_halt: torch.Tensor


def inner_site(head: nn.Module) -> RecordingSite:
    """The recursive inner model of a loss head (``head.model.inner``)."""
    return recording_sites(head, "trace")[0]


def _latent_groups(site: RecordingSite) -> tuple[list[str], list[str]]:
    """The carry latents measured as ``h`` (``z_H``) and as ``l`` (every ``z_L*``)."""
    names = list(getattr(site, "carry_inits", {}))
    return [n for n in names if n == "z_H"], [n for n in names if n.startswith("z_L")]


def _flat(
    carry: dict[str, torch.Tensor], names: list[str], rows: torch.Tensor, P: int
) -> torch.Tensor | None:
    if not names:
        return None
    parts = [carry[n].index_select(0, rows)[:, P:].to(torch.float32) for n in names]
    return torch.cat(parts, dim=1).flatten(1)


def _distances(
    now: torch.Tensor | None, before: torch.Tensor | None, R: int
) -> tuple[np.ndarray, np.ndarray]:
    """1 − cos and ‖now − before‖ / ‖before‖ per row [R]; NaN without both."""
    if now is None or before is None:
        nan = np.full(R, np.nan)
        return nan, nan.copy()
    cos = torch.nn.functional.cosine_similarity(now, before, dim=1, eps=1e-12)
    rel = (now - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)
    return (1 - cos).double().cpu().numpy(), rel.double().cpu().numpy()


def _host(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.int32).cpu().numpy()


def _h_cycles(records: list[StepRecord]) -> list[HCycleCapture]:
    """The step's records grouped by H-cycle: each H update's decode with the probes of the
    L-steps before it."""
    cycles: list[HCycleCapture] = []
    probes: list[np.ndarray] = []
    for r in records:
        if r.l_step is not None:
            if r.probe is not None:
                probes.append(_host(r.probe))
        elif r.preds is not None:
            cycles.append(HCycleCapture(_host(r.preds), probes))
            probes = []
    return cycles


def _step(
    head: nn.Module,
    carry: ACTCarry,
    batch: Batch,
    rows: torch.Tensor,
    probes: bool,
    before: tuple[torch.Tensor | None, torch.Tensor | None],
    perturb: Callable[[], contextlib.AbstractContextManager[None]] | None,
) -> tuple[StepCapture, ACTCarry, tuple[torch.Tensor | None, torch.Tensor | None]]:
    site = inner_site(head)
    act_model = head.model
    perturbing = perturb() if perturb is not None else contextlib.nullcontext()
    with record_steps(head, rows=rows, probes=probes) as recorder, perturbing:
        out = head(carry=carry, batch=batch, return_keys=list(RETURN_KEYS))
    new_carry = out.new_carry
    q_halt_B = out.outputs["q_halt_logits"].to(torch.float32)
    q_cont_B = out.outputs["q_continue_logits"].to(torch.float32)
    would_halt_B = act_model.halt_signal(q_halt_B, q_cont_B)
    h_names, l_names = _latent_groups(site)
    P = site.puzzle_emb_len
    h_now = _flat(new_carry.inner_carry, h_names, rows, P)
    l_now = _flat(new_carry.inner_carry, l_names, rows, P)
    R = int(rows.numel())
    h_cos, dz_h = _distances(h_now, before[0], R)
    l_cos, dz_l = _distances(l_now, before[1], R)
    preds_BS = out.outputs["preds"]
    metrics = out.row_metrics
    capture = StepCapture(
        preds=_host(preds_BS.index_select(0, rows)),
        q_halt=q_halt_B.index_select(0, rows).double().cpu().numpy(),
        q_continue=q_cont_B.index_select(0, rows).double().cpu().numpy(),
        would_halt=would_halt_B.index_select(0, rows).cpu().numpy(),
        token_acc=metrics["accuracy"].index_select(0, rows).double().cpu().numpy(),
        has_labels=metrics["has_labels"].index_select(0, rows).cpu().numpy(),
        h_cos_dist=h_cos,
        l_cos_dist=l_cos,
        dz_rel_h=dz_h,
        dz_rel_l=dz_l,
        h_cycles=_h_cycles(recorder.act_steps[-1] if recorder.act_steps else []),
        full_preds=preds_BS,
        full_q_halt=out.outputs["q_halt_logits"],
    )
    return capture, new_carry, (h_now, l_now)


def _keep_running(carry: ACTCarry) -> ACTCarry:
    """The carry with no slot halted, so the next step continues every row."""
    return replace(carry, halted=torch.zeros_like(carry.halted))


def trace_batch(
    head: nn.Module,
    batch: Batch,
    rows: torch.Tensor,
    record_keys: Sequence[str | None],
    halt_max_steps: int,
    probes: bool = False,
    perturbations: Sequence[Perturbation] = (),
) -> dict[str, list[StepCapture]]:
    """Every ACT step of ``batch`` for the rows ``rows`` (int64 [R]), clean and perturbed.

    ``record_keys`` [B] names each row of the batch (its perturbation noise is seeded from it;
    None: not perturbed). Returns {variant: ``halt_max_steps`` ``StepCapture``}, variant
    ``"clean"`` and each perturbation's tag. A perturbed run starts from the clean run's carry
    before its step, so its earlier steps are the clean ones (shared, not recomputed).
    """
    head.eval()
    for p in perturbations:
        if p.step > halt_max_steps:
            raise ValueError(f"trace.perturb step={p.step}: beyond halt_max_steps={halt_max_steps}")
    starts = {p.step for p in perturbations}
    saved: dict[int, tuple[ACTCarry, tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
    with torch.inference_mode():
        carry = head.initial_carry(batch)
        before: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        clean: list[StepCapture] = []
        for t in range(1, halt_max_steps + 1):
            if t in starts:
                saved[t] = (carry, before)
            capture, carry, before = _step(head, carry, batch, rows, probes, before, None)
            clean.append(capture)
            carry = _keep_running(carry)
        traces = {"clean": clean}
        for p in perturbations:
            carry, before = saved[p.step]
            steps = list(clean[: p.step - 1])
            for t in range(p.step, halt_max_steps + 1):
                perturb = None
                if t == p.step:

                    def perturb(p: Perturbation = p) -> contextlib.AbstractContextManager[None]:
                        return perturbed_forward(head, p, record_keys)

                capture, carry, before = _step(head, carry, batch, rows, probes, before, perturb)
                steps.append(capture)
                carry = _keep_running(carry)
            traces[p.tag] = steps
    return traces
