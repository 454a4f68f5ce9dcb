"""Few-shot sampling: every item is one query pair plus the demonstration pairs shown with it.

ETRM's loader (``dataset/fewshot_puzzle_dataset.py``, ``FewShotPuzzleDataset``) as two samplers
of ``dataset.sampling.SAMPLERS``; the batch fields of ``dataset.demos`` read their choice of demos
(``BatchRows.demo_rows``). A puzzle's examples are stored demos first: its first ``num_demos``
examples are the ARC train pairs, the rest its test pairs (``<set>__num_demos.npy``). K is
``max_demos``; the groups used are the first ``max_groups`` of each set, in the builder's order.

Which examples are queries, and which are each query's demos (``target_policy``):

* ``test_pairs`` (ETRM): the queries are the examples after the ``num_demos`` demos, each shown
  with the first ``min(num_demos, K)`` demos. Capping at K never moves the queries: they start
  after all ``num_demos`` demos, as ETRM.
* ``leave_one_out`` (LPN's recipe): every example of a puzzle with at least two is a query in
  turn, shown with the puzzle's other examples, the first K of them in order.

Registered here:

* ``few_shot``: training, ETRM's ``_iter_train``. Each iteration of ``epochs_per_iter`` epochs
  permutes the kept groups once per epoch, visits them in that order and picks one random
  augmented puzzle per visit, whose queries join the iteration's stream of items; batches are
  consecutive runs of ``global_batch_size`` items and the short last one is dropped. The group
  order comes from ``Generator(Philox(seed + counter))``, one ``permutation`` per epoch, so it
  equals ETRM's for the same seed and counter. By default (``batch_fill=continue``) two
  departures:

  - the picks come from one generator per chunk of ``CHUNK_EPOCHS`` epochs
    (``SeedSequence(seed + counter, spawn_key=(chunk,))``, one pick per group and epoch, drawn
    in group order) instead of ETRM's draws interleaved with the group-order generator;
  - a visit's queries join in stored order and the visit that fills a batch continues in the
    next one, where ETRM (like upstream TRM) keeps a random subset of its queries, in random
    order, and loses the rest for the iteration.

  So every visited query is trained on, and an iteration has exactly
  ``floor(items / global_batch_size)`` batches: ``total_steps`` counts the batches emitted
  (ETRM counted groups instead, so about a third of its logged steps did no update), and for
  ARC, where the augmented puzzles of a group have the same number of queries, it needs no
  random draw at all.

  ``batch_fill=etrm`` reproduces ETRM's batches bit for bit instead: after the permutations the
  same generator draws each visit's puzzle (``integers``) and the queries it keeps
  (``choice`` without replacement, at most the free slots), in ETRM's order. ``total_steps``
  stays the count of batches emitted: from the group order alone for ARC, from a replay of the
  iteration's draws otherwise.
* ``few_shot_eval``: evaluation, ETRM's ``_iter_test``: every query (``test_pairs``) of every
  puzzle of the kept groups once, in order, in windows of ``global_batch_size``; the last window
  may be short (``global_effective_batch_size`` is its size) and the collator pads it. Nothing
  is dropped (ETRM's test iterator skipped the queries of a puzzle that did not fit the batch).

Data without ``num_demos`` (Sudoku, Maze, upstream TRM builds) is refused, and so are queries
without any demonstration (the test split of a ``--split-policy trm`` ARC build).

One module past 400 lines on purpose: both samplers share the query layout (``SetQueries``), its
checks and the batch windows (``_WindowPlan``), which read best beside the samplers that use them.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from dataset.common import DataError, PuzzleDatasetMetadata
from dataset.reader import SetData
from dataset.sampling import SAMPLERS, BatchRows, Sampler, SetPlan, kept_groups
from utils.schema import ConfigError

TARGET_POLICIES = ("test_pairs", "leave_one_out")
BATCH_FILLS = ("continue", "etrm")
DEFAULT_MAX_DEMOS = 10  # ETRM's max_demos
# Picks are drawn by one generator per chunk of this many epochs, so that counting batches
# streams through an iteration without holding all its visits (ARC: 560 groups per epoch).
CHUNK_EPOCHS = 1024
_REBUILD = (
    "rebuild it with python -m dataset.build_arc_dataset_encoder (or dataset.build_arc_dataset "
    "--split-policy strict)"
)


def _philox(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(seed, spawn_key=key)))


@dataclass(frozen=True)
class SetQueries:
    """The queries of one set's kept puzzles under one target policy.

    ``count`` and ``first`` are int64 [P]: how many queries each kept puzzle has and the index,
    within the puzzle, of its first query (``num_demos`` or 0). Puzzles 0..P-1 are those of the
    first ``num_groups`` groups.
    """

    set_data: SetData
    policy: str
    max_demos: int
    num_groups: int
    count: np.ndarray
    first: np.ndarray

    @property
    def group_indices(self) -> np.ndarray:
        """int64 [num_groups + 1], the kept groups' puzzle offsets."""
        return self.set_data.group_indices[: self.num_groups + 1]

    def constant_group_counts(self) -> np.ndarray | None:
        """int64 [num_groups] queries per puzzle of each group when every puzzle of a group has
        the same number (ARC: augmented copies of one task), else None."""
        if self.num_groups == 0:
            return np.zeros(0, dtype=np.int64)
        starts = self.group_indices[:-1]
        low = np.minimum.reduceat(self.count, starts)
        high = np.maximum.reduceat(self.count, starts)
        return low if np.array_equal(low, high) else None

    def items(self, puzzles: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Query ``query[i]`` (0-based, < count) of puzzle ``puzzles[i]``, both int64 [m].

        Returns its example row, int64 [m], and its demo rows, int64 [m, max_demos] in slot
        order with -1 in the empty slots.
        """
        start = self.set_data.puzzle_indices[puzzles]
        local = self.first[puzzles] + query
        slots = np.arange(self.max_demos)[None, :]
        if self.policy == "test_pairs":
            assert self.set_data.num_demos is not None
            filled = np.minimum(self.set_data.num_demos[puzzles], self.max_demos)
            demo_local = np.broadcast_to(slots, (puzzles.size, self.max_demos))
        else:
            examples = self.set_data.puzzle_indices[puzzles + 1] - start
            filled = np.minimum(examples - 1, self.max_demos)
            demo_local = slots + (slots >= local[:, None])  # skip the query itself
        demo_rows = np.where(slots < filled[:, None], start[:, None] + demo_local, -1)
        return start + local, demo_rows.astype(np.int64)


def set_queries(
    set_data: SetData, policy: str, max_demos: int, max_groups: int | None
) -> SetQueries:
    """The queries of ``set_data``'s first ``max_groups`` groups; a one-line ``DataError`` for
    data without demonstrations."""
    if set_data.num_demos is None:
        raise DataError(
            f"{set_data.source.location}: set '{set_data.stored_name}' has no "
            f"{set_data.stored_name}__num_demos array, so no demonstration pairs: the encoder "
            "path reads ARC data only (Sudoku and Maze have none); build it with python -m "
            "dataset.build_arc_dataset_encoder"
        )
    kept = kept_groups(set_data, max_groups)
    puzzles = int(set_data.group_indices[kept])
    examples = np.diff(set_data.puzzle_indices[: puzzles + 1])
    num_demos = set_data.num_demos[:puzzles]
    if policy == "test_pairs":
        count, first = examples - num_demos, num_demos
        shown = np.minimum(num_demos, max_demos)
    else:
        count = np.where(examples >= 2, examples, 0)
        first = np.zeros_like(examples)
        shown = np.minimum(examples - 1, max_demos)
    lonely = np.flatnonzero((count > 0) & (shown == 0))
    if lonely.size:
        p = int(lonely[0])
        raise DataError(
            f"{set_data.source.describe(set_data.stored_name, 'num_demos')}: puzzle {p} has "
            f"{int(count[p])} queries but no demonstration pairs (num_demos 0), as in the test "
            f"split of a --split-policy trm build; {_REBUILD}"
        )
    return SetQueries(set_data, policy, max_demos, kept, count.astype(np.int64), first)


class DemoSampler(Sampler):
    """A sampler whose batches also say which examples are each row's demonstrations.

    Options (``PuzzleDatasetConfig.sampler_options``): ``max_demos`` K >= 1, ``max_groups`` (the
    first N groups of each set; None: all) and ``target_policy`` (``test_pairs`` |
    ``leave_one_out``). Every ``BatchRows`` it plans has ``demo_rows`` int64 [n, K].
    """

    def __init__(
        self,
        sets: Sequence[SetData],
        metadata: PuzzleDatasetMetadata,
        *,
        seed: int,
        global_batch_size: int,
        epochs_per_iter: int,
        max_demos: int = DEFAULT_MAX_DEMOS,
        max_groups: int | None = None,
        target_policy: str = "test_pairs",
    ) -> None:
        super().__init__(
            sets,
            metadata,
            seed=seed,
            global_batch_size=global_batch_size,
            epochs_per_iter=epochs_per_iter,
            max_groups=max_groups,
        )
        if isinstance(max_demos, bool) or not isinstance(max_demos, int) or max_demos < 1:
            raise ConfigError(f"max_demos must be an integer >= 1, got {max_demos!r}")
        if target_policy not in TARGET_POLICIES:
            raise ConfigError(
                f"target_policy must be one of {', '.join(TARGET_POLICIES)}, got {target_policy!r}"
            )
        self.max_demos = max_demos
        self.target_policy = target_policy
        self.queries = [
            set_queries(s, target_policy, max_demos, self.max_groups) for s in self.sets
        ]


@dataclass
class _WindowPlan(SetPlan):
    """Batch b holds items ``b * gbs`` up to ``(b + 1) * gbs`` (exclusive) of one set's stream of
    items, each a query of a kept puzzle; only an evaluation stream may end in a short batch."""

    queries: SetQueries
    global_batch_size: int

    @abstractmethod
    def stream(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Items ``lo`` up to ``hi`` (exclusive, cut at the stream's end): each one's puzzle and
        its index among the puzzle's queries, both int64 [n]."""

    def batch(self, index: int) -> BatchRows:
        lo = index * self.global_batch_size
        puzzles, query = self.stream(lo, lo + self.global_batch_size)
        rows, demo_rows = self.queries.items(puzzles, query)
        return BatchRows(rows, puzzles, puzzles.size, contiguous=False, demo_rows=demo_rows)


@dataclass
class _ArrayPlan(_WindowPlan):
    """A stream held whole: ``puzzles`` and ``query`` int64 [N]."""

    puzzles: np.ndarray
    query: np.ndarray

    @property
    def num_batches(self) -> int:
        return math.ceil(self.puzzles.size / self.global_batch_size)

    def stream(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.puzzles[lo:hi], self.query[lo:hi]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class _TrainPlan(_WindowPlan):
    """One set's batches for one counter, counted by the sampler; drawn on the first ``batch``."""

    sampler: FewShotSampler
    set_index: int
    counter: int

    @property
    def num_batches(self) -> int:
        return self.sampler.count_batches(self.set_index, self.counter)


@dataclass
class _ContinuedPlan(_TrainPlan):
    """``batch_fill=continue``: the stream is every query of every visit, in stored order."""

    picks: np.ndarray | None = None  # int64 [V], the puzzle picked per visit, in visit order
    cum: np.ndarray | None = None  # int64 [V+1], items of the visits before each visit

    def stream(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        if self.picks is None or self.cum is None:
            _, self.picks = self.sampler.visit_picks(self.set_index, self.counter)
            sizes = self.queries.count[self.picks]
            self.cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        items = np.arange(lo, hi)
        visit = np.searchsorted(self.cum, items, side="right") - 1  # skips visits with no query
        return self.picks[visit], items - self.cum[visit]


class _EtrmReplay:
    """ETRM's ``_iter_train`` for one set and counter, draw for draw, one batch at a time.

    ``Generator(Philox(seed + counter))`` permutes the kept groups once per epoch; then each
    visit in order draws its puzzle (``integers``) and, when the puzzle has queries, the random
    subset of them it keeps, as many as the batch still holds (``choice`` without replacement,
    so also their order).
    """

    def __init__(self, queries: SetQueries, seed: int, epochs: int, global_batch_size: int) -> None:
        self.rng = np.random.Generator(np.random.Philox(seed=seed))
        self.order = _epoch_orders(self.rng, queries.num_groups, epochs)
        self.bounds = queries.group_indices.tolist()
        self.count = queries.count.tolist()
        self.global_batch_size = global_batch_size
        self.visit = 0
        self.batches = 0  # full batches returned so far

    def next_batch(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next batch's puzzles and query indices, int64 [gbs]; None once the visits run out
        before it is full (the dropped short last batch)."""
        gbs = self.global_batch_size
        puzzles = np.empty(gbs, dtype=np.int64)
        query = np.empty(gbs, dtype=np.int64)
        filled = 0
        while filled < gbs and self.visit < self.order.size:
            group = int(self.order[self.visit])
            self.visit += 1
            puzzle = int(self.rng.integers(self.bounds[group], self.bounds[group + 1]))
            size = self.count[puzzle]
            if size == 0:
                continue
            take = min(size, gbs - filled)
            query[filled : filled + take] = self.rng.choice(size, take, replace=False)
            puzzles[filled : filled + take] = puzzle
            filled += take
        if filled < gbs:
            return None
        self.batches += 1
        return puzzles, query


@dataclass
class _TrimmedPlan(_TrainPlan):
    """``batch_fill=etrm``: the stream is the items ETRM's batches keep, replayed batch by batch
    as they are asked for, so the draws cost as much as in ETRM's loader and no more at once."""

    replay: _EtrmReplay | None = None
    last: tuple[np.ndarray, np.ndarray] | None = None  # batch replay.batches - 1

    def stream(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        index = lo // self.global_batch_size
        if self.replay is None or index < self.replay.batches - 1:
            self.replay = self.sampler.etrm_replay(self.set_index, self.counter)
        while self.replay.batches <= index:
            self.last = self.replay.next_batch()
            if self.last is None:
                raise IndexError(f"batch {index} of an iteration of {self.num_batches} batches")
        assert self.last is not None
        return self.last


def _epoch_orders(rng: np.random.Generator, num_groups: int, epochs: int) -> np.ndarray:
    """The visited groups of ``epochs`` epochs, int64 [epochs * num_groups]: one permutation
    per epoch, the first draws of ETRM's (and upstream TRM's) iteration generator."""
    orders = [rng.permutation(num_groups) for _ in range(epochs)]
    return np.concatenate(orders).astype(np.int64) if orders else np.zeros(0, dtype=np.int64)


def _trimmed_batches(sizes: np.ndarray, global_batch_size: int) -> int:
    """Full batches of ETRM's filling for visits of ``sizes`` queries (int64 [V], in order).

    A batch takes whole visits until full; the visit that fills it keeps only what fits and the
    next batch starts at the following visit; the short last batch is dropped.
    """
    cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    batches, start = 0, 0
    while int(cum[-1]) - int(cum[start]) >= global_batch_size:
        start = int(np.searchsorted(cum, cum[start] + global_batch_size, side="left"))
        batches += 1
    return batches


@SAMPLERS.register("few_shot")
class FewShotSampler(DemoSampler):
    """ETRM's training sampling (the module docstring has the details and the departures).

    Every batch holds exactly ``global_batch_size`` items; ``total_steps`` and ``num_batches``
    are exact counts of what ``plan`` yields, found from the group order alone when all puzzles
    of each group have the same number of queries (ARC; ``batch_fill=continue`` needs not even
    that) and from the iteration's draws otherwise. ``batch_fill`` (``BATCH_FILLS``) chooses
    what happens to the visit that fills a batch.
    """

    counter_step = 1

    def __init__(
        self,
        sets: Sequence[SetData],
        metadata: PuzzleDatasetMetadata,
        *,
        seed: int,
        global_batch_size: int,
        epochs_per_iter: int,
        max_demos: int = DEFAULT_MAX_DEMOS,
        max_groups: int | None = None,
        target_policy: str = "test_pairs",
        batch_fill: str = "continue",
    ) -> None:
        super().__init__(
            sets,
            metadata,
            seed=seed,
            global_batch_size=global_batch_size,
            epochs_per_iter=epochs_per_iter,
            max_demos=max_demos,
            max_groups=max_groups,
            target_policy=target_policy,
        )
        if batch_fill not in BATCH_FILLS:
            raise ConfigError(
                f"batch_fill must be one of {', '.join(BATCH_FILLS)}, got {batch_fill!r}"
            )
        self.batch_fill = batch_fill
        # Queries per puzzle of each group, when no draw changes it (ARC: augmented copies).
        self._group_counts = [queries.constant_group_counts() for queries in self.queries]
        self._counts: dict[tuple[int, int], int] = {}

    def visits(
        self, set_index: int, counter: int, *, order: bool = True
    ) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        """``batch_fill=continue``'s draws of one iteration, up to ``CHUNK_EPOCHS`` epochs at a
        time.

        Yields, for the chunk's n epochs, the group order (``order``), int64 [n, G] with row e
        the permutation of epoch e, else None; and the puzzle picked for each group in each
        epoch, int64 [n, G] indexed by group. Picks are drawn per group, not per visit, so that
        counting items needs no permutation.
        """
        queries = self.queries[set_index]
        order_rng = np.random.Generator(np.random.Philox(seed=self.seed + counter))
        groups, num = queries.group_indices, queries.num_groups
        for chunk, first_epoch in enumerate(range(0, self.epochs_per_iter, CHUNK_EPOCHS)):
            epochs = min(CHUNK_EPOCHS, self.epochs_per_iter - first_epoch)
            visited = None
            if order:
                visited = _epoch_orders(order_rng, num, epochs).reshape(epochs, num)
            # Uniform over each group's puzzles: floor(u * size) for u in [0, 1), clamped against
            # rounding up; one double per pick is several times cheaper than bounded integers.
            u = _philox(self.seed + counter, chunk).random((epochs, num))
            sizes = np.diff(groups)
            offsets = np.minimum((u * sizes).astype(np.int64), sizes - 1)
            yield visited, groups[:-1] + offsets

    def visit_picks(self, set_index: int, counter: int) -> tuple[np.ndarray, np.ndarray]:
        """``batch_fill=continue``'s visited groups and picked puzzles of one iteration in visit
        order, int64 [V]."""
        groups, picks = [], []
        for order, by_group in self.visits(set_index, counter):
            assert order is not None
            groups.append(order.ravel())
            picks.append(np.take_along_axis(by_group, order, axis=1).ravel())
        return np.concatenate(groups), np.concatenate(picks)

    def etrm_replay(self, set_index: int, counter: int) -> _EtrmReplay:
        """``batch_fill=etrm``'s draws of one iteration, from its start."""
        queries, gbs = self.queries[set_index], self.global_batch_size
        return _EtrmReplay(queries, self.seed + counter, self.epochs_per_iter, gbs)

    def count_batches(self, set_index: int, counter: int) -> int:
        """Batches of set ``set_index`` for ``counter``, without building its plan."""
        counts = self._group_counts[set_index]
        if self.batch_fill == "continue" and counts is not None:
            return int(counts.sum()) * self.epochs_per_iter // self.global_batch_size
        key = (set_index, counter)
        if key not in self._counts:
            if self.batch_fill == "continue":
                count = self.queries[set_index].count
                visits = self.visits(set_index, counter, order=False)
                items = sum(int(count[p].sum()) for _, p in visits)
                self._counts[key] = items // self.global_batch_size
            elif counts is not None:
                # Every puzzle of a group has as many queries: the group order alone decides.
                rng = np.random.Generator(np.random.Philox(seed=self.seed + counter))
                order = _epoch_orders(rng, counts.size, self.epochs_per_iter)
                self._counts[key] = _trimmed_batches(counts[order], self.global_batch_size)
            else:
                replay = self.etrm_replay(set_index, counter)
                self._counts[key] = sum(1 for _ in iter(replay.next_batch, None))
        return self._counts[key]

    def plan(self, set_index: int, counter: int) -> _TrainPlan:
        queries, gbs = self.queries[set_index], self.global_batch_size
        kind = _ContinuedPlan if self.batch_fill == "continue" else _TrimmedPlan
        return kind(queries, gbs, self, set_index, counter)

    def total_steps(self, epochs: int) -> int:
        """Exactly the batches of ``epochs // epochs_per_iter`` iterations, every set.

        ``epochs`` must be a multiple of ``epochs_per_iter``: the training loop runs whole
        iterations.
        """
        if epochs % self.epochs_per_iter:
            raise DataError(
                f"epochs {epochs} is not a multiple of the {self.epochs_per_iter} epochs per "
                "iteration; change epochs or eval_interval"
            )
        return sum(
            self.count_batches(s, self.set_counter(self.iteration_counter(i), s))
            for i in range(epochs // self.epochs_per_iter)
            for s in range(len(self.sets))
        )

    def queries_per_epoch(self) -> float:
        """Expected items of one epoch, all sets: each group adds its puzzles' mean queries."""
        total = 0.0
        for queries in self.queries:
            if queries.num_groups:
                starts = queries.group_indices[:-1]
                sums = np.add.reduceat(queries.count, starts).astype(np.float64)
                total += float((sums / np.diff(queries.group_indices)).sum())
        return total


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@SAMPLERS.register("few_shot_eval")
class FewShotEvalSampler(DemoSampler):
    """ETRM's evaluation sampling: every test-pair query of the kept groups once, in order.

    Every iteration is the same pass; ``seed`` and ``epochs_per_iter`` are not used, and the
    queries are always the test pairs (``target_policy`` is a training option).
    """

    counter_step = 0

    def __init__(
        self,
        sets: Sequence[SetData],
        metadata: PuzzleDatasetMetadata,
        *,
        seed: int,
        global_batch_size: int,
        epochs_per_iter: int,
        max_demos: int = DEFAULT_MAX_DEMOS,
        max_groups: int | None = None,
    ) -> None:
        super().__init__(
            sets,
            metadata,
            seed=seed,
            global_batch_size=global_batch_size,
            epochs_per_iter=epochs_per_iter,
            max_demos=max_demos,
            max_groups=max_groups,
        )
        self._plans = []
        for queries in self.queries:
            starts = np.concatenate([[0], np.cumsum(queries.count)])
            puzzles = np.repeat(np.arange(queries.count.size, dtype=np.int64), queries.count)
            query = np.arange(puzzles.size) - starts[puzzles]
            self._plans.append(_ArrayPlan(queries, global_batch_size, puzzles, query))

    def plan(self, set_index: int, counter: int) -> _ArrayPlan:
        return self._plans[set_index]

    def total_steps(self, epochs: int) -> int:
        """Exactly the windows of ``epochs`` passes."""
        return epochs * self.num_batches(0)
