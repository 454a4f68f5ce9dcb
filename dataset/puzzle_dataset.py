"""Upstream's ``PuzzleDataset``: a reader, a sampler and a collator, validated and resumable.

* ``dataset.reader.PuzzleReader`` reads and validates the two layouts and merges several
  ``dataset_paths`` (disjoint puzzle identifiers, path k's sets named ``<set><k>``).
* ``dataset.sampling.SAMPLERS`` plans which examples form each global batch: ``uniform``
  (upstream ``puzzle_dataset.py``, ``PuzzleDataset._iter_train``) for training and
  ``sequential`` (``PuzzleDataset._iter_test``) for ``test_set_mode``, unless ``sampler`` names
  another one (``few_shot`` and ``few_shot_eval`` of ``dataset.few_shot`` also choose each
  row's demonstrations, with ``sampler_options`` such as ``max_demos``).
* ``dataset.collate.Collator`` builds the requested ``fields`` for this rank's slice.

Position: ``state_dict()`` records upstream's iteration counter and how many batches of the
current iteration this object has yielded, so a new dataset given ``load_state_dict(state)``
continues with exactly the batches the original iterator would have produced next.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import IterableDataset, get_worker_info

from dataset.collate import DEFAULT_FIELDS, Collator, resolve_fields
from dataset.common import IGNORE_LABEL_ID, DataError
from dataset.reader import PuzzleReader
from dataset.sampling import SAMPLERS, SetPlan
from utils.schema import ConfigError

__all__ = ["IGNORE_LABEL_ID", "STATE_VERSION", "PuzzleDataset", "PuzzleDatasetConfig"]

STATE_VERSION = 1
# State-dict fields that must match the loading dataset for a position to mean the same batches.
_STATE_CONFIG_FIELDS = ("seed", "global_batch_size", "epochs_per_iter", "test_set_mode")


class PuzzleDatasetConfig(BaseModel):
    """Upstream's loader config; ``epochs_per_iter`` epochs are batched into one iteration.

    ``sampler`` names an entry of ``dataset.sampling.SAMPLERS``; ``None`` is the mode's own,
    ``uniform`` for training and ``sequential`` for ``test_set_mode``. ``sampler_options`` are
    keyword arguments of that sampler (the few-shot samplers': ``max_demos``, ``max_groups``,
    ``target_policy``). ``fields`` names the batch fields (entries of
    ``dataset.collate.BATCH_FIELDS``) the model reads.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(ge=0)
    dataset_paths: list[str] = Field(min_length=1)
    global_batch_size: int = Field(gt=0)
    test_set_mode: bool
    epochs_per_iter: int = Field(gt=0)
    rank: int = Field(default=0, ge=0)
    num_replicas: int = Field(default=1, gt=0)
    sampler: str | None = None
    sampler_options: dict[str, int | str | None] = Field(default_factory=dict)
    fields: list[str] = Field(default_factory=lambda: list(DEFAULT_FIELDS), min_length=1)

    @model_validator(mode="after")
    def _check_replicas(self) -> PuzzleDatasetConfig:
        if self.rank >= self.num_replicas:
            raise DataError(f"rank {self.rank} must be < num_replicas {self.num_replicas}")
        if self.global_batch_size % self.num_replicas != 0:
            raise DataError(
                f"global_batch_size {self.global_batch_size} must be a multiple of num_replicas "
                f"{self.num_replicas} (the world size); change global_batch_size"
            )
        return self


def _check_sampler_options(name: str, sampler_cls: type, options: Mapping[str, Any]) -> None:
    """Refuse, before any file is read, an option the sampler does not take (one line)."""
    parameters = inspect.signature(sampler_cls).parameters
    shared = {"sets", "metadata", "seed", "global_batch_size", "epochs_per_iter"}
    own = [p for p in parameters if p not in shared]
    unknown = [key for key in options if key not in own]
    if unknown:
        raise ConfigError(
            f"sampler '{name}' has no option {', '.join(repr(k) for k in unknown)}; its options: "
            f"{', '.join(own) or 'none'}"
        )


@dataclass(frozen=True)
class _Position:
    """Where the next batch comes from.

    ``iters`` is the counter before the iteration started; set ``set_index`` of that iteration
    uses counter ``iters + (set_index + 1) * counter_step`` and ``batches_done`` of its batches
    are already out.
    """

    iters: int
    set_index: int
    batches_done: int


class PuzzleDataset(IterableDataset):
    """Iterable over ``(set_name, batch, global_effective_batch_size)``.

    With the default ``fields``, ``batch`` maps ``"inputs"`` and ``"labels"`` to int32
    ``[local_batch_size, seq_len]`` and ``"puzzle_identifiers"`` to int32 ``[local_batch_size]``
    tensors, where ``local_batch_size = global_batch_size // num_replicas``. Labels equal to
    ``ignore_label_id`` are -100; rows past the real ones are padding (``pad_id`` inputs, -100
    labels, ``blank_identifier_id``).

    Train mode (``uniform``): each ``__iter__`` is one iteration of ``epochs_per_iter`` epochs;
    an epoch visits every group once (random order) and adds all examples of one random puzzle
    of the group. Every batch is full (``global_effective_batch_size == global_batch_size``);
    the last short one is dropped. Test mode (``sequential``): every example once, in order, in
    windows of ``global_batch_size`` (``global_effective_batch_size`` = the window's size).

    Built datasets are validated when the dataset is built (see ``PuzzleReader``); every
    gathered batch is range-checked too, so a bad token id never reaches the model.

    The position in ``state_dict()`` counts batches yielded by this object. A training loop
    that prefetches through DataLoader workers iterates a copy in the worker, so it must count
    the batches it consumed itself and store ``state_at(iterations, batches)``. A fresh ``__iter__``
    starts a new iteration (train) or the first batch (test), as upstream; only the first
    ``__iter__`` after ``load_state_dict`` resumes mid-iteration. Use one iterator at a time.
    Pickling (one DataLoader worker) leaves opened memory maps behind.
    """

    def __init__(self, config: PuzzleDatasetConfig, split: str = "train") -> None:
        super().__init__()
        # Re-validate: a config mutated after construction must not slip through.
        self.config = PuzzleDatasetConfig.model_validate(config.model_dump())
        self.split = split
        self.local_batch_size = self.config.global_batch_size // self.config.num_replicas
        self._default_sampler = "sequential" if self.config.test_set_mode else "uniform"
        # Fail on a bad name before reading any file.
        try:
            self.sampler_name = SAMPLERS.canonical(self.config.sampler or self._default_sampler)
        except ValueError as e:
            raise ConfigError(f"sampler: {e}") from None
        sampler_cls = SAMPLERS.get(self.sampler_name)
        _check_sampler_options(self.sampler_name, sampler_cls, self.config.sampler_options)
        resolve_fields(self.config.fields)
        self.reader = PuzzleReader(self.config.dataset_paths, split)
        self.collator = Collator(
            self.reader,
            local_batch_size=self.local_batch_size,
            rank=self.config.rank,
            fields=self.config.fields,
        )
        self.sampler = sampler_cls(
            self.reader.sets,
            self.reader.metadata,
            seed=self.config.seed,
            global_batch_size=self.config.global_batch_size,
            epochs_per_iter=self.config.epochs_per_iter,
            **self.config.sampler_options,
        )
        self._sets = self.reader.sets
        self.metadata = self.reader.metadata
        self.metadata_per_path = self.reader.metadata_per_path
        self.identifier_offsets = self.reader.identifier_offsets

        self._iters = 0  # upstream's counter: +1 per set per train iteration
        self._position = _Position(0, 0, 0)
        self._pending: _Position | None = None

    # ------------------------------------------------------------------------------------------
    # Batches
    # ------------------------------------------------------------------------------------------
    def _iterate(
        self, resume: _Position | None
    ) -> Iterator[tuple[str, dict[str, torch.Tensor], int]]:
        base = resume.iters if resume is not None else self._iters
        first_set = resume.set_index if resume is not None else 0
        skip = resume.batches_done if resume is not None else 0
        n_sets = len(self._sets)
        step = self.sampler.counter_step
        self._position = _Position(base, first_set, skip)
        plans: dict[int, SetPlan] = {}

        def plan(s: int) -> SetPlan:
            if s not in plans:
                plans[s] = self.sampler.plan(s, self.sampler.set_counter(base, s))
            return plans[s]

        for s in range(first_set, n_sets):
            self._iters = self.sampler.set_counter(base, s)  # upstream: _iters += 1 per set
            set_plan = plan(s)
            for b in range(skip if s == first_set else 0, set_plan.num_batches):
                rows = set_plan.batch(b)
                batch = self.collator(self._sets[s], rows)
                # Record the position after this batch before handing it out: a checkpoint may be
                # taken while the generator waits at the yield.
                self._position = self._position_after(base, s, b + 1, lambda t: plan(t).num_batches)
                yield self._sets[s].name, batch, rows.global_effective_batch_size
            plans.pop(s, None)
        self._iters = base + n_sets * step
        self._position = _Position(base + n_sets * step, 0, 0)

    def _position_after(
        self, iters: int, set_index: int, batches_done: int, num_batches: Callable[[int], int]
    ) -> _Position:
        """The position once ``batches_done`` batches of set ``set_index`` are out.

        ``num_batches(t)`` counts set t's batches in this iteration. A finished set moves on to
        the next set with batches; when none is left the iteration counts as finished, so that a
        resumed loop's next ``__iter__`` starts a whole new iteration instead of an empty one.
        """
        if batches_done < num_batches(set_index):
            return _Position(iters, set_index, batches_done)
        for t in range(set_index + 1, len(self._sets)):
            if num_batches(t):
                return _Position(iters, t, 0)
        return _Position(iters + len(self._sets) * self.sampler.counter_step, 0, 0)

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor], int]]:
        worker_info = get_worker_info()
        if worker_info is not None and worker_info.num_workers > 1:
            raise RuntimeError(
                f"PuzzleDataset supports at most one DataLoader worker, got "
                f"{worker_info.num_workers}; set num_workers to 0 or 1"
            )
        resume, self._pending = self._pending, None
        return self._iterate(resume)

    def num_batches(self, iteration: int = 0) -> int:
        """Batches (per rank, the same on every rank) of iteration ``iteration`` (0-based).

        Train mode: random, because the picked variants differ in size; test mode: the same
        for every iteration. Costs one sampling plan per set.
        """
        return self.sampler.num_batches(iteration)

    def total_steps(self, epochs: int) -> int:
        """Global batches of a run of ``epochs`` epochs, as the sampler counts them.

        The length of the training loop's lr schedule; for ``uniform`` upstream's
        ``int(epochs * total_groups * mean_puzzle_examples / global_batch_size)``.
        """
        return self.sampler.total_steps(epochs)

    # ------------------------------------------------------------------------------------------
    # Position
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch this object yielded (plain ints, strs and lists)."""
        return self._state(self._pending if self._pending is not None else self._position)

    def _identity(self) -> dict[str, Any]:
        """What a state must agree on; ``sampler`` only when not the mode's own and
        ``sampler_options`` only when given (format v1)."""
        identity = {field: getattr(self.config, field) for field in _STATE_CONFIG_FIELDS}
        if self.sampler_name != self._default_sampler:
            identity["sampler"] = self.sampler_name
        if self.config.sampler_options:
            identity["sampler_options"] = dict(sorted(self.config.sampler_options.items()))
        identity["sets"] = [s.name for s in self._sets]
        return identity

    def _state(self, position: _Position) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "iters": position.iters,
            "set_index": position.set_index,
            "batches_done": position.batches_done,
        }

    def _batch_counter(self, iteration: int) -> tuple[int, Callable[[int], int]]:
        """Counter before ``iteration`` (0-based, from a fresh dataset) and batches per set."""
        if self.sampler.counter_step:
            base = self.sampler.iteration_counter(iteration)
        else:
            base = self._iters
        counts: dict[int, int] = {}

        def count(t: int) -> int:
            if t not in counts:
                counts[t] = self.sampler.plan(t, self.sampler.set_counter(base, t)).num_batches
            return counts[t]

        return base, count

    def state_at(self, iterations: int, batches: int) -> dict[str, Any]:
        """The ``state_dict()`` of a fresh dataset with this configuration after ``iterations``
        whole iterations and ``batches`` batches of the next one.

        For training loops that iterate a copy in a DataLoader worker and count consumed batches
        themselves (``iterations`` is ignored in test mode).
        """
        if iterations < 0 or batches < 0:
            raise DataError(f"iterations {iterations} and batches {batches} must be >= 0")
        base, count = self._batch_counter(iterations)
        position = _Position(base, 0, 0)
        remaining = batches
        for t in range(len(self._sets)):
            if remaining <= count(t):
                if remaining > 0:
                    position = self._position_after(base, t, remaining, count)
                remaining = 0
                break
            remaining -= count(t)
        if remaining > 0:
            raise DataError(
                f"iteration {iterations} has only {batches - remaining} batches, not {batches}"
            )
        return self._state(position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``__iter__`` continue where the dataset that saved ``state`` stood.

        ``rank``, ``num_replicas`` and ``fields`` may differ: the global batches stay the same.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"dataset state version {state.get('version')!r} is not {STATE_VERSION}; "
                "it was saved by an incompatible PuzzleDataset"
            )
        saved = {**state, "sampler": state.get("sampler", self._default_sampler)}
        # A state saved with sampler options does not load into a dataset without any.
        expected = {"sampler_options": None, **self._identity(), "sampler": self.sampler_name}
        for field, value in expected.items():
            if saved.get(field) != value:
                raise DataError(
                    f"dataset state has {field}={saved.get(field)!r} but this dataset has "
                    f"{value!r}; resume with the configuration the state was saved with"
                )
        position = _Position(
            int(state["iters"]), int(state["set_index"]), int(state["batches_done"])
        )
        if position.iters < 0 or not 0 <= position.set_index <= len(self._sets):
            raise DataError(f"dataset state position {position} is out of range")
        if position.batches_done < 0:
            raise DataError(f"dataset state position {position} is out of range")
        self._iters = position.iters
        self._position = position
        self._pending = position
