"""The evaluator protocol, the evaluator registry and ``build_evaluators``.

An evaluator watches every batch of an evaluation and turns what it saw into metrics. The eval
loop collects ``required_outputs`` (keys of the batch and of the model outputs), calls
``begin_eval()`` once, ``update_batch`` per batch, then ``result`` on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from pydantic import Field
from torch import Tensor

from utils.config import validate_model
from utils.registry import Registry
from utils.schema import StrictModel


class EvaluatorConfig(StrictModel):
    """Base of every evaluator schema; ``name`` is canonical after validation."""

    name: str = Field(description="evaluator (arc)")


EVALUATOR_CONFIGS: Registry[type[EvaluatorConfig]] = Registry(
    "evaluator", modules=["evaluators.arc"]
)


@runtime_checkable
class Evaluator(Protocol):
    """What the eval loop needs from an evaluator.

    ``required_outputs``: keys the loop must hand over, from the batch (``inputs``,
    ``puzzle_identifiers``, ...) and from the model outputs (``preds`` [B, S],
    ``q_halt_logits`` [B], ...).
    """

    required_outputs: set[str]

    def begin_eval(self) -> None:
        """Called once before the first batch of an evaluation."""
        ...

    def update_batch(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        """Record one batch: ``batch`` as the loader yields it (any device), ``outputs`` the
        detached model outputs for the same rows (``preds`` [B, S], ``q_halt_logits`` [B])."""
        ...

    def result(self, save_path: str | None, *, group: Any = None) -> dict[str, float] | None:
        """Metrics on rank 0, None on other ranks. Collective: every rank must call it.

        ``save_path``: folder for files the evaluator writes (rank 0), or None to write none.
        ``group``: process group for the object gather (a gloo group when the default one is
        NCCL); None means the default group.
        """
        ...


EvaluatorFactory = Callable[[Any, list[str], list[int]], Evaluator]

EVALUATORS: Registry[EvaluatorFactory] = Registry("evaluator", modules=["evaluators.arc"])


def build_evaluators(
    configs: list[EvaluatorConfig], data_paths: list[str], identifier_offsets: list[int]
) -> list[Evaluator]:
    """One evaluator per config, in order.

    ``data_paths`` are the evaluation dataset folders and ``identifier_offsets[k]`` the offset
    added to path k's puzzle identifiers by the loader (``PuzzleDataset.identifier_offsets``).
    A config that is not yet of its evaluator's schema (a bare ``EvaluatorConfig``) is
    validated against it first.
    """
    if len(data_paths) != len(identifier_offsets):
        raise ValueError(
            f"got {len(data_paths)} data paths but {len(identifier_offsets)} identifier offsets; "
            "pass PuzzleDataset.identifier_offsets for the same dataset_paths"
        )
    evaluators = []
    for config in configs:
        name = EVALUATOR_CONFIGS.canonical(config.name)
        schema = EVALUATOR_CONFIGS.get(name)
        if not isinstance(config, schema):
            config = validate_model(schema, {**config.model_dump(), "name": name})
        evaluators.append(EVALUATORS.get(name)(config, list(data_paths), list(identifier_offsets)))
    return evaluators
