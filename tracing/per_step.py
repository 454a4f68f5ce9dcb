"""Per-step results: exact and pass@K as a function of the ACT step the answer is taken at,
the same at each record's first halt, and what perturbations changed.

pass@K at step t is the ARC evaluator's (``evaluators.arc.ARC``: majority vote over the
augmentations of each test input, sigmoid(q_halt) as tie-break, mean task score) fed every
traced row's step-t prediction and step-t q_halt, one evaluator per step. At step
``halt_max_steps`` this is what ``evaluate.py`` computes, by construction.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from evaluators.arc import ARC, BLANK_IDENTIFIER_ID
from tracing.config import Perturbation
from tracing.record import StepCapture
from tracing.records import CLEAN

Batch = dict[str, torch.Tensor]
KS = (1, 2)


class StepVoting:
    """One ARC evaluator per ACT step and one for "stop at the first halt".

    ``base`` is an ``ARC`` built on the evaluated data (its files are read once; each step
    gets a copy with its own votes, so its config must not pool evaluations).
    """

    def __init__(self, base: ARC, halt_max_steps: int) -> None:
        if base.config.aggregated_voting:
            raise ValueError("StepVoting needs an ARC evaluator with aggregated_voting=False")
        self.by_step = [copy.copy(base) for _ in range(halt_max_steps)]
        self.first_halt = copy.copy(base)
        for ev in [*self.by_step, self.first_halt]:
            ev.begin_eval()  # fresh votes for each copy

    def update(self, batch: Batch, rows: torch.Tensor, steps: Sequence[StepCapture]) -> None:
        """Vote with the recorded rows ``rows`` [R] of ``batch`` (the others are blanked) at
        every step, and at each row's first halt (its last step when it never halts)."""
        with torch.inference_mode():
            self._update(batch, rows, steps)

    def _update(self, batch: Batch, rows: torch.Tensor, steps: Sequence[StepCapture]) -> None:
        ids = batch["puzzle_identifiers"]
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[rows] = True
        masked = {
            "inputs": batch["inputs"],
            "puzzle_identifiers": torch.where(keep, ids, torch.full_like(ids, BLANK_IDENTIFIER_ID)),
        }
        for ev, cap in zip(self.by_step, steps, strict=True):
            ev.update_batch(masked, {"preds": cap.full_preds, "q_halt_logits": cap.full_q_halt})
        preds = steps[-1].full_preds.clone()
        q_halt = steps[-1].full_q_halt.clone()
        done = torch.zeros(rows.numel(), dtype=torch.bool)
        for cap in steps:
            newly = torch.from_numpy(cap.would_halt).to(torch.bool) & ~done
            done |= newly
            picked = rows[newly.to(rows.device)]
            preds[picked] = cap.full_preds[picked]
            q_halt[picked] = cap.full_q_halt[picked]
        self.first_halt.update_batch(masked, {"preds": preds, "q_halt_logits": q_halt})

    def result(self, group: Any = None) -> dict[str, Any] | None:
        """pass@K by step and at first halt on rank 0 (None elsewhere). Collective."""
        by_step = [ev.result(None, group=group) for ev in self.by_step]
        first = self.first_halt.result(None, group=group)
        if first is None:
            return None
        out: dict[str, Any] = {
            f"pass@{k}_by_step": [float(m[f"ARC/pass@{k}"]) for m in by_step if m] for k in KS
        }
        out["first_halt"] = {f"pass@{k}": float(first[f"ARC/pass@{k}"]) for k in KS}
        return out


def _fraction(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def _key(record: dict[str, Any]) -> tuple[str, int, str]:
    return record["puzzle_id"], record["test_index"], record["aug"]


def per_step_results(
    records: Sequence[dict[str, Any]],
    halt_max_steps: int,
    voting: dict[str, Any],
    perturbations: Sequence[Perturbation],
) -> dict[str, Any]:
    """The ``per_step`` object of ``index.json`` / ``per_step.json`` (``trm-trace/v1``).

    ``exact_by_step[t]``: fraction of the clean records with a known target whose step-t
    answer is exact; ``first_halt.exact`` the same with each record's answer at its first
    halt (the last step if it never halts). Per perturbation, over the records it shares with
    the clean run: ``changed`` the fraction whose last-step answer differs from the clean
    one, ``recovered`` the fraction of those wrong in the clean run that it gets exact, and
    ``lost`` the fraction of those exact in the clean run that it gets wrong (0 when there
    are none).
    """
    clean = [r for r in records if r["variant"] == CLEAN and r["final_exact"] is not None]
    exact_by_step = [
        _fraction(sum(bool(r["steps"][t]["exact"]) for r in clean), len(clean))
        for t in range(halt_max_steps)
    ]
    at_halt = 0
    for r in clean:
        t = r["first_halt_step"] or halt_max_steps
        at_halt += bool(r["steps"][t - 1]["exact"])
    by_key = {_key(r): r for r in clean}
    effects: dict[str, dict[str, float]] = {}
    for p in perturbations:
        pairs = [
            (by_key[_key(r)], r) for r in records if r["variant"] == p.tag and _key(r) in by_key
        ]
        changed = sum(c["steps"][-1]["pred"] != q["steps"][-1]["pred"] for c, q in pairs)
        wrong = [(c, q) for c, q in pairs if not c["final_exact"]]
        right = [(c, q) for c, q in pairs if c["final_exact"]]
        effects[p.tag] = {
            "changed": _fraction(changed, len(pairs)),
            "recovered": _fraction(sum(bool(q["final_exact"]) for _, q in wrong), len(wrong)),
            "lost": _fraction(sum(not q["final_exact"] for _, q in right), len(right)),
        }
    return {
        "steps": list(range(1, halt_max_steps + 1)),
        "exact_by_step": exact_by_step,
        "pass@1_by_step": voting["pass@1_by_step"],
        "pass@2_by_step": voting["pass@2_by_step"],
        "first_halt": {"exact": _fraction(at_halt, len(clean)), **voting["first_halt"]},
        "perturbations": effects,
    }


def format_table(per_step: dict[str, Any]) -> str:
    """The per-step results as a compact text table."""
    lines = ["step  exact   pass@1  pass@2"]
    for i, t in enumerate(per_step["steps"]):
        lines.append(
            f"{t:>4}  {per_step['exact_by_step'][i]:.4f}  {per_step['pass@1_by_step'][i]:.4f}  "
            f"{per_step['pass@2_by_step'][i]:.4f}"
        )
    fh = per_step["first_halt"]
    lines.append(f"halt  {fh['exact']:.4f}  {fh['pass@1']:.4f}  {fh['pass@2']:.4f}")
    for tag, e in per_step["perturbations"].items():
        lines.append(
            f"{tag}: changed {e['changed']:.4f}  recovered {e['recovered']:.4f}  "
            f"lost {e['lost']:.4f}"
        )
    return "\n".join(lines)
