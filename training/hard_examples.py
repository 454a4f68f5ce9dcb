"""The run's hard-example counts: per-puzzle (seen, correct) totals and the sampling weights.

``sampling=hard_examples`` (the research fork mattbuot/TinyRecursiveModelsJD's
``custom_sampling``, ``pretrain.py`` ``compute_exact_accuracy_per_puzzle`` and its launch loop)
weights every augmented variant by ``1 - correct / (seen + 1)`` of its training rows so far,
rebuilt after each iteration; ``dataset.hard_examples.HardExampleSampler`` draws each group's
variant by these weights. Unlike the fork:

* a row is counted when it halts, for the puzzle it actually is (the ``puzzle_index`` its ACT
  slot carries in ``current_data``), and only if it has labels; the fork paired the incoming
  batch's identifiers with the flags of the rows that halted, counted every incoming row as
  seen and only halted ones as correct, and crashed with gradient accumulation;
* the counts of every rank are summed at the rebuild, and every rank hands the same weights to
  its sampler, so all ranks keep drawing one plan (the fork rebuilt rank 0's loader alone);
* weights are keyed by puzzle index, the space the sampler draws in;
* totals and weights are saved with the run (``state_dict``), each rank's counts since the
  last rebuild with that rank (``rank_state_dict``), so a resumed run draws the same batches.

``observe`` runs on the device without a host read; ``rebuild`` is the one collective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dataset.hard_examples import HardExampleSampler
from models.losses import LossOutput
from utils.checkpoint import CheckpointMismatchError
from utils.distributed import all_reduce_sum_

# A within-group probability that moves by more than this counts as a changed distribution.
_CHANGE_TOLERANCE = 1e-12


def hard_example_weights(seen: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """float64 [P]: ``1 - correct / (seen + 1)`` per puzzle (1 for a puzzle never seen)."""
    return 1.0 - correct.astype(np.float64) / (seen.astype(np.float64) + 1.0)


def within_group(weights: np.ndarray | None, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """float64 [P]: each group's normalised weights at its puzzles (uniform for no weights or
    a zero sum), over the groups ``[starts, ends)`` (other puzzles 0)."""
    size = int(ends.max()) if ends.size else 0
    p = np.zeros(size, dtype=np.float64)
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        w = None if weights is None else weights[lo:hi]
        total = 0.0 if w is None else float(w.sum())
        p[lo:hi] = w / total if w is not None and total > 0 else 1.0 / (hi - lo)
    return p


def weight_statistics(
    before: np.ndarray | None,
    after: np.ndarray,
    seen: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
) -> dict[str, float]:
    """What a rebuild did, over the groups ``[starts, ends)`` (global puzzle indices).

    ``sampling/weight_entropy``: mean over groups with >= 2 variants of H(p) / log n (1 =
    uniform); ``sampling/groups_changed``: the fraction of those groups whose p moved from the
    distribution in force ``before`` (None: uniform); ``sampling/seen_fraction``: the puzzles
    counted at least once; ``sampling/mean_weight``: the mean weight of the puzzles.
    """
    sizes = ends - starts
    multi = sizes >= 2
    p_new = within_group(after, starts, ends)
    p_old = within_group(before, starts, ends)
    plogp = np.where(p_new > 0, p_new * np.log(np.where(p_new > 0, p_new, 1.0)), 0.0)
    entropies, changed = [], []
    for lo, hi in zip(starts[multi].tolist(), ends[multi].tolist(), strict=True):
        entropies.append(-plogp[lo:hi].sum() / np.log(hi - lo))
        changed.append(np.abs(p_new[lo:hi] - p_old[lo:hi]).max() > _CHANGE_TOLERANCE)
    kept = np.concatenate([np.arange(lo, hi) for lo, hi in zip(starts, ends, strict=True)])
    return {
        "sampling/weight_entropy": float(np.mean(entropies)) if entropies else 1.0,
        "sampling/groups_changed": float(np.mean(changed)) if changed else 0.0,
        "sampling/seen_fraction": float(np.mean(seen[kept] > 0)) if kept.size else 0.0,
        "sampling/mean_weight": float(np.mean(after[kept])) if kept.size else 1.0,
    }


class HardExampleCounts:
    """Per-puzzle counts of one process and the weights they give ``sampler``.

    ``pending_seen``/``pending_correct`` (int64 [num_puzzles] on ``device``) count this
    rank's halted rows since the last ``rebuild``; ``total_seen``/``total_correct`` are the
    run's, summed over ranks, the same on every rank.
    """

    def __init__(self, sampler: HardExampleSampler, device: torch.device) -> None:
        self.sampler = sampler
        n = sampler.num_puzzles
        self.pending_seen = torch.zeros(n, dtype=torch.int64, device=device)
        self.pending_correct = torch.zeros(n, dtype=torch.int64, device=device)
        self.total_seen = torch.zeros(n, dtype=torch.int64, device=device)
        self.total_correct = torch.zeros(n, dtype=torch.int64, device=device)

    def observe(
        self, puzzle_index: torch.Tensor, halted_valid: torch.Tensor, exact: torch.Tensor
    ) -> None:
        """Count one supervision step's rows: ``puzzle_index`` int [B] (-1: padding),
        ``halted_valid`` bool [B] (halted at this step and has labels), ``exact`` bool [B]
        (every labelled token right). On the device, no host read."""
        index = puzzle_index.to(self.pending_seen.device, torch.int64)
        counted = halted_valid.to(index.device) & (index >= 0)
        index = index.clamp_min(0)  # padding rows add 0 at puzzle 0
        self.pending_seen.index_add_(0, index, counted.to(torch.int64))
        right = counted & exact.to(index.device)
        self.pending_correct.index_add_(0, index, right.to(torch.int64))

    def observe_output(self, out: LossOutput) -> None:
        """``observe`` a training step's ``LossOutput``: the rows of its new carry (the puzzle
        each slot holds, which a slot that did not halt loaded from an earlier batch), the
        slots that halted with labels, and the head's per-row exact flags."""
        carry = out.new_carry
        rows = out.row_metrics
        self.observe(
            carry.current_data["puzzle_index"],
            carry.halted & rows["has_labels"],
            rows["exact_accuracy"],
        )

    def rebuild(self) -> dict[str, float]:
        """End of an iteration: sum every rank's pending counts (a collective, a no-op in one
        process), add them to the totals, hand the new weights to the sampler; the
        statistics of ``weight_statistics``, the same on every rank."""
        pending = torch.stack([self.pending_seen, self.pending_correct])
        all_reduce_sum_(pending)
        self.total_seen += pending[0]
        self.total_correct += pending[1]
        self.pending_seen.zero_()
        self.pending_correct.zero_()
        seen = self.total_seen.cpu().numpy()
        weights = hard_example_weights(seen, self.total_correct.cpu().numpy())
        before = self.sampler.current_weights()
        self.sampler.set_weights(weights)
        starts, ends = self.sampler.kept_group_bounds()
        return weight_statistics(before, weights, seen, starts, ends)

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's totals and the weights in force (None before the first rebuild): CPU
        tensors, shared by every rank."""
        weights = self.sampler.current_weights()
        return {
            "seen": self.total_seen.cpu(),
            "correct": self.total_correct.cpu(),
            "weights": None if weights is None else torch.from_numpy(weights),
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore ``state_dict()`` output: the totals and the sampler's weights."""
        self._check(state, source)
        self.total_seen.copy_(state["seen"])
        self.total_correct.copy_(state["correct"])
        weights = state["weights"]
        self.sampler.set_weights(None if weights is None else weights.numpy())

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's counts since the last rebuild (CPU tensors)."""
        return {"seen": self.pending_seen.cpu(), "correct": self.pending_correct.cpu()}

    def load_rank_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        self._check(state, source)
        self.pending_seen.copy_(state["seen"])
        self.pending_correct.copy_(state["correct"])

    def _check(self, state: Mapping[str, Any], source: str) -> None:
        n = self.sampler.num_puzzles
        for key in ("seen", "correct"):
            if tuple(state[key].shape) != (n,):
                raise CheckpointMismatchError(
                    f"{source}: hard-example counts for {state[key].shape[0]} puzzles, the "
                    f"training data has {n}; resume on the data the run was started with"
                )
