"""Hard-example sampling: the uniform sampler with each group's variant drawn by weight.

The research fork mattbuot/TinyRecursiveModelsJD (``custom_sampling``, its ``puzzle_dataset.py``
``_sample_batch``) weights every augmented variant (puzzle) of a group by how often the model
got it wrong and, at each visit of the group, draws the variant with
``rng.choice(group_puzzles, p=w / w.sum())`` (uniform when the group's weights sum to 0) from
the same ``Generator(Philox(seed + counter))`` stream that the uniform sampler draws its
``integers`` from. ``hard_examples`` draws the same picks, vectorised: after the group order,
one ``rng.random()`` per visit, turned into a variant by numpy's own rule for ``choice`` (the
group's cdf ``cumsum(p) / cumsum(p)[-1]`` searched with ``side="right"``).

Weights are per puzzle index (the index into a set's ``puzzle_indices``, the space the plan
draws in; the fork keyed them by puzzle identifier and looked them up by index), numbered
globally over the sets in the reader's order (``puzzle_offsets``). They live in a shared-memory
tensor, so a DataLoader worker started before they change (``data_workers=1``, persistent)
plans its next iteration with the weights the training process set. Until weights are set
(a fresh run's first iteration) the plans are ``uniform``'s, bit for bit.

The batch field ``puzzle_index`` (int64 [local_batch_size], -1 on padding rows) carries each
row's global puzzle index, so that it travels in the ACT carry with the row and a row that
halts batches after it was loaded is counted for its own puzzle (``training.hard_examples``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dataset.collate import BATCH_FIELDS, BatchSource
from dataset.common import PuzzleDatasetMetadata
from dataset.reader import SetData
from dataset.sampling import SAMPLERS, UniformSampler, kept_groups

PADDING_PUZZLE = -1  # ``puzzle_index`` of a padding row


def puzzle_offsets(sets: Sequence[SetData]) -> np.ndarray:
    """int64 [len(sets) + 1]: the global index of each set's first puzzle, then the total."""
    sizes = [s.puzzle_identifiers.size for s in sets]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def group_cdf(weights: np.ndarray) -> np.ndarray:
    """float64 [n]: the cdf ``rng.choice`` searches for one group's variant weights [n].

    The fork's normalisation (``w / w.sum()``, uniform ``1 / n`` when the sum is 0) followed by
    numpy's own (``cdf = cumsum(p); cdf /= cdf[-1]``), so the last entry is exactly 1.
    """
    total = weights.sum()
    p = weights / total if total > 0 else np.ones_like(weights) / weights.size
    cdf = p.cumsum()
    cdf /= cdf[-1]
    return cdf


def search_right(
    cdf: np.ndarray, starts: np.ndarray, ends: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """For each visit i: the first index j in ``[starts[i], ends[i])`` with ``cdf[j] > u[i]``.

    ``np.searchsorted(cdf[starts[i]:ends[i]], u[i], side="right") + starts[i]`` for every i at
    once (int64 [V]); each range must be non-empty and end with a value above its ``u``.
    """
    lo, hi = starts.astype(np.int64), ends.astype(np.int64)
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        right = active & (cdf[np.minimum(mid, cdf.size - 1)] <= u)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)


@SAMPLERS.register("hard_examples")
class HardExampleSampler(UniformSampler):
    """``uniform`` whose variant pick per visit follows ``weights`` once they are set.

    ``weights`` is a float64 [num_puzzles] shared-memory tensor over the global puzzle indices
    of ``puzzle_offsets(sets)``; ``set_weights`` replaces it in place. Group order, example
    order and batch packing are ``uniform``'s; every rank given the same weights draws the
    same plan.
    """

    def __init__(
        self,
        sets: Sequence[SetData],
        metadata: PuzzleDatasetMetadata,
        *,
        seed: int,
        global_batch_size: int,
        epochs_per_iter: int,
        max_groups: int | None = None,
    ) -> None:
        super().__init__(
            sets,
            metadata,
            seed=seed,
            global_batch_size=global_batch_size,
            epochs_per_iter=epochs_per_iter,
            max_groups=max_groups,
        )
        self.offsets = puzzle_offsets(self.sets)
        # Shared memory: a DataLoader worker forked (or spawned) before the weights change
        # sees every later set_weights.
        self.weights = torch.ones(self.num_puzzles, dtype=torch.float64).share_memory_()
        self.version = torch.zeros(1, dtype=torch.int64).share_memory_()  # 0: no weights yet
        self._cdfs: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def num_puzzles(self) -> int:
        """Puzzles of all sets together: the length of ``weights``."""
        return int(self.offsets[-1])

    @property
    def has_weights(self) -> bool:
        """Whether weights were set; before, every plan is ``uniform``'s."""
        return int(self.version[0]) > 0

    def current_weights(self) -> np.ndarray | None:
        """A copy of the weights in force (float64 [num_puzzles]), None before any is set."""
        return self.weights.numpy().copy() if self.has_weights else None

    def set_weights(self, weights: np.ndarray | None) -> None:
        """Plan the following iterations with ``weights`` (float64 [num_puzzles], >= 0, or None:
        back to ``uniform``'s picks)."""
        if weights is None:
            self.weights.fill_(1.0)
            self.version.zero_()
            return
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.num_puzzles,) or not np.all(weights >= 0):
            raise ValueError(
                f"hard-example weights must be {self.num_puzzles} values >= 0, got shape "
                f"{weights.shape}"
            )
        self.weights.copy_(torch.from_numpy(weights))
        self.version.add_(1)

    def kept_group_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Global puzzle index ranges [start, end) of every kept group of every set (int64 [G])."""
        starts, ends = [], []
        for s, set_data in enumerate(self.sets):
            bounds = set_data.group_indices[: kept_groups(set_data, self.max_groups) + 1]
            starts.append(bounds[:-1] + self.offsets[s])
            ends.append(bounds[1:] + self.offsets[s])
        return np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)

    def _cdf(self, set_index: int) -> np.ndarray:
        """float64 [P]: each kept group's ``group_cdf`` at its puzzles (cached per weights)."""
        version = int(self.version[0])
        cached = self._cdfs.get(set_index)
        if cached is not None and cached[0] == version:
            return cached[1]
        set_data = self.sets[set_index]
        weights = self.weights.numpy()[self.offsets[set_index] : self.offsets[set_index + 1]]
        cdf = np.ones(weights.size, dtype=np.float64)
        groups = set_data.group_indices
        # One group at a time: numpy's sum and cumsum of that group's values alone, as choice.
        for g in range(kept_groups(set_data, self.max_groups)):
            lo, hi = int(groups[g]), int(groups[g + 1])
            cdf[lo:hi] = group_cdf(weights[lo:hi])
        self._cdfs[set_index] = (version, cdf)
        return cdf

    def variant_picks(
        self, set_index: int, rng: np.random.Generator, group_order: np.ndarray
    ) -> np.ndarray:
        """Weighted picks once weights are set (one ``rng.random()`` per visit, as the fork's
        ``rng.choice``); ``uniform``'s bounded draws before."""
        if not self.has_weights:
            return super().variant_picks(set_index, rng, group_order)
        groups = self.sets[set_index].group_indices
        u = rng.random(group_order.size)
        cdf = self._cdf(set_index)
        return search_right(cdf, groups[group_order], groups[group_order + 1], u)


@BATCH_FIELDS.register("puzzle_index")
def build_puzzle_index(source: BatchSource) -> np.ndarray:
    """int64 [local_batch_size]: each row's global puzzle index (``puzzle_offsets`` over the
    reader's sets); padding rows are ``PADDING_PUZZLE``."""
    sets = source.reader.sets
    position = next(i for i, s in enumerate(sets) if s.name == source.set_data.name)
    offset = int(puzzle_offsets(sets)[position])
    return source.pad(source.puzzles.astype(np.int64) + offset, PADDING_PUZZLE)
