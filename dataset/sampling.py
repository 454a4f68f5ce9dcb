"""Which examples go into which batch: pluggable samplers, looked up by name in ``SAMPLERS``.

A sampler plans one set of one iteration at a time (``plan(set_index, counter)``); the plan
knows how many batches it has and gives each batch's global rows, so a resumed run can jump to
any batch without replaying the ones before it. ``counter`` is upstream's ``_iters`` (upstream
``puzzle_dataset.py``, ``PuzzleDataset._iter_train``: +1 for every set of every train
iteration); set s of the iteration that starts at counter ``base`` uses
``base + (s + 1) * counter_step``. Samplers that ignore it have ``counter_step = 0``.

Registered here:

* ``uniform``: upstream's training sampler (``PuzzleDataset._iter_train`` and
  ``_sample_batch``), with only explicitly seeded generators. The group order and the augmented
  variant picked per group come from ``Generator(Philox(seed + counter))`` exactly as upstream,
  so they equal upstream's for the same seed. The order of a picked puzzle's examples (upstream
  permutes them) and the random subset kept when fewer slots remain come from a second generator
  seeded by ``SeedSequence(seed + counter, spawn_key=(batch_index,))`` instead of the global
  ``np.random.choice``: drawing them from the first generator would shift every later variant
  pick away from upstream's, and keying them by batch lets a resumed run skip batches for free.
* ``sequential``: upstream's test mode (``PuzzleDataset._iter_test``), every example once in
  order, in windows of ``global_batch_size``.

Both take ``max_groups`` (``None``: every group): only the first N groups of each set, in the
builder's order, are used, the groups ``dataset.few_shot``'s samplers keep for the same option.
A set's groups, their puzzles and the puzzles' examples are stored in order, so the first N
groups are a prefix of its puzzles and of its example rows.

``dataset.few_shot`` registers the samplers that also choose each row's demonstrations
(``few_shot``, ``few_shot_eval``); the registry imports it on the first lookup.
``dataset.hard_examples`` registers ``hard_examples``: ``uniform`` with each visit's variant
drawn by per-puzzle weights once they are set (``UniformSampler.variant_picks``).

A new sampler subclasses ``Sampler`` and registers itself with ``@SAMPLERS.register("name")``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dataset.common import PuzzleDatasetMetadata
from dataset.reader import SetData
from utils.registry import Registry
from utils.schema import ConfigError


@dataclass(frozen=True)
class BatchRows:
    """One global batch of one set, before collation and rank slicing.

    ``rows`` and ``puzzles`` are int64 [n] with n <= global_batch_size: the example rows of the
    set in batch order and the puzzle (index into ``puzzle_indices``) each row belongs to.
    ``contiguous`` promises ``rows`` are consecutive, so they can be read as one slice.
    ``demo_rows`` is int64 [n, K] for samplers that choose each row's demonstrations: the example
    rows of the set shown as its demos, in slot order, -1 for an empty slot; None otherwise.
    """

    rows: np.ndarray
    puzzles: np.ndarray
    global_effective_batch_size: int
    contiguous: bool
    demo_rows: np.ndarray | None = None


class SetPlan(ABC):
    """The batches of one set in one iteration."""

    @property
    @abstractmethod
    def num_batches(self) -> int:
        """How many batches the set yields in this iteration."""

    @abstractmethod
    def batch(self, index: int) -> BatchRows:
        """Batch ``index`` (0 <= index < num_batches) of the set."""


class Sampler(ABC):
    """Plans the batches of every set of ``sets``; the same on every rank.

    ``metadata`` is the merged ``dataset.json`` of the sets (``PuzzleReader.metadata``).
    """

    # How much upstream's counter moves per set and iteration (see the module docstring).
    counter_step: ClassVar[int]

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
        self.sets = list(sets)
        self.metadata = metadata
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.epochs_per_iter = epochs_per_iter
        # Every sampler keeps the first ``max_groups`` groups of each set (None: all).
        self.max_groups = checked_max_groups(max_groups)

    @abstractmethod
    def plan(self, set_index: int, counter: int) -> SetPlan:
        """The batches of set ``set_index`` when upstream's counter for it is ``counter``."""

    @abstractmethod
    def total_steps(self, epochs: int) -> int:
        """Length of a training run of ``epochs`` epochs in global batches (the lr schedule's).

        A training loop asks its sampler instead of assuming uniform epochs, so a sampler that
        knows exactly what it emits can answer with that count.
        """

    def iteration_counter(self, iteration: int) -> int:
        """Upstream's counter before iteration ``iteration`` (0-based) of a fresh dataset."""
        return iteration * len(self.sets) * self.counter_step

    def set_counter(self, base: int, set_index: int) -> int:
        """The counter set ``set_index`` uses in the iteration that starts at ``base``."""
        return base + (set_index + 1) * self.counter_step

    def num_batches(self, iteration: int = 0) -> int:
        """Batches of iteration ``iteration`` (0-based, from a fresh dataset), all sets."""
        base = self.iteration_counter(iteration)
        return sum(
            self.plan(s, self.set_counter(base, s)).num_batches for s in range(len(self.sets))
        )


SAMPLERS: Registry[type[Sampler]] = Registry(
    "sampler", modules=["dataset.few_shot", "dataset.hard_examples"]
)


def checked_max_groups(max_groups: object) -> int | None:
    """``max_groups`` as given, or a one-line ``ConfigError`` when it is not None or an int >= 1."""
    if max_groups is not None and (
        isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1
    ):
        raise ConfigError(f"max_groups must be None or an integer >= 1, got {max_groups!r}")
    return max_groups


def kept_groups(set_data: SetData, max_groups: int | None) -> int:
    """How many of the set's groups the first ``max_groups`` (None: all) are."""
    return set_data.num_groups if max_groups is None else min(max_groups, set_data.num_groups)


def kept_examples(set_data: SetData, max_groups: int | None) -> int:
    """Example rows of the set's first ``max_groups`` groups: rows 0 up to this (exclusive)."""
    puzzles = int(set_data.group_indices[kept_groups(set_data, max_groups)])
    return int(set_data.puzzle_indices[puzzles])


@dataclass
class _UniformPlan(SetPlan):
    """One set's visits for one counter: the variant picked per visited group, packed."""

    set_data: SetData
    seed: int  # seed + counter: seeds both generators
    global_batch_size: int
    picks: np.ndarray  # int64 [V], puzzle index per visited group, in group order
    cum: np.ndarray  # int64 [V+1], examples of the visits before each visit
    bounds: np.ndarray  # int64 [B+1], batch b holds visits bounds[b] .. bounds[b+1]-1

    @property
    def num_batches(self) -> int:
        return self.bounds.size - 1

    def batch(self, index: int) -> BatchRows:
        lo, hi = int(self.bounds[index]), int(self.bounds[index + 1])
        picks = self.picks[lo:hi]
        sizes = np.diff(self.cum[lo : hi + 1])
        total = int(self.cum[hi] - self.cum[lo])
        visit = np.repeat(np.arange(hi - lo), sizes)
        first_example = np.repeat(self.set_data.puzzle_indices[picks], sizes)
        offset_in_visit = np.arange(total) - np.repeat(self.cum[lo:hi] - self.cum[lo], sizes)

        # Upstream adds a random permutation of each puzzle's examples (a random subset for the
        # visit that fills the batch): sort random keys within each visit, keep the first gbs.
        seed = np.random.SeedSequence(self.seed, spawn_key=(index,))
        keys = np.random.Generator(np.random.Philox(seed)).random(total)
        order = np.lexsort((keys, visit))
        gbs = self.global_batch_size
        rows = (first_example + offset_in_visit)[order][:gbs]
        puzzles = np.repeat(picks, sizes)[:gbs]
        return BatchRows(rows, puzzles, gbs, contiguous=False)


@SAMPLERS.register("uniform")
class UniformSampler(Sampler):
    """Upstream's training sampling: each iteration is ``epochs_per_iter`` epochs.

    An epoch visits every group once (random order) and adds all examples of one random puzzle
    of the group, in random order. A batch takes whole visits until full; the visit that fills
    it is trimmed to a random subset and the next batch starts at the following visit. Every
    batch is full; a short last one is dropped.
    """

    counter_step = 1

    def plan(self, set_index: int, counter: int) -> _UniformPlan:
        set_data = self.sets[set_index]
        num_groups = kept_groups(set_data, self.max_groups)
        rng = np.random.Generator(np.random.Philox(seed=self.seed + counter))
        group_order = np.concatenate(
            [rng.permutation(num_groups) for _ in range(self.epochs_per_iter)]
        )
        picks = self.variant_picks(set_index, rng, group_order)
        sizes = set_data.puzzle_indices[picks + 1] - set_data.puzzle_indices[picks]
        cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        gbs = self.global_batch_size
        bounds = [0]
        while int(cum[-1]) - int(cum[bounds[-1]]) >= gbs:
            bounds.append(int(np.searchsorted(cum, cum[bounds[-1]] + gbs, side="left")))
        return _UniformPlan(
            set_data, self.seed + counter, gbs, picks, cum, np.asarray(bounds, dtype=np.int64)
        )

    def variant_picks(
        self, set_index: int, rng: np.random.Generator, group_order: np.ndarray
    ) -> np.ndarray:
        """The puzzle picked at each visit of ``group_order`` (int64 [V], puzzle indices of the
        set), drawn from ``rng`` right after the group order; subclasses weight the pick."""
        groups = self.sets[set_index].group_indices
        # One bounded draw per visit in order: the same stream as upstream's per-group calls.
        return rng.integers(groups[group_order], groups[group_order + 1]).astype(np.int64)

    def total_steps(self, epochs: int) -> int:
        """Upstream's schedule length, ``int(epochs * total_groups * mean_puzzle_examples / gbs)``.

        From the merged metadata, evaluated left to right in floats exactly as upstream's
        ``pretrain.py`` (``init_train_state``) and this repository's training loop did, so lr
        schedules stay bit-identical. It is an estimate of what this sampler emits: the picked
        variants differ in size and each iteration drops its short last batch per set. With
        ``max_groups`` keeping fewer groups than a set has, the same formula over the kept
        groups and their puzzles.
        """
        groups, mean = self._groups_and_mean_size()
        return int(epochs * groups * mean / self.global_batch_size)

    def examples_per_epoch(self) -> float:
        """Upstream's estimate of the examples one epoch visits: groups × mean puzzle size."""
        groups, mean = self._groups_and_mean_size()
        return groups * mean

    def _groups_and_mean_size(self) -> tuple[int, float]:
        """(kept groups, mean examples per kept puzzle) over every set: the metadata's
        ``total_groups`` and ``mean_puzzle_examples`` when every group is kept."""
        kept = [kept_groups(s, self.max_groups) for s in self.sets]
        if all(k == s.num_groups for k, s in zip(kept, self.sets, strict=True)):
            return self.metadata.total_groups, self.metadata.mean_puzzle_examples
        puzzles = sum(int(s.group_indices[k]) for k, s in zip(kept, self.sets, strict=True))
        examples = sum(kept_examples(s, self.max_groups) for s in self.sets)
        return sum(kept), examples / max(puzzles, 1)


@dataclass
class _SequentialPlan(SetPlan):
    """One set's windows: batch w holds examples ``w * gbs`` up to ``(w + 1) * gbs`` (exclusive)."""

    set_data: SetData
    global_batch_size: int
    num_rows: int  # the rows of the kept groups: 0 .. num_rows - 1

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_rows / self.global_batch_size)

    def batch(self, index: int) -> BatchRows:
        start = index * self.global_batch_size
        end = min(self.num_rows, start + self.global_batch_size)
        rows = np.arange(start, end)
        puzzles = np.searchsorted(self.set_data.puzzle_indices, rows, side="right") - 1
        return BatchRows(rows, puzzles, end - start, contiguous=True)


@SAMPLERS.register("sequential")
class SequentialSampler(Sampler):
    """Upstream's test mode: every example once, in order, in windows of ``global_batch_size``.

    Every iteration is the same pass; ``global_effective_batch_size`` is the window's size (the
    last window of a set may be short). ``epochs_per_iter`` and ``seed`` are not used. With
    ``max_groups`` the pass covers the example rows of each set's first N groups only.
    """

    counter_step = 0

    def plan(self, set_index: int, counter: int) -> _SequentialPlan:
        set_data = self.sets[set_index]
        rows = kept_examples(set_data, self.max_groups)
        return _SequentialPlan(set_data, self.global_batch_size, rows)

    def total_steps(self, epochs: int) -> int:
        """Exactly the windows of ``epochs`` passes."""
        return epochs * self.num_batches(0)
