"""Test-time latent search (``training.latent_search``): the search improves the demo
likelihood, leave-one-out never scores a demo from itself, batched rows equal rows searched
alone, the frozen model comes back unchanged, and TRM's fresh-embedding search works.

Tiny models (hidden 16, one layer, 4 × 4 grids); the stand-in encoders are registered for each
test only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.base import ENCODERS, DemoEncoder, EncoderConfig, EncoderOutput
from models.etrm.configs import ETRMConfig
from models.family import family_of
from models.losses import ACTLossHead
from models.recursive_reasoning.act import ACTCarry
from models.recursive_reasoning.common import ModelDims
from models.recursive_reasoning.configs import TRMConfig
from training.latent_search import SearchOutput, TTOConfig, search
from training.rollout import rollout
from utils.schema import ConfigError

Batch = dict[str, torch.Tensor]
Tensor = torch.Tensor
DIMS = ModelDims(batch_size=8, seq_len=16, vocab_size=6, num_puzzle_identifiers=12)
K = 3  # demo slots


class PooledEncoder(DemoEncoder):
    """Each demo pair's token embeddings averaged, then over the valid demos (the latent), then
    ``output_proj`` to the T context tokens; a row without demos gets the projection of 0."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        D, T = config.hidden_size, config.output_tokens
        self.embed = nn.Embedding(config.vocab_size, D)
        self.output_proj = nn.Linear(D, T * D)

    def forward(
        self, demo_inputs: Tensor, demo_labels: Tensor, demo_mask: Tensor, state: object = None
    ) -> EncoderOutput:
        per_demo = (self.embed(demo_inputs.long()) + 2 * self.embed(demo_labels.long())).mean(2)
        w = demo_mask.to(per_demo.dtype)[..., None]
        z = (per_demo * w).sum(1) / w.sum(1).clamp_min(1)
        return EncoderOutput(context=self.as_context(self.output_proj(z)), z_pooled=z)


@pytest.fixture(autouse=True)
def stand_in_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    ENCODERS.names()  # the real encoders register first
    monkeypatch.setitem(ENCODERS._entries, "test_pooled", PooledEncoder)


TINY = dict(
    hidden_size=16, num_heads=2, expansion=2, L_layers=1, H_cycles=2, L_cycles=1,
    halt_max_steps=2, forward_dtype="float32",
)  # fmt: skip


def etrm_head(seed: int = 0, **overrides: object) -> nn.Module:
    config = ETRMConfig(
        **{"name": "etrm", **TINY, "puzzle_emb_len": 2, "encoder_type": "test_pooled", **overrides}
    )
    torch.manual_seed(seed)
    head = family_of(config).build(config, DIMS)
    head.eval()
    return head


def trm_head(seed: int = 0) -> nn.Module:
    config = TRMConfig(**{"name": "trm", **TINY, "puzzle_emb_ndim": 16, "puzzle_emb_len": 1})
    torch.manual_seed(seed)
    head = family_of(config).build(config, DIMS)
    head.eval()
    return head


def rule_batch(B: int, seed: int = 0, counts: list[int] | None = None) -> Batch:
    """B rows whose pairs follow one random colour permutation per row (the rule is in the
    demos); row b has ``counts[b]`` valid demos (default cycling 3, 2, 1)."""
    g = torch.Generator().manual_seed(seed)
    S, V = DIMS.seq_len, DIMS.vocab_size
    counts = counts or [3 - b % 3 for b in range(B)]
    mask = torch.arange(K)[None, :] < torch.tensor(counts)[:, None]
    grids = torch.randint(2, V, (B, K + 1, S), generator=g)
    perms = torch.stack([torch.randperm(V - 2, generator=g) + 2 for _ in range(B)])
    perms = torch.cat((torch.tensor([[0, 1]]).expand(B, 2), perms), 1)  # PAD, EOS fixed
    outputs = torch.gather(perms[:, None, :].expand(B, K + 1, V), 2, grids)
    slots = mask[..., None]
    return {
        "inputs": grids[:, K].to(torch.int32),
        "labels": outputs[:, K].to(torch.int32),
        "puzzle_identifiers": torch.arange(B, dtype=torch.int32) % DIMS.num_puzzle_identifiers,
        "demo_inputs": (grids[:, :K] * slots).to(torch.int32),
        "demo_labels": (outputs[:, :K] * slots).to(torch.int32),
        "demo_mask": mask,
        "group_ids": torch.arange(B, dtype=torch.int32),
    }


def run(head: nn.Module, batch: Batch, **config: object) -> SearchOutput:
    """The search as evaluation calls it (inside inference mode); FLOPs uncounted unless
    asked for (the counter's first use costs seconds)."""
    with torch.inference_mode():
        return search(head, batch, TTOConfig(**{"count_flops": False, **config}))


def plain_demo_loss(head: nn.Module, batch: Batch, b: int, i: int, mask: Tensor) -> float:
    """Demo i of row b scored by the model itself (no search): query = demo i, the demo set
    ``mask`` [K], ``halt_max_steps`` steps, the mean token loss of the last step."""
    row = {
        "inputs": batch["demo_inputs"][b, i][None],
        "labels": batch["demo_labels"][b, i][None].to(torch.int32),
        "puzzle_identifiers": batch["puzzle_identifiers"][b][None],
        "demo_inputs": batch["demo_inputs"][b][None],
        "demo_labels": batch["demo_labels"][b][None],
        "demo_mask": mask[None],
        "group_ids": batch["group_ids"][b][None],
    }
    with torch.no_grad():
        steps = list(rollout(head, row))
    return float(steps[-1].out.lm_loss_per_sample[0])


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def test_off_by_default() -> None:
    assert not TTOConfig().enabled and TTOConfig(steps=1).enabled
    with pytest.raises(ValueError):
        TTOConfig(stepz=3)
    missing = [k for k, f in TTOConfig.model_fields.items() if not (f.description or "").strip()]
    assert missing == []


# ----------------------------------------------------------------------------------------------
# The search improves the demo likelihood
# ----------------------------------------------------------------------------------------------
def test_demo_loss_falls_over_the_search() -> None:
    head = etrm_head()
    out = run(head, rule_batch(24), steps=12, loo=False)
    traj = out.loglik_trajectory[:, 0, :]  # [B, steps + 1], one candidate
    median = (-traj).median(0).values  # median demo loss over rows at each step
    rises = (median[1:] > median[:-1]).float().mean()
    # Measured: median 2.005 → 1.626 (−0.38), rising at 3 steps of 12.
    assert float(median[-1]) < float(median[0]) - 0.25
    assert float(rises) <= 4 / 12
    assert out.searched.all()
    # The first attempt is the best point of the trajectory, the second the next distinct one.
    best = traj.max(1).values
    torch.testing.assert_close(out.demo_loglik[:, 0], best)
    assert (out.demo_loglik[:, 1] <= out.demo_loglik[:, 0]).all()
    torch.testing.assert_close(out.loglik_start, traj[:, 0])
    assert torch.equal(out.best_is_start, traj.argmax(1) == 0)
    # Every gradient step moves the context, so the second attempt is the second-best step.
    torch.testing.assert_close(out.demo_loglik[:, 1], traj.sort(1).values[:, -2])


def test_the_second_attempt_is_a_distinct_point() -> None:
    """Random search keeps a candidate's point until a draw beats it: the trajectory repeats
    points, and the second attempt must be the best value below the first, not a repeat."""
    out = run(etrm_head(), rule_batch(8), steps=6, method="random_search", num_perturbed=2)
    traj = out.loglik_trajectory[:, 0, :]
    assert bool((traj[:, 1:] == traj[:, :-1]).any())  # some steps kept their point
    for b in range(8):
        values = traj[b].unique(sorted=True)
        assert float(out.demo_loglik[b, 0]) == pytest.approx(float(values[-1]), abs=1e-6)
        second = values[-2] if len(values) > 1 else values[-1]
        assert float(out.demo_loglik[b, 1]) == pytest.approx(float(second), abs=1e-6)
    assert bool((out.demo_loglik[:, 1] < out.demo_loglik[:, 0]).any())


def test_recursion_steps_choose_the_rollout_step_that_is_scored() -> None:
    head = etrm_head()
    batch = rule_batch(2, counts=[2, 1])
    mask = batch["demo_mask"]
    for recursion_steps in (None, 1, 3):  # 3 > halt_max_steps: slots still never restart
        out = run(head, batch, steps=1, loo=False, recursion_steps=recursion_steps)
        n = recursion_steps or TINY["halt_max_steps"]
        for b in range(2):
            valid = mask[b].nonzero()[:, 0].tolist()
            losses = []
            for i in valid:
                row = {k: v[b : b + 1].clone() for k, v in batch.items()}
                row["inputs"], row["labels"] = row["demo_inputs"][:, i], row["demo_labels"][:, i]
                carry = head.initial_carry(row)
                with torch.no_grad():
                    for _ in range(n):
                        step = head(carry=carry, batch=row)
                        carry = step.new_carry
                        carry.halted = torch.zeros_like(carry.halted)
                losses.append(float(step.lm_loss_per_sample[0]))
            start = float(out.loglik_trajectory[b, 0, 0])
            assert start == pytest.approx(-sum(losses) / len(valid), abs=1e-5)


@pytest.mark.parametrize(
    "encoder_type", [n for n in ENCODERS.names() if not ENCODERS.get(n).is_recurrent]
)
def test_every_encoder_is_searchable(encoder_type: str) -> None:
    head = etrm_head(encoder_type=encoder_type, encoder_num_layers=1)
    batch = rule_batch(2)
    for variable in ("context", "latent", "offset"):
        if variable == "latent" and encoder_type in ("standard", "hybrid_standard"):
            with pytest.raises(ConfigError, match="variable=latent needs an encoder"):
                run(head, batch, steps=1, variable=variable)
            continue
        traj = run(head, batch, steps=1, variable=variable).loglik_trajectory[:, 0]
        assert bool(traj.isfinite().all()) and bool((traj[:, 1] != traj[:, 0]).all())


# ----------------------------------------------------------------------------------------------
# Leave-one-out
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "init"), [("context", "mean"), ("latent", "each_demo"), ("offset", "mean")]
)
def test_leave_one_out_scores_each_demo_without_it(variable: str, init: str) -> None:
    """On the real ETRM model: demo i of candidate c is scored as the model scores it with the
    demo set S_c minus i (S_c = every demo, or demo c alone for each_demo)."""
    head = etrm_head()
    batch = rule_batch(6)
    options = {"steps": 1, "variable": variable, "init": init}
    loo = run(head, batch, loo=True, **options).loglik_trajectory[..., 0]
    seen = run(head, batch, loo=False, **options).loglik_trajectory[..., 0]
    mask = batch["demo_mask"]
    for b in range(6):
        valid = mask[b].nonzero().squeeze(1).tolist()
        sets = [valid] if init == "mean" else [[k] for k in valid]
        for c, members in enumerate(sets):
            in_set = torch.zeros(K, dtype=torch.bool)
            in_set[members] = True
            without = [plain_demo_loss(head, batch, b, i, in_set & (torch.arange(K) != i))
                       for i in valid]  # fmt: skip
            withit = [plain_demo_loss(head, batch, b, i, in_set) for i in valid]
            assert float(loo[b, c]) == pytest.approx(-sum(without) / len(valid), abs=1e-5)
            assert float(seen[b, c]) == pytest.approx(-sum(withit) / len(valid), abs=1e-5)
    valid = ~loo.isnan()
    assert not torch.allclose(loo[valid], seen[valid])


class CopyEncoder(DemoEncoder):
    """Context [S, V]: the mean one-hot of its demos' outputs (zeros for an empty set)."""

    def forward(
        self, demo_inputs: Tensor, demo_labels: Tensor, demo_mask: Tensor, state: object = None
    ) -> EncoderOutput:
        onehot = F.one_hot(demo_labels.long(), DIMS.vocab_size).float()
        w = demo_mask.float()[..., None, None]
        return EncoderOutput(context=(onehot * w).sum(1) / w.sum(1).clamp_min(1))


class CopyModel(nn.Module):
    """A one-step ACT model that predicts its context: logits = gain · context, so a demo is
    predicted best from a context that saw its own output."""

    def __init__(self) -> None:
        super().__init__()
        config = EncoderConfig(hidden_size=DIMS.vocab_size, output_tokens=DIMS.seq_len,
                               vocab_size=DIMS.vocab_size, seq_len=DIMS.seq_len,
                               forward_dtype="float32")  # fmt: skip
        self.encoder = CopyEncoder(config)
        self.gain = nn.Parameter(torch.tensor(3.0))
        self.config = TRMConfig(name="trm", halt_max_steps=1)

    def initial_carry(self, batch: Batch) -> ACTCarry:
        B = batch["inputs"].shape[0]
        return ACTCarry({}, torch.zeros(B, dtype=torch.int32), torch.ones(B, dtype=torch.bool),
                        {k: torch.empty_like(v) for k, v in batch.items()})  # fmt: skip

    def forward(self, carry: ACTCarry, batch: Batch) -> tuple[ACTCarry, dict[str, Tensor]]:
        h = carry.halted
        data = {k: torch.where(h.view(-1, *[1] * (v.ndim - 1)), batch[k], v)
                for k, v in carry.current_data.items()}  # fmt: skip
        context = self.encoder(data["demo_inputs"], data["demo_labels"], data["demo_mask"]).context
        zeros = torch.zeros(h.shape)
        steps = torch.where(h, 0, carry.steps) + 1
        outputs = {
            "logits": self.gain * context,
            "q_halt_logits": zeros,
            "q_continue_logits": zeros,
        }
        return ACTCarry({}, steps, steps >= 1, data), outputs


def copy_loglik(labels: Tensor, i: int, others: list[int], gain: float = 3.0) -> float:
    """Demo i's mean token log-probability under the softmax of gain · (mean one-hot of the
    demos ``others``), written out."""
    p = torch.zeros(DIMS.seq_len, DIMS.vocab_size)
    for j in others:
        p += F.one_hot(labels[j].long(), DIMS.vocab_size).float() / len(others)
    logprob = torch.log_softmax(gain * p, -1)
    y = labels[i].long()
    scored = y != 0  # PAD labels are not scored
    return float(logprob[torch.arange(DIMS.seq_len), y][scored].mean())


@pytest.mark.parametrize("init", ["mean", "each_demo"])
def test_leave_one_out_never_lets_a_demo_see_itself(init: str) -> None:
    head = ACTLossHead(CopyModel(), loss_type="softmax_cross_entropy")
    batch = rule_batch(6)
    loo = run(head, batch, steps=1, init=init, loo=True).loglik_trajectory[:, :, 0]
    seen = run(head, batch, steps=1, init=init, loo=False).loglik_trajectory[:, :, 0]
    for b in range(6):
        labels, valid = batch["demo_labels"][b], batch["demo_mask"][b].nonzero()[:, 0].tolist()
        sets = [valid] if init == "mean" else [[k] for k in valid]
        for c, members in enumerate(sets):
            want = [copy_loglik(labels, i, [j for j in members if j != i]) for i in valid]
            assert float(loo[b, c]) == pytest.approx(sum(want) / len(valid), abs=1e-5)
            want = [copy_loglik(labels, i, members) for i in valid]
            assert float(seen[b, c]) == pytest.approx(sum(want) / len(valid), abs=1e-5)
    # Seeing itself would help (each demo's own output is in the context it is scored from).
    valid = ~loo.isnan()
    assert bool((seen[valid] > loo[valid] + 0.05).all())


# ----------------------------------------------------------------------------------------------
# Batched equals per-row
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"init": "each_demo", "variable": "latent", "chunk_rows": 3},
        {"init": "perturbed", "variable": "offset", "schedule": "cosine"},
        {"method": "random_search", "num_perturbed": 2},
    ],
)
def test_batched_search_equals_each_row_alone(options: dict) -> None:
    head = etrm_head()
    batch = rule_batch(4, seed=3, counts=[3, 1, 0, 2])
    together = run(head, batch, steps=2, **options)
    assert together.searched.tolist() == [True, True, False, True]
    for b in range(4):
        alone = run(head, {k: v[b : b + 1] for k, v in batch.items()}, steps=2, **options)
        assert torch.equal(together.preds[b], alone.preds[0])
        c = alone.loglik_trajectory.shape[1]
        for name in ("q_halt_logits", "demo_loglik", "loglik_start", "best_is_start"):
            expected, got = getattr(alone, name)[0], getattr(together, name)[b]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(
            together.loglik_trajectory[b, :c], alone.loglik_trajectory[0],
            atol=1e-5, rtol=1e-5, equal_nan=True,
        )  # fmt: skip
        assert together.loglik_trajectory[b, c:].isnan().all()


def test_flops_grow_linearly_with_the_steps() -> None:
    head, batch = etrm_head(), rule_batch(2)

    def per_step(**options: object) -> float:
        flops = [run(head, batch, steps=s, count_flops=True, **options).flops for s in (1, 2, 3)]
        assert all(f is not None and f > 0 for f in flops)
        step = flops[1] - flops[0]
        assert step > 0 and flops[2] - flops[1] == pytest.approx(step, rel=1e-9)
        return step

    scoring = per_step(method="random_search", num_perturbed=1)  # one forward scoring a step
    # A gradient step scores once with grad, then back-propagates through the last cycle.
    assert 1.0 < per_step() / scoring < 3.0
    assert run(head, batch, steps=1).flops is None


@pytest.mark.parametrize("arch", ["etrm", "trm"])
def test_counting_flops_leaves_the_search_bit_identical(arch: str) -> None:
    """The counting mode decomposes silu's backward into other kernels; before the count ran
    on separate passes, these searches' trajectories differed in the last float bits."""
    head = etrm_head() if arch == "etrm" else trm_head()
    batch = rule_batch(3)
    counted = run(head, batch, steps=3, count_flops=True)
    plain = run(head, batch, steps=3, count_flops=False)
    assert counted.flops is not None and counted.flops > 0 and plain.flops is None
    for name in ("preds", "q_halt_logits", "demo_loglik", "loglik_start", "loglik_trajectory"):
        got, expected = getattr(counted, name), getattr(plain, name)
        assert torch.equal(got.nan_to_num(-1.0), expected.nan_to_num(-1.0)), name
    assert torch.equal(counted.best_is_start, plain.best_is_start)


# ----------------------------------------------------------------------------------------------
# The model is left as it was
# ----------------------------------------------------------------------------------------------
def test_weights_flags_and_modes_are_restored() -> None:
    head = etrm_head()
    head.model.encoder.embed.weight.requires_grad_(False)
    head.model.encoder.train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    flags = {n: p.requires_grad for n, p in head.named_parameters()}
    modes = {n: m.training for n, m in head.named_modules()}
    batch = rule_batch(4)
    with torch.no_grad():
        plain_before = list(rollout(head, batch))[-1].out.outputs["preds"]
    out = run(head, batch, steps=3)
    assert {n: p.requires_grad for n, p in head.named_parameters()} == flags
    assert {n: m.training for n, m in head.named_modules()} == modes
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in head.parameters())
    # The hooks are gone: the model's own rollout is as before.
    with torch.no_grad():
        plain_after = list(rollout(head, batch))[-1].out.outputs["preds"]
    assert torch.equal(plain_after, plain_before)
    assert out.preds.shape == (4, 2, DIMS.seq_len) and out.preds.dtype == torch.int64
    # A compiled head is searched through its eager module (the hooks need it), to the same end.
    compiled = run(torch.compile(head), batch, steps=3)
    assert torch.equal(compiled.preds, out.preds)
    torch.testing.assert_close(compiled.loglik_trajectory, out.loglik_trajectory)


# ----------------------------------------------------------------------------------------------
# TRM: a fresh puzzle-embedding row
# ----------------------------------------------------------------------------------------------
def test_trm_fresh_embedding_search_improves_the_demo_likelihood() -> None:
    """Strict split: the evaluation puzzles (ids 0-5) have rows that were never trained (zero,
    TRM's init); the trained puzzles' rows (6-11) are stood in for by random ones."""
    head = trm_head()
    table = head.model.inner.puzzle_emb.weights
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        table[6:] = 0.5 * torch.randn(table[6:].shape, generator=g)
    batch = rule_batch(6)
    out = run(head, batch, steps=8)
    gain = out.demo_loglik[:, 0] - out.loglik_start
    # Measured: median gain 0.015 nats per token (up to 0.154), 5 rows of 6 gaining.
    assert float(gain.median()) > 0.005 and int((gain > 0).sum()) >= 4
    assert bool((gain >= 0).all())  # the first attempt is never worse than the start
    # The start is upstream's row for a new puzzle: the table's mean.
    fresh = trm_head()
    fresh.model.inner.puzzle_emb.weights.copy_(table.mean(0).expand_as(table))
    mask = batch["demo_mask"]
    for b in range(6):
        valid = mask[b].nonzero().squeeze(1).tolist()
        losses = [plain_demo_loss(fresh, batch, b, i, mask[b]) for i in valid]
        assert float(out.loglik_start[b]) == pytest.approx(-sum(losses) / len(valid), abs=1e-5)
    with pytest.raises(ConfigError, match="fresh embedding row"):
        run(head, batch, steps=2, init="each_demo")
    perturbed = run(head, batch, steps=1, init="perturbed", num_perturbed=2)
    assert perturbed.loglik_trajectory.shape == (6, 3, 2)
    torch.testing.assert_close(perturbed.loglik_trajectory[:, 0, 0], out.loglik_start)
