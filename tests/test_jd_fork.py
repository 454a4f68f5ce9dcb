"""Jacobian descent as the research fork (mattbuot/TinyRecursiveModelsJD) ran it, as options.

Objective scaling by 1/D and the fork's fall-back to the mean, per-rank aggregation, the
puzzle-embedding columns in the Gramian, the fork's objective vectors, per-step puzzle ids of
stacked supervision steps, and the limit on ungrouped objectives.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
from tests.test_jd import DIMS, tiny_batch, tiny_head
from training import jd
from training.objectives import MODES, AggregatorConfig, ObjectiveSpec, mode_spec

Objectives = Callable[[object], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# The fork's objective vectors (``utils/torchjd_utils.py``, ``aggregate_losses``), re-derived
# ----------------------------------------------------------------------------------------------
def fork_objectives(
    mode: str, lm: list[torch.Tensor], q: torch.Tensor, internal: list[torch.Tensor], w: float
) -> torch.Tensor:
    """The fork's objective vector from token losses ``lm`` (one [B, L] per supervision step,
    one step outside the stacked modes), halting losses ``q`` [B] and per-cycle losses."""
    B, L = lm[0].shape
    if mode.startswith("stack_supervisions"):
        per_step = [t / len(lm) for t in lm]  # the fork divides each step by halt_max_steps
        return {
            "stack_supervisions": lambda: torch.stack([t.sum() for t in per_step]),
            "stack_supervisions_and_sum": lambda: sum(t.sum() for t in per_step).reshape(1),
            "stack_supervisions_and_iwrm": lambda: torch.stack([t.sum(1) for t in per_step]),
            "stack_supervisions_and_pixelwise": lambda: torch.stack([t.sum(0) for t in per_step]),
            "stack_supervisions_and_iwrm_pixelwise": lambda: torch.stack(per_step),
        }[mode]().flatten()
    (x,) = lm
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "sum": lambda: (x.sum() + q.sum()).reshape(1),
        "lm_loss_vs_q_halt_loss": lambda: torch.stack([x.sum(), q.sum()]),
        "iwrm_with_q_halt_in": lambda: x.sum(1) + q,
        "iwrm_with_q_halt_out": lambda: torch.cat([x.sum(1), q]),
        "pixelwise_q_halt_in": lambda: x.sum(0) + q.sum() / L,
        "pixelwise_q_halt_out": lambda: torch.cat([x.sum(0), q]),
        "iwrm_pixelwise_q_halt_in": lambda: x.reshape(-1) + q.sum() / (B * L),
        "iwrm_pixelwise_q_halt_out": lambda: torch.cat([x.reshape(-1), q]),
        "stack_internal_losses": lambda: (
            torch.stack([x] + [w * t for t in internal]).sum((1, 2)) + q.sum() / (len(internal) + 1)
        ),
        "stack_internal_losses_only": lambda: (
            torch.stack([w * t for t in internal]).sum((1, 2)) + q.sum() / len(internal)
        ),
        # The fork's returns [B, L] here (its backward fails); the scalar it meant.
        "stack_internal_and_sum": lambda: (x.sum() + q.sum() + w * sum(internal).sum()).reshape(1),
    }
    return cases[mode]()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_fork_mode_gives_the_forks_objective_vector(mode: str) -> None:
    """``step_contributions`` summed over samples (and stacked steps) is the fork's vector."""
    spec = mode_spec(mode, intermediate_loss_weight=0.3)
    B, L, H = 3, 5, 2
    S = 4 if spec.supervisions == "stacked" else 1
    C = (0 if spec.internal == "only" else 1) + (H if spec.internal != "none" else 0)
    layout = jd.Layout(spec=spec, S=S, C=C, B=B, P=L, has_halt=True)
    g = torch.Generator().manual_seed(len(mode))
    lm = [torch.rand(B, L, generator=g, dtype=torch.float64) for _ in range(S)]
    q = torch.rand(B, generator=g, dtype=torch.float64)
    internal = [torch.rand(B, L, generator=g, dtype=torch.float64) for _ in range(H)]
    total = sum(
        jd.step_contributions(layout, s, lm[s], q, internal if C > 1 or spec.internal == "only"
                              else None).sum(0)
        for s in range(S)
    )  # fmt: skip
    expected = fork_objectives(mode, lm, q, internal, 0.3)
    assert isinstance(total, torch.Tensor)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)


def test_own_halting_placement_keeps_each_samples_halting_loss_on_its_objectives() -> None:
    """``iwrm_pixelwise_own_q_halt_in``: sample b's halting loss over its own P objectives, so
    each objective belongs to one sample (per-sample Gramians apply); the fork's name spreads
    the batch's sum over all of them, so its objectives are no sample's."""
    x = torch.rand(3, 5, dtype=torch.float64)
    q = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    own = jd.Layout(spec=mode_spec("iwrm_pixelwise_own_q_halt_in"), S=1, C=1, B=3, P=5,
                    has_halt=True)  # fmt: skip
    fork = replace(own, spec=mode_spec("iwrm_pixelwise_q_halt_in"))
    torch.testing.assert_close(
        jd.step_contributions(own, 0, x, q, None).sum(0), (x + q[:, None] / 5).reshape(-1)
    )
    torch.testing.assert_close(
        jd.step_contributions(fork, 0, x, q, None).sum(0), (x + 9.0 / 15).reshape(-1)
    )
    assert own.owned(0, None) is not None and fork.owned(0, None) is None
    with pytest.raises(ValueError, match="halt not 'separate' or 'spread'"):
        mode_spec("iwrm_pixelwise_q_halt_in", method="per_sample")


# ----------------------------------------------------------------------------------------------
# Scaling and the fork's fall-back to the mean
# ----------------------------------------------------------------------------------------------
def test_fork_would_fall_back_on_each_side_of_torchjds_threshold() -> None:
    """trace(G)/D² < 1e-4 is exactly where TorchJD's UPGrad, given the fork's rows g_i/D,
    returns the mean (1/m each) instead of resolving the conflict."""
    from torchjd.aggregation import UPGradWeighting

    J = torch.tensor([[1.0, 0.0], [-0.9, 0.3]], dtype=torch.float64)  # conflicting rows
    G = J @ J.T
    D = 768.0
    for factor, falls_back in ((0.99, True), (1.01, False)):
        # Rescale so that trace(G)/D² is 1e-4 times the factor.
        G_f = G * (factor * 1e-4 * D**2 / float(G.trace()))
        assert jd.fork_would_fall_back(G_f, D) is falls_back
        w = UPGradWeighting()(G_f / D**2)
        assert torch.allclose(w, torch.full((2,), 0.5, dtype=w.dtype), atol=1e-9) is falls_back


def flat_grads(head: torch.nn.Module, emb: torch.Tensor) -> torch.Tensor:
    params = [p for p in head.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return torch.cat([g.reshape(-1) for g in grads] + [emb.grad.reshape(-1)])


def iwrm_halt_out(out: object) -> torch.Tensor:
    """The fork's iwrm_with_q_halt_out: each sample's token loss, then each halting loss."""
    return torch.cat([out.normalized_token_loss.sum(1), out.halt_loss_per_sample])


def fork_update(objectives: Objectives, D: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fork's ``torchjd.backward`` on ``(1/D)·objective``: TorchJD's ``UPGrad()`` of the
    Jacobian over every leaf (the weights and the puzzle-embedding rows), computed here by one
    ``autograd.grad`` per objective; and that Jacobian, unscaled."""
    from torchjd.aggregation import UPGrad

    head = tiny_head(halt_exploration_prob="0")
    batch = tiny_batch()
    torch.manual_seed(100)
    out = head(carry=head.initial_carry(batch), batch=batch)
    leaves = [p for p in head.parameters() if p.requires_grad]
    leaves.append(head.model.inner.puzzle_emb.local_weights)
    values = objectives(out)
    rows = []
    for i in range(values.shape[0]):
        grads = torch.autograd.grad(values[i], leaves, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(x)).reshape(-1)
                 for g, x in zip(grads, leaves, strict=True)]
            )
        )  # fmt: skip
    J = torch.stack(rows)
    return UPGrad()(J / D), J


def seeded_batch(seed: int) -> dict[str, torch.Tensor]:
    """``tiny_batch`` for seed 3; another rank's batch for other seeds."""
    if seed == 3:
        return tiny_batch()
    g = torch.Generator().manual_seed(seed)
    shape = (DIMS.batch_size, DIMS.seq_len)
    return {
        "inputs": torch.randint(0, 6, shape, generator=g, dtype=torch.int32),
        "labels": torch.randint(0, 6, shape, generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(1, 5, (DIMS.batch_size,), generator=g).int(),
    }


def ours(
    spec: ObjectiveSpec,
    D: float,
    aggregator: str = "upgrad",
    batch_seed: int = 3,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, jd.JDResult]:
    """Our update (flat: the weights, then the embedding rows) for one supervision step."""
    head = tiny_head(halt_exploration_prob="0")
    batch = seeded_batch(batch_seed)
    emb = head.model.inner.puzzle_emb.local_weights
    layout = jd.Layout(spec=spec, S=1, C=1, B=DIMS.batch_size, P=DIMS.seq_len, has_halt=True)

    def steps() -> Iterator[torch.Tensor]:
        torch.manual_seed(100)
        out = head(carry=head.initial_carry(batch), batch=batch)
        yield jd.step_contributions(layout, 0, out.normalized_token_loss,
                                    out.halt_loss_per_sample, None)  # fmt: skip

    descent = jd.JacobianDescent(spec, AggregatorConfig(name=aggregator), head, seed=0)
    result = descent.step(steps=steps(), layout=layout,
                          params=[p for p in head.parameters() if p.requires_grad],
                          extra_params=[emb], global_batch_size=int(D), step_index=0,
                          all_reduce=all_reduce)  # fmt: skip
    return flat_grads(head, emb), result


def test_global_batch_scale_is_the_forks_update_and_logs_its_fall_back() -> None:
    """objective.scale=global_batch with the embedding in the Gramian writes exactly the fork's
    UPGrad of the 1/D-scaled Jacobian; with a large D both fall back to the mean, which
    jd/fork_would_fall_back reports in every run (both scales)."""
    fork_mode = mode_spec("iwrm_with_q_halt_out", method="rows", include_puzzle_embedding=True)
    fork_spec = fork_mode.model_copy(update={"scale": "global_batch"})
    D = float(DIMS.batch_size)
    expected, J = fork_update(iwrm_halt_out, D)
    got, result = ours(fork_spec, D)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert result.metrics["jd/cos_to_mean"] < 0.999  # a real conflict, resolved
    assert result.metrics["jd/fork_would_fall_back"] == 0.0 == result.metrics["jd/degenerate"]
    # The unscaled default: the same direction, m/D · Jᵀw instead of (J/D)ᵀw.
    unscaled, r_none = ours(fork_mode, D)
    torch.testing.assert_close(unscaled, 2 * DIMS.batch_size * expected, rtol=1e-4, atol=1e-7)
    assert r_none.metrics["jd/fork_would_fall_back"] == 0.0

    D_big = float(math.ceil(1000 * float(torch.trace(J @ J.T)) ** 0.5))
    assert float(torch.trace(J @ J.T)) / D_big**2 < 1e-4
    expected_big, _ = fork_update(iwrm_halt_out, D_big)
    torch.testing.assert_close(expected_big, J.mean(0) / D_big, rtol=1e-5, atol=1e-10)
    got_big, r_big = ours(fork_spec, D_big)
    torch.testing.assert_close(got_big, expected_big, rtol=1e-4, atol=1e-9)
    assert r_big.metrics["jd/fork_would_fall_back"] == 1.0 == r_big.metrics["jd/degenerate"]
    _, r_none_big = ours(fork_mode, D_big)  # ours resolves the conflict, and says the fork didn't
    assert r_none_big.metrics["jd/fork_would_fall_back"] == 1.0
    assert r_none_big.metrics["jd/degenerate"] == 0.0
    assert r_none_big.metrics["jd/cos_to_mean"] < 0.999


# ----------------------------------------------------------------------------------------------
# The puzzle-embedding columns in the Gramian
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "method"),
    [
        ("iwrm_with_q_halt_out", "rows"),
        ("iwrm_with_q_halt_out", "per_sample"),
        ("stack_supervisions_and_iwrm", "per_sample"),
    ],
)
def test_included_embedding_adds_its_columns_gramian(mode: str, method: str) -> None:
    """G with include_puzzle_embedding = J_dense J_denseᵀ + J_emb J_embᵀ, both blocks from one
    ``autograd.grad`` per objective here (a stacked slot keeping its puzzle: one column)."""
    spec = mode_spec(mode, method=method, include_puzzle_embedding=True)
    head = tiny_head(halt_exploration_prob="0")
    batch = tiny_batch()
    emb = head.model.inner.puzzle_emb.local_weights
    params = [p for p in head.parameters() if p.requires_grad]
    S = 2 if spec.supervisions == "stacked" else 1
    layout = jd.Layout(spec=spec, S=S, C=1, B=DIMS.batch_size, P=DIMS.seq_len, has_halt=True)
    m = layout.m
    J_dense, J_emb = torch.zeros(m, sum(p.numel() for p in params)), torch.zeros(m, emb.numel())
    seen: list[torch.Tensor] = []

    def steps(record: bool) -> Iterator[torch.Tensor]:
        carry = head.initial_carry(batch)
        for s in range(S):
            torch.manual_seed(100 + s)
            out = head(carry=carry, batch=batch)
            carry = out.new_carry
            c = jd.step_contributions(layout, s, out.normalized_token_loss,
                                      out.halt_loss_per_sample, None)  # fmt: skip
            seen.append(head.model.inner.puzzle_emb.local_ids.clone())
            if record:
                obj = c.sum(0)
                for i in range(m):
                    if not obj[i].requires_grad:
                        continue
                    *g, g_emb = torch.autograd.grad(
                        obj[i], [*params, emb], retain_graph=True, allow_unused=True
                    )
                    dense = [x if x is not None else torch.zeros_like(p)
                             for x, p in zip(g, params, strict=True)]  # fmt: skip
                    J_dense[i] += torch.cat([x.reshape(-1) for x in dense])
                    J_emb[i] += g_emb.reshape(-1)
            yield c

    for _ in steps(record=True):
        pass
    assert torch.equal(seen[0], seen[-1])  # this batch's slots keep their puzzles
    seen.clear()
    if method == "rows":
        gram = jd._rows(steps(False), layout, params, [emb], None, False, lambda t: t, True, seen)
    else:
        gram = jd._per_sample(steps(False), layout, params, [emb], None, True, seen)
    expected = J_dense @ J_dense.T + J_emb @ J_emb.T
    torch.testing.assert_close(gram.G, expected, rtol=1e-4, atol=1e-6)
    # The embedding block is small next to the weights' (the table starts at zero): alone.
    G_emb = J_emb @ J_emb.T
    assert float(G_emb.trace()) > 0
    torch.testing.assert_close(gram.G - J_dense @ J_dense.T, G_emb, rtol=1e-2, atol=1e-8)


def test_embedding_gramian_keeps_a_reloaded_slots_puzzles_apart() -> None:
    """Two steps, slot 0 keeps its puzzle (its columns add up), slot 1 reloads (two columns)."""
    X = [torch.randn(3, 2, 4, dtype=torch.float64) for _ in range(2)]
    seen = [torch.tensor([7, 8]), torch.tensor([7, 9])]
    same_puzzle = torch.cat([X[0][:, 0] + X[1][:, 0], X[0][:, 1], X[1][:, 1]], dim=1)
    torch.testing.assert_close(jd.embedding_gramian(X, seen), same_puzzle @ same_puzzle.T)


def test_included_embedding_is_refused_where_the_gramian_cannot_hold_it() -> None:
    with pytest.raises(ValueError, match="include_puzzle_embedding: the puzzle-embedding rows"):
        mode_spec("iwrm_with_q_halt_in", method="autogram", include_puzzle_embedding=True)
    with pytest.raises(ValueError, match="include_puzzle_embedding: the puzzle-embedding rows"):
        mode_spec("lm_loss_vs_q_halt_loss", gramian="heads", include_puzzle_embedding=True)
    head = tiny_head()
    spec = mode_spec("iwrm_with_q_halt_in", include_puzzle_embedding=True)
    with pytest.raises(ValueError, match="aggregator 'config' needs the Jacobian itself"):
        jd.JacobianDescent(spec, AggregatorConfig(name="config"), head, seed=0)
    layout = jd.Layout(spec=spec, S=1, C=1, B=4, P=10, has_halt=True)
    assert jd.JacobianDescent(spec, AggregatorConfig(), head, 0).method(layout) == "per_sample"


# ----------------------------------------------------------------------------------------------
# More objectives than the limit
# ----------------------------------------------------------------------------------------------
def test_too_many_objectives_says_the_memory_and_the_fix_and_the_limit_can_be_raised() -> None:
    spec = mode_spec("stack_supervisions_and_iwrm")
    message = jd.too_many_objectives(spec, 16 * 96, 7_000_000)
    assert message is not None
    assert "1536 objectives here, above objective.max_objectives=512" in message
    assert "(1536 × 7.0M parameters × 4 B = 40.1 GiB)" in message
    assert "objective.groups=k" in message and "raise objective.max_objectives" in message
    assert jd.too_many_objectives(spec.model_copy(update={"max_objectives": 2048}), 1536, 7) is None
    # On the tiny model: 4 samples × 10 pixels = 40 objectives.
    small = mode_spec("iwrm_pixelwise_own_q_halt_in", max_objectives=32, method="per_sample")
    with pytest.raises(ValueError, match=r"40 objectives here, above objective\.max_objectives=32"):
        ours(small, DIMS.batch_size)
    _, result = ours(small.model_copy(update={"max_objectives": 40}), DIMS.batch_size)
    assert result.metrics["jd/num_objectives"] == 40.0


# ----------------------------------------------------------------------------------------------
# Stacked supervision steps: each step's puzzle-embedding rows go to the puzzles it looked up
# ----------------------------------------------------------------------------------------------
def stacked_rows(
    head: torch.nn.Module, halted: list[list[bool]] | None, record: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], CastedSparseEmbeddingSignSGD_Distributed]:
    """Two stacked ``stack_supervisions`` steps on a batch; ``halted[s]`` forces the halting
    flags before step s, the slots starting on a previous batch's puzzles (None: the model's
    flags from a fresh carry, every slot loading the batch, as a stack of the loop starts).
    With ``record`` the rows' gradients are taken by hand, one backward per step (and per-step
    ids returned); otherwise ``jd.step`` with ``EmbeddingRows`` writes them (Mean weighting)."""
    batch = tiny_batch()
    previous = {**batch, "puzzle_identifiers": torch.full_like(batch["puzzle_identifiers"], 4)}
    batch["puzzle_identifiers"] = torch.tensor([1, 2, 3, 1], dtype=torch.int32)
    table = head.model.inner.puzzle_emb
    optimizer = CastedSparseEmbeddingSignSGD_Distributed(table.buffers(), world_size=1, lr=1.0,
                                                         weight_decay=0.0)  # fmt: skip
    carry = head.initial_carry(previous)
    if halted is not None:
        with torch.no_grad():
            carry = head(carry=carry, batch=previous).new_carry
    spec = mode_spec("stack_supervisions", carry_perturbation_rate=0.0)
    layout = jd.Layout(spec=spec, S=2, C=1, B=DIMS.batch_size, P=DIMS.seq_len, has_halt=False)
    emb = jd.EmbeddingRows(table.local_weights, table.local_ids, keep=optimizer.keep_micro_batch)
    grads: list[torch.Tensor] = []

    def steps() -> Iterator[torch.Tensor]:
        nonlocal carry
        for s in range(layout.S):
            if halted is not None:
                carry = replace(carry, halted=torch.tensor(halted[s]))
            torch.manual_seed(100 + s)
            out = head(carry=carry, batch=batch)
            carry = out.new_carry
            emb.seen.append(table.local_ids.clone())
            if record:
                loss = out.normalized_token_loss.sum() / layout.S
                (g,) = torch.autograd.grad(loss, [table.local_weights])
                grads.append(g / DIMS.batch_size)  # Mean weighting: the batch-mean gradient
                continue
            yield jd.step_contributions(layout, s, out.normalized_token_loss, None, None)

    if record:
        for _ in steps():
            pass
        return emb.seen, grads, optimizer
    descent = jd.JacobianDescent(spec, AggregatorConfig(name="mean"), head, seed=0)
    descent.step(steps=steps(), layout=layout,
                 params=[p for p in head.parameters() if p.requires_grad], extra_params=[],
                 global_batch_size=DIMS.batch_size, step_index=0, all_reduce=lambda t: t,
                 embedding=emb)  # fmt: skip
    return emb.seen, [], optimizer


def sign_sgd_by_hand(table: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """w[id] -= sign(Σ of every row gradient looked up with that id), lr 1, no decay."""
    total: dict[int, torch.Tensor] = {}
    for ids, g in pairs:
        for b, i in enumerate(ids.tolist()):
            total[i] = total.get(i, torch.zeros_like(g[b])) + g[b]
    for i, g in total.items():
        table[i] -= torch.sign(g)


def test_a_slot_reloaded_mid_stack_gives_each_puzzle_its_own_gradient() -> None:
    """arch=trm (halting): slot 0 works on the previous batch's puzzle 4 at step 0, halts and
    reloads puzzle 1 at step 1. Puzzle 4 gets step 0's row gradient, puzzle 1 step 1's (with
    slot 3's), by hand; summing both steps onto the last ids (the fork's) would differ."""
    halted = [[False, True, True, True], [True, False, False, False]]
    seen, grads, _ = stacked_rows(tiny_head(halt_exploration_prob="0"), halted, record=True)
    assert seen[0].tolist() == [4, 2, 3, 1] and seen[1].tolist() == [1, 2, 3, 1]
    head = tiny_head(halt_exploration_prob="0")
    got_seen, _, optimizer = stacked_rows(head, halted, record=False)
    assert [t.tolist() for t in got_seen] == [t.tolist() for t in seen]
    table = head.model.inner.puzzle_emb.weights
    expected = torch.zeros_like(table)  # the tiny table starts at zero
    sign_sgd_by_hand(expected, list(zip(seen, grads, strict=True)))
    optimizer.step()
    torch.testing.assert_close(table, expected)
    assert expected[4].abs().sum() > 0  # the puzzle that left mid-stack was trained
    fork = torch.zeros_like(table)
    sign_sgd_by_hand(fork, [(seen[1], grads[0] + grads[1])])
    assert not torch.equal(fork, expected)


def test_trmjd_without_act_keeps_its_puzzles_through_the_stack() -> None:
    """arch=trmjd (no_act): every slot runs the whole stack on one puzzle; the per-step rows
    give the table the same update as one summed gradient on the batch's ids."""
    from models.registry import build_loss_head
    from training.config import load_pretrain_config
    from utils.config import compose

    over = ["arch=trmjd", "+experiment=tiny_cpu", "arch.hidden_size=16", "arch.halt_max_steps=2"]
    arch = load_pretrain_config(compose(overrides=over)).arch
    torch.manual_seed(0)
    head = build_loss_head(arch, DIMS).train()
    seen, grads, _ = stacked_rows(head, None, record=True)
    assert torch.equal(seen[0], seen[1])
    torch.manual_seed(0)
    head = build_loss_head(arch, DIMS).train()
    _, _, optimizer = stacked_rows(head, None, record=False)
    optimizer.step()
    expected = torch.zeros_like(head.model.inner.puzzle_emb.weights)
    sign_sgd_by_hand(expected, [(seen[1], grads[0] + grads[1])])
    torch.testing.assert_close(head.model.inner.puzzle_emb.weights, expected)


# ----------------------------------------------------------------------------------------------
# Shared objectives aggregated per rank (the fork) or on the global Jacobian
# ----------------------------------------------------------------------------------------------
SHARED = mode_spec("pixelwise_q_halt_in", method="rows")  # 10 pixel objectives every rank has


def test_local_aggregation_on_one_rank_is_the_global_one() -> None:
    local, r_local = ours(SHARED.model_copy(update={"ranks": "local"}), 8)
    global_, r_global = ours(SHARED, 8)
    torch.testing.assert_close(local, global_)
    assert r_global.reduced_across_ranks and not r_local.reduced_across_ranks
    assert r_global.metrics["jd/cos_to_mean"] < 0.9999  # the pixels conflict


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    try:
        for ranks in ("local", "global"):
            spec = SHARED.model_copy(update={"ranks": ranks})
            grad, result = ours(spec, 2 * DIMS.batch_size, batch_seed=10 + rank,
                                all_reduce=all_reduce)  # fmt: skip
            # The embedding rows stay on their rank (the sparse optimizer gathers them).
            n_dense = grad.numel() - tiny_head().model.inner.puzzle_emb.local_weights.numel()
            dense = grad[:n_dense].clone()
            if not result.reduced_across_ranks:
                dist.all_reduce(dense)  # the ordinary gradient reduction: SUM
            torch.save(dense, Path(out_dir) / f"{ranks}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 20 s on 2 cores
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_local_aggregation_over_two_ranks_sums_each_ranks_own(tmp_path: Path) -> None:
    """ranks=local over 2 gloo ranks = Σ_r (rank r's aggregation alone); global differs."""
    mp.spawn(_ranks_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    local = [torch.load(tmp_path / f"local_{r}.pt", weights_only=True) for r in range(2)]
    global_ = [torch.load(tmp_path / f"global_{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(local[0], local[1])
    torch.testing.assert_close(global_[0], global_[1])
    alone = [ours(SHARED, 2 * DIMS.batch_size, batch_seed=10 + r)[0] for r in range(2)]
    n_dense = local[0].numel()
    torch.testing.assert_close(local[0], alone[0][:n_dense] + alone[1][:n_dense],
                               rtol=1e-4, atol=1e-8)  # fmt: skip
    assert not torch.allclose(local[0], global_[0], rtol=1e-3, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# UPGrad's weighting: the QPs whose solution is known are skipped
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_screened_projector_gives_torchjds_weights(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default projector returns TorchJD's own quadprog weights; without conflicts it
    solves no QP at all (v = u satisfies the KKT conditions)."""
    import qpsolvers
    from torchjd.aggregation import DualProjWeighting, UPGradWeighting

    reference = {"upgrad": UPGradWeighting, "dualproj": DualProjWeighting}[name]()
    g = torch.Generator().manual_seed(0)
    conflicting = torch.randn(12, 30, generator=g, dtype=torch.float64)
    agreeing = conflicting.abs()  # every pairwise inner product positive
    ours = jd.build_aggregator(AggregatorConfig(name=name), 12)
    for J in (conflicting, agreeing):
        G = J @ J.T
        torch.testing.assert_close(ours(G), reference(G), rtol=1e-6, atol=1e-9)

    def no_solver(*args: object, **kwargs: object) -> None:
        raise AssertionError("a QP was solved")

    monkeypatch.setattr(qpsolvers, "solve_qp", no_solver)
    G = agreeing @ agreeing.T
    assert torch.isfinite(ours(G)).all()  # no QP needed
    # One dominant gradient: the mean (DualProj's start) conflicts with the others too.
    dominated = conflicting * torch.tensor([50.0] + [1.0] * 11, dtype=torch.float64)[:, None]
    with pytest.raises(AssertionError, match="a QP was solved"):
        ours(dominated @ dominated.T)


def test_projector_option_names_torchjds_or_refuses() -> None:
    config = AggregatorConfig(name="upgrad", options={"projector": "quadprog"})
    assert type(jd.build_aggregator(config, 3).projector).__name__ == "QuadprogProjector"
    fast = AggregatorConfig(name="upgrad", options={"projector": "fast"})
    with pytest.raises(ValueError, match=r"projector: 'fast'; choose screened or quadprog"):
        jd.build_aggregator(fast, 3)


def test_weighting_benchmark_reports_each_projector(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import json
    import sys

    from benchmarks import jd_overhead

    argv = ["jd_overhead", "--weighting-only", "--device", "cpu", "--batch-size", "2",
            "--stack-steps", "3", "arch.hidden_size=16", "arch.H_cycles=1",
            "arch.L_cycles=1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    jd_overhead.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["m"] == 6 and out["mode"] == "stack_supervisions_and_iwrm"
    for row in out["weighting"].values():
        assert row["max_weight_difference"] < 1e-6
        assert row["quadprog_vs_screened"] > 0 and row["screened_s"] >= 0
    assert out["weighting"]["conflicting"]["conflicting_objectives"] > 0
    assert out["gramian_s"] > 0 and out["backward_s"] >= 0


class ForcedHalting(torch.nn.Module):
    """A loss head whose halting flags are set by hand before each call (a schedule)."""

    def __init__(self, head: torch.nn.Module, schedule: list[list[bool]]) -> None:
        super().__init__()
        self.head = head
        self.schedule = schedule
        self.calls = 0

    def forward(self, *, carry: object, batch: dict, return_keys: tuple = ()) -> object:
        carry = replace(carry, halted=torch.tensor(self.schedule[self.calls]))
        self.calls += 1
        return self.head(carry=carry, batch=batch, return_keys=return_keys)


def stacked_setup(mode: str) -> tuple[Any, torch.nn.Module, Any, Any]:
    """(config, loss head, family, capabilities) of a tiny trm with two stacked steps."""
    from models.family import family_of
    from models.registry import build_loss_head
    from training.config import load_pretrain_config
    from utils.config import compose

    over = ["+experiment=tiny_cpu", "arch.hidden_size=16", "arch.halt_max_steps=2",
            "arch.halt_exploration_prob=0", f"objective={mode}", "aggregator=mean",
            "objective.carry_perturbation_rate=0",
            f"global_batch_size={DIMS.batch_size}"]  # fmt: skip
    config = load_pretrain_config(compose(overrides=over))
    torch.manual_seed(0)
    head = build_loss_head(config.arch, DIMS).train()
    family = family_of(config.arch)
    capabilities = family.capabilities(config.arch, head)
    return config, head, family, capabilities


@pytest.mark.parametrize("mode", ["stack_supervisions", "stack_supervisions_and_sum"])
def test_the_strategy_gives_each_stacked_step_its_puzzles(mode: str) -> None:
    """training.strategies.JacobianDescent, Jacobian (m = 2) and summed (m = 1) paths: the
    slot reloaded mid-stack trains its first puzzle with step 0's row and the batch's puzzle
    with step 1's, as the by-hand rows of ``stacked_rows``."""
    from training.optimizers import NamedOptimizer
    from training.state import TrainState
    from training.strategies import build_strategy

    halted = [[False, True, True, True], [True, False, False, False]]
    seen, grads, _ = stacked_rows(tiny_head(halt_exploration_prob="0"), halted, record=True)
    config, head, family, capabilities = stacked_setup(mode)
    table = head.model.inner.puzzle_emb
    optimizer = CastedSparseEmbeddingSignSGD_Distributed(table.buffers(), world_size=1, lr=1.0,
                                                         weight_decay=0.0)  # fmt: skip
    batch = tiny_batch()
    previous = {**batch, "puzzle_identifiers": torch.full_like(batch["puzzle_identifiers"], 4)}
    batch["puzzle_identifiers"] = torch.tensor([1, 2, 3, 1], dtype=torch.int32)
    with torch.no_grad():
        carry = head(carry=head.initial_carry(previous), batch=previous).new_carry
    state = TrainState(model=ForcedHalting(head, halted), family=family,
                       capabilities=capabilities,
                       optimizers={"puzzle_emb": NamedOptimizer("sign_sgd", optimizer, 1.0)},
                       carry=carry)  # fmt: skip
    strategy = build_strategy(config, head, family, capabilities)
    strategy.compute_gradients(state, batch, guard=lambda t: None)
    optimizer.step()
    expected = torch.zeros_like(table.weights)
    sign_sgd_by_hand(expected, list(zip(seen, grads, strict=True)))
    torch.testing.assert_close(table.weights, expected)
    assert expected[4].abs().sum() > 0


def test_the_options_are_command_line_keys_checked_in_one_line() -> None:
    from training.config import load_pretrain_config
    from utils.config import compose
    from utils.schema import ConfigError

    over = ["objective=iwrm_with_q_halt_in", "objective.scale=global_batch",
            "objective.ranks=local", "objective.include_puzzle_embedding=true",
            "objective.max_objectives=1024", "+aggregator.options.projector=quadprog"]  # fmt: skip
    config = load_pretrain_config(compose(overrides=over))
    spec = config.objective
    assert (spec.scale, spec.ranks, spec.include_puzzle_embedding, spec.max_objectives) == (
        "global_batch", "local", True, 1024)  # fmt: skip
    assert config.aggregator.options == {"projector": "quadprog"}
    with pytest.raises(ConfigError, match=r"objective\.scale") as e:
        load_pretrain_config(compose(overrides=["objective=iwrm_with_q_halt_in",
                                                "objective.scale=batch"]))  # fmt: skip
    assert "\n" not in str(e.value).strip()


class RowRecorder:
    """Stands in for ``training.hard_examples.HardExampleCounts``: the halting flags of every
    output it is shown."""

    def __init__(self) -> None:
        self.halted: list[list[bool]] = []

    def observe_output(self, out: object) -> None:
        self.halted.append(out.new_carry.halted.tolist())


@pytest.mark.parametrize("mode", ["stack_supervisions", "stack_supervisions_and_sum"])
def test_hard_examples_count_the_rows_of_every_stacked_step(mode: str) -> None:
    """sampling=hard_examples with stacked supervision steps: a slot that halts at the first
    step (and reloads) counts there, not only the slots that halt at the last one; the step
    does not count the last output a second time (``Gradients.rows_observed``)."""
    from training.state import TrainState
    from training.strategies import build_strategy

    halted = [[False, True, True, True], [True, False, False, False]]
    config, head, family, capabilities = stacked_setup(mode)
    batch = tiny_batch()
    with torch.no_grad():
        carry = head(carry=head.initial_carry(batch), batch=batch).new_carry
    recorder = RowRecorder()
    state = TrainState(model=ForcedHalting(head, halted), family=family,
                       capabilities=capabilities, carry=carry)  # fmt: skip
    state.hard_examples = recorder  # type: ignore[assignment]
    strategy = build_strategy(config, head, family, capabilities)
    grads = strategy.compute_gradients(state, batch, guard=lambda t: None)
    assert grads.rows_observed
    # By hand: the carry comes from one forward (every slot at step 1 of halt_max_steps=2,
    # the untrained Q head saying continue). Step 0 reloads slots 1-3 (step 1 again) and takes
    # slot 0 to step 2, where it halts; step 1 reloads slot 0 and halts slots 1-3. Counting the
    # last output only would miss slot 0's halt.
    assert recorder.halted == [[True, False, False, False], [False, True, True, True]]
