"""Test-time search on truly unseen tasks: searching on a task's own demos raises its held-out
exact accuracy above what the same weights get without search.

The tasks are ``dataset.synthetic_tasks``' colour substitutions (every cell of colour A becomes
B; each task its own rule), built with the strict split on a 4 × 4 canvas as in
``tests/test_icl.py`` (``benchmarks.icl``'s harness); the models train for 150 steps instead of
its 250. Each is then evaluated once on the evaluation tasks, which no run trained on, with
search (``benchmarks.latent_search.search_arch``: 20 Adam steps of lr 0.1, clip 1, one ACT step
per demo, as evaluation runs): exact accuracy without search, with the first attempt, with
either of the two.

TRM: its evaluation tasks' puzzle-embedding rows were never trained, so
without search it is a demo-free model, held to ``demo_free_bound`` (5/108); the search
optimises a fresh row on the task's two demos (test-time training of the embedding alone).
Measured with ``python -m benchmarks.latent_search --archs trm --train-steps 150
--search-steps 20`` over seeds 0-4 (2 loaded CPU cores): without search 0.00 for every seed;
with search 0.66, 0.34, 0.55, 0.62, 0.63 (first attempt), 0.66, 0.34, 0.55, 0.64, 0.65 (either
attempt). ``TRM_MARGIN`` sits 0.14 below the worst seed.

ETRM: the search moves the encoder's context with leave-one-out. Over seeds 0-4 the
exact accuracy without search was 0.18, 0.30, 0.62, 0.66, 0.29 and with it 0.50, 0.48, 0.53,
0.42, 0.23: the search helps the weaker models and hurts the stronger ones on this family
(with lr 0.03 and without leave-one-out: 0.50, 0.75, 0.72, 0.59 on seeds 0-3). So only seed 0's
gain (+0.32) is asserted, with ``ETRM_MARGIN`` 0.17 below it: a check that the search still
reaches the query through the encoder's context, not a claim that it always helps ETRM.
Both tests together take about 40 s on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.icl import IclSettings, build_family_data
from benchmarks.latent_search import SearchSettings, search_arch
from tests.test_icl import binomial_slack
from training.latent_search import TTOConfig

SETTINGS = SearchSettings(
    icl=IclSettings(steps=150),
    tto=TTOConfig(steps=20, lr=0.1, optimizer="adam", count_flops=False),
    timing_steps=(),
    finetune_steps=0,  # the fine-tuning baseline is tests/test_benchmarks_latent_search.py's
)
TRM_MARGIN = 0.20
ETRM_MARGIN = 0.15
SEED = 0


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread, as tests/test_icl.py: a pool of two on a busy 2-core machine spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, Path]:
    """(the built family, its demo-free bound, a folder for runs) for SEED."""
    root = tmp_path_factory.mktemp("search_icl")
    data, bound = build_family_data(root / "data", SETTINGS.icl, SEED)
    return data, bound, root


def test_trms_fresh_embedding_search_solves_unseen_tasks(family: tuple[Path, float, Path]) -> None:
    data, bound, root = family
    figures = search_arch("trm", data, root / "trm", SETTINGS, SEED)
    n = int(figures["puzzles"] or 0)
    assert n >= SETTINGS.icl.eval_tasks  # every evaluation task's test pairs, searched
    plain, searched = figures["exact_no_search"], figures["exact_search"]
    assert plain is not None and searched is not None
    # Without search TRM reads nothing of an unseen task: it is held to the demo-free bound.
    assert plain <= bound + binomial_slack(bound, n), figures
    assert searched >= plain + TRM_MARGIN and searched >= bound + TRM_MARGIN, figures
    assert figures["pass@2_search"] >= searched
    assert figures["demo_loglik_best"] > figures["demo_loglik_start"]  # type: ignore[operator]


def test_etrms_context_search_raises_seed_0s_accuracy(family: tuple[Path, float, Path]) -> None:
    data, _, root = family
    figures = search_arch("etrm", data, root / "etrm", SETTINGS, SEED)
    plain, searched = figures["exact_no_search"], figures["exact_search"]
    assert plain is not None and searched is not None
    assert searched >= plain + ETRM_MARGIN, figures
    assert figures["demo_loglik_best"] > figures["demo_loglik_start"]  # type: ignore[operator]
