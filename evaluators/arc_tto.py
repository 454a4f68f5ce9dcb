"""ARC scoring of test-time latent search: each row's ranked attempts voted over augmentations.

With ``tto.steps > 0`` (``evaluate.py``) every evaluation row (one augmented variant of one test
pair) is also searched (``training.latent_search.search``), which gives A ranked predictions:
the query decoded under the best and the second-best distinct latent by demo log-likelihood,
with those log-likelihoods (``attempt_preds`` [B, A, S], ``attempt_demo_loglik`` [B, A]).
Grids are cropped and mapped back to the task's frame exactly as ``evaluators.arc.ARC`` does.

The voting rule, per (task, test pair):

1. Pool r (r = 1..A) holds the rows' rank-r predictions. Within a pool, distinct grids are ranked
   by votes (rows that predicted them), then by the sum of those rows' demo log-likelihoods
   (higher first; at equal votes this is the mean), then by grid hash (exact ties, so that the
   order does not depend on how rows were spread over ranks).
2. Attempt 1 is pool 1's first grid. Attempt 2 is pool 2's best grid other than attempt 1; when
   pool 2 has none, it is pool 1's runner-up. The full order (for pass@K with K > 2) is: pool 1's
   first grid, then pool 2's, ..., pool A's grids in their order, then pool 1's remaining ones,
   each grid at its first place only.
3. A pair is solved at pass@K when its label is among the first K; task scores, averages,
   ``tasks_evaluated`` and the fallback grid for a pair without predictions are the ARC
   evaluator's (``evaluators.arc.score_and_submit``).

So augmentation voting decides within each rank, and the search's likelihood decides between
grids with equal votes; the second attempt is where the second-best latent gets its say.

Metrics are ``ARC-tto/pass@K``, ``ARC-tto/tasks_evaluated``, ``ARC-tto/tasks_total``,
``ARC-tto/pairs_without_predictions`` and ``ARC-tto/aggregated_evals``, beside the plain
evaluator's unchanged ``ARC/...`` of the same run. Under search, ``submission.json`` is this
evaluator's and the plain one is written to ``submission_no_tto.json``
(``NO_SEARCH_SUBMISSION``); without search nothing here runs and ``submission.json`` is the
plain one, as before.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dataset.common import DataError
from evaluators.arc import (
    ARC,
    CANVAS,
    ARCEvaluatorConfig,
    score_and_submit,
)
from evaluators.base import EVALUATOR_CONFIGS, Evaluator, EvaluatorConfig
from utils.distributed import gather_objects

PREFIX = "ARC-tto"
NO_SEARCH_SUBMISSION = "submission_no_tto.json"

# votes[task][input hash][rank][pred hash] = demo log-likelihood of every row that predicted it
Votes = dict[str, dict[str, dict[int, dict[str, list[float]]]]]


class ARCSearch(ARC):
    """The ARC evaluator for search attempts (the module docstring's rule).

    Same construction as ``ARC``; ``update_batch`` reads ``attempt_preds`` [B, A, 900] tokens
    and ``attempt_demo_loglik`` [B, A] from the outputs, ``inputs`` [B, 900] and
    ``puzzle_identifiers`` [B] from the batch (blank rows and rows of demonstration pairs are
    ignored, as in ``ARC``).
    """

    submission_file = "submission.json"

    def __init__(
        self, config: ARCEvaluatorConfig, data_paths: list[str], identifier_offsets: list[int]
    ) -> None:
        super().__init__(config, data_paths, identifier_offsets)
        self.required_outputs = {
            "inputs",
            "puzzle_identifiers",
            "attempt_preds",
            "attempt_demo_loglik",
        }
        self._search_votes: Votes = {}

    def begin_eval(self) -> None:
        """Start an evaluation; votes are cleared only when ``aggregated_voting`` is False."""
        if not self.config.aggregated_voting:
            self._search_votes, self._grids, self._evals = {}, {}, 0
        self._evals += 1

    def update_batch(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        """Record every row's ranked attempts as votes in their rank's pool."""
        merged = {**batch, **outputs}
        missing = self.required_outputs - merged.keys()
        if missing:
            raise KeyError(f"ARC-tto evaluator needs {sorted(missing)} in the batch or outputs")
        ids = merged["puzzle_identifiers"].detach().cpu().numpy()
        inputs = merged["inputs"].detach().cpu().numpy()
        preds = merged["attempt_preds"].detach().cpu().numpy()
        loglik = merged["attempt_demo_loglik"].detach().to("cpu", torch.float64).numpy()
        B = len(ids)
        if inputs.shape != (B, CANVAS * CANVAS) or preds.ndim != 3 or preds.shape[0] != B:
            raise DataError(
                f"ARC-tto evaluator: inputs must be [{B}, {CANVAS * CANVAS}] and attempt_preds "
                f"[{B}, A, {CANVAS * CANVAS}], got {list(inputs.shape)} and {list(preds.shape)}"
            )
        A = preds.shape[1]
        if preds.shape[2] != CANVAS * CANVAS or loglik.shape != (B, A):
            raise DataError(
                f"ARC-tto evaluator: attempt_preds must be [{B}, {A}, {CANVAS * CANVAS}] and "
                f"attempt_demo_loglik [{B}, {A}], got {list(preds.shape)} and "
                f"{list(loglik.shape)}"
            )
        for row, task, input_hash, pred_hashes in self._test_rows(ids, inputs, preds):
            pools = self._search_votes.setdefault(task, {}).setdefault(input_hash, {})
            for a, pred_hash in enumerate(pred_hashes):
                # A non-finite likelihood (a row the search could not score) ranks last.
                value = float(loglik[row, a]) if math.isfinite(loglik[row, a]) else -math.inf
                pools.setdefault(a, {}).setdefault(pred_hash, []).append(value)

    def result(self, save_path: str | None, *, group: Any = None) -> dict[str, float] | None:
        """Gather every rank's votes to rank 0 and score them (collective); ``ARC-tto/...``
        metrics on rank 0, None elsewhere. With ``save_path``, rank 0 writes
        ``save_path/<submission_file>``."""
        gathered = gather_objects((self._grids, self._search_votes), dst=0, group=group)
        if gathered is None:
            return None
        grids: dict[str, np.ndarray] = {}
        votes: Votes = {}
        for rank_grids, rank_votes in gathered:
            for h, grid in rank_grids.items():
                grids.setdefault(h, grid)
            for task, by_input in rank_votes.items():
                for input_hash, pools in by_input.items():
                    merged = votes.setdefault(task, {}).setdefault(input_hash, {})
                    for a, candidates in pools.items():
                        pool = merged.setdefault(a, {})
                        for pred_hash, values in candidates.items():
                            pool.setdefault(pred_hash, []).extend(values)
        ranked = {
            task: {input_hash: attempt_order(pools) for input_hash, pools in by_input.items()}
            for task, by_input in votes.items()
        }
        return score_and_submit(
            self._pairs, ranked, grids, self.config, save_path, self.submission_file, PREFIX,
            self._evals,
        )  # fmt: skip


def rank_pool(candidates: dict[str, list[float]]) -> list[str]:
    """One pool's grid hashes by votes, then summed demo log-likelihood, descending; exact
    ties by hash."""
    # Values are finite or -inf (never +inf), so fsum cannot meet inf - inf.
    stats = [(-len(values), -math.fsum(values), h) for h, values in candidates.items()]
    return [h for *_, h in sorted(stats)]


def attempt_order(pools: dict[int, dict[str, list[float]]]) -> list[str]:
    """The ranked attempts of one test pair from its rank pools (``pools[r]``, r = 0 first):
    pool 0's best, then every later pool's grids in pool order, then pool 0's rest, each grid
    once."""
    ranked = {r: rank_pool(c) for r, c in pools.items()}
    first = ranked.get(0, [])
    sequence = first[:1] + [h for r in sorted(ranked) if r > 0 for h in ranked[r]] + first[1:]
    return list(dict.fromkeys(sequence))


def build_search_evaluators(
    configs: list[EvaluatorConfig], data_paths: list[str], identifier_offsets: list[int]
) -> list[Evaluator]:
    """An ``ARCSearch`` for every ARC evaluator among ``configs`` (with its options); other
    evaluators have no search counterpart."""
    out: list[Evaluator] = []
    for config in configs:
        if EVALUATOR_CONFIGS.canonical(config.name) != "arc":
            continue
        if not isinstance(config, ARCEvaluatorConfig):
            config = ARCEvaluatorConfig(**{**config.model_dump(), "name": "arc"})
        out.append(ARCSearch(config, list(data_paths), list(identifier_offsets)))
    return out
