"""The TRM model: shapes, recursion structure, ACT carry semantics, halting and exploration."""

from __future__ import annotations

import math

import pytest
import torch

from models.layers import SwiGLU, rms_norm
from models.recursive_reasoning.common import ModelDims
from models.recursive_reasoning.configs import TRMConfig
from models.recursive_reasoning.recording import record_steps
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from tests.reference_models import trm_recursion_by_hand

DIMS = ModelDims(batch_size=4, seq_len=12, vocab_size=7, num_puzzle_identifiers=9)


def tiny(**overrides: object) -> TRMConfig:
    base = dict(
        name="trm", hidden_size=32, num_heads=2, expansion=2, L_layers=1, H_cycles=3, L_cycles=2,
        halt_max_steps=4, puzzle_emb_ndim=32, puzzle_emb_len=2, forward_dtype="float32",
    )  # fmt: skip
    return TRMConfig(**{**base, **overrides})


def batch(B: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = (B, DIMS.seq_len)
    return {
        "inputs": torch.randint(0, DIMS.vocab_size, tokens, generator=g, dtype=torch.int32),
        "labels": torch.randint(0, DIMS.vocab_size, tokens, generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(1, 9, (B,), generator=g, dtype=torch.int32),
    }


def model_for(config: TRMConfig, dims: ModelDims = DIMS) -> TinyRecursiveReasoningModel_ACTV1:
    torch.manual_seed(0)
    return TinyRecursiveReasoningModel_ACTV1(config, dims)


def test_shapes_and_dtypes() -> None:
    m = model_for(tiny())
    b = batch()
    carry, out = m(m.initial_carry(b), b)
    assert out["logits"].shape == (4, DIMS.seq_len, DIMS.vocab_size)
    assert out["q_halt_logits"].shape == (4,) and out["q_halt_logits"].dtype == torch.float32
    assert carry.inner_carry["z_H"].shape == (4, DIMS.seq_len + 2, 32)
    assert not carry.inner_carry["z_H"].requires_grad
    assert carry.steps.tolist() == [1, 1, 1, 1]


def test_bfloat16_activations() -> None:
    m = model_for(tiny(forward_dtype="bfloat16"))
    b = batch()
    carry, out = m(m.initial_carry(b), b)
    assert out["logits"].dtype == torch.bfloat16
    assert carry.inner_carry["z_L"].dtype == torch.bfloat16
    assert m.inner.H_init.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_initialisation() -> None:
    m = model_for(tiny())
    assert torch.equal(m.inner.q_head.weight, torch.zeros(2, 32))
    assert torch.equal(m.inner.q_head.bias, torch.full((2,), -5.0))
    assert torch.equal(m.inner.puzzle_emb.weights, torch.zeros(9, 32))
    # Truncated at ±2σ' where σ' = σ / sd(N(0,1) truncated to [-2, 2]) and σ = 1/√D.
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    sd_trunc = math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))
    w = m.inner.embed_tokens.embedding_weight
    assert w.abs().max() <= 2 / math.sqrt(32) / sd_trunc + 1e-6


def test_prefix_puts_the_puzzle_vector_first_and_zeros_after() -> None:
    m = model_for(tiny(puzzle_emb_ndim=32, puzzle_emb_len=3))
    m.eval()
    with torch.no_grad():
        m.inner.puzzle_emb.weights.normal_()
    b = batch()
    prefix = m.inner.condition(b)
    assert prefix.shape == (4, 3, 32)
    assert torch.equal(prefix[:, 0], m.inner.puzzle_emb.weights[b["puzzle_identifiers"].long()])
    assert torch.count_nonzero(prefix[:, 1:]) == 0
    x = m.inner.input_embeddings(b)
    assert torch.allclose(x[:, 0], math.sqrt(32) * prefix[:, 0])


def test_recursion_order_and_gradient_only_through_last_cycle() -> None:
    cfg = tiny(H_cycles=3, L_cycles=2)
    m = model_for(cfg)
    grad_flags: list[bool] = []
    m.inner.L_level.register_forward_hook(lambda *_: grad_flags.append(torch.is_grad_enabled()))
    b = batch()
    with record_steps(m) as rec:
        m(m.initial_carry(b), b)
    per_cycle = cfg.L_cycles + 1
    assert grad_flags == [False] * (cfg.H_cycles - 1) * per_cycle + [True] * per_cycle
    names = [(r.name, r.h_cycle, r.l_step) for r in rec.act_steps[0]]
    expected = [
        item
        for h in range(cfg.H_cycles)
        for item in [("z_L", h, 0), ("z_L", h, 1), ("z_H", h, None)]
    ]
    assert names == expected


def test_recursion_matches_a_hand_written_loop() -> None:
    """z ← f(z + y + x) n times then y ← f(y + z), T times, from H_init/L_init."""
    cfg = tiny(H_cycles=2, L_cycles=3)
    m = model_for(cfg)
    m.eval()
    b = batch()
    carry, out = m(m.initial_carry(b), b)
    inner = m.inner
    z_H = trm_recursion_by_hand(inner, b)[-1]
    with torch.no_grad():
        logits = inner.lm_head(z_H)[:, 2:]
    torch.testing.assert_close(carry.inner_carry["z_H"], z_H)
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["q_halt_logits"], inner.q_head(z_H[:, 0])[:, 0])


def test_halted_slots_reset_and_take_the_new_batch() -> None:
    m = model_for(tiny(halt_max_steps=3))
    m.eval()
    b1, b2 = batch(seed=1), batch(seed=2)
    carry, _ = m(m.initial_carry(b1), b1)
    assert torch.equal(carry.current_data["inputs"], b1["inputs"])
    # Force slots 0 and 2 halted: they restart from the init buffers with b2's data.
    carry.halted = torch.tensor([True, False, True, False])
    before = carry.inner_carry["z_L"].clone()
    captured = {}

    def grab(module: torch.nn.Module, args: tuple) -> None:
        captured.setdefault("carry", {k: v.clone() for k, v in args[0].items()})

    hook = m.inner.register_forward_pre_hook(grab)
    new, _ = m(carry, b2)
    hook.remove()
    rows = torch.tensor([True, False, True, False])
    torch.testing.assert_close(
        captured["carry"]["z_L"][rows], m.inner.L_init.expand(2, DIMS.seq_len + 2, 32)
    )
    torch.testing.assert_close(captured["carry"]["z_L"][~rows], before[~rows])
    assert torch.equal(new.current_data["inputs"][rows], b2["inputs"][rows])
    assert torch.equal(new.current_data["inputs"][~rows], b1["inputs"][~rows])
    assert new.steps.tolist() == [1, 2, 1, 2]


def test_eval_runs_every_step_and_steps_never_exceed_max() -> None:
    m = model_for(tiny(halt_max_steps=4))
    m.eval()
    with torch.no_grad():
        m.inner.q_head.bias.fill_(10.0)  # the Q head says "halt" everywhere
    b = batch()
    carry = m.initial_carry(b)
    for step in range(1, 5):
        carry, _ = m(carry, b)
        assert carry.steps.tolist() == [step] * 4
        assert carry.halted.all() == (step == 4)
    m.train()
    carry = m.initial_carry(b)
    for _ in range(20):
        carry, _ = m(carry, b)
        assert int(carry.steps.max()) <= 4


def test_halt_at_eval_stops_on_the_q_head() -> None:
    m = model_for(tiny(halt_max_steps=4, halt_at_eval=True))
    m.eval()
    with torch.no_grad():
        m.inner.q_head.bias.copy_(torch.tensor([10.0, 0.0]))
    b = batch()
    carry, _ = m(m.initial_carry(b), b)
    assert carry.halted.all() and carry.steps.tolist() == [1] * 4


def test_exploration_follows_its_probability() -> None:
    """With q_halt > 0 everywhere, a running slot halts at step k unless exploration (drawn
    afresh every step with probability p) sets a minimum step count m ~ U{2..N} with m > k.
    So it continues past step k with c_k = p·P(m > k) = p·(N − k)/(N − 1) (c_1 = p, c_N = 0)
    and P(halt at k) = Π_{j<k} c_j · (1 − c_k)."""
    p, n_max, B = 0.3, 5, 6000
    cfg = tiny(halt_max_steps=n_max, halt_exploration_prob=p, hidden_size=8, num_heads=1,
               puzzle_emb_ndim=8, H_cycles=1, L_cycles=1)  # fmt: skip
    dims = ModelDims(batch_size=B, seq_len=4, vocab_size=5, num_puzzle_identifiers=2)
    m = model_for(cfg, dims)
    with torch.no_grad():
        m.inner.q_head.bias.fill_(5.0)
    b = {
        "inputs": torch.zeros(B, 4, dtype=torch.int32),
        "labels": torch.zeros(B, 4, dtype=torch.int32),
        "puzzle_identifiers": torch.ones(B, dtype=torch.int32),
    }
    torch.manual_seed(123)
    carry = m.initial_carry(b)
    halt_step = torch.zeros(B, dtype=torch.int64)
    with torch.no_grad():
        for step in range(1, n_max + 1):
            carry, _ = m(carry, b)
            halt_step[carry.halted & (halt_step == 0)] = step
            carry.halted = torch.zeros_like(carry.halted)  # keep slots running; first halt counts
    observed = torch.bincount(halt_step, minlength=n_max + 1)[1:].double() / B
    running, expected = 1.0, []
    for k in range(1, n_max + 1):
        cont = p * (n_max - k) / (n_max - 1) if k > 1 else p
        expected.append(running * (1 - cont))
        running *= cont
    assert abs(sum(expected) - 1) < 1e-12
    torch.testing.assert_close(
        observed, torch.tensor(expected, dtype=torch.float64), atol=0.02, rtol=0
    )


@pytest.mark.parametrize("no_act_continue", [True, False])
def test_q_continue_target_only_without_no_act_continue(no_act_continue: bool) -> None:
    m = model_for(tiny(no_ACT_continue=no_act_continue))
    m.train()
    b = batch()
    _, out = m(m.initial_carry(b), b)
    assert ("target_q_continue" in out) == (not no_act_continue)
    if not no_act_continue:
        t = out["target_q_continue"]
        assert t.shape == (4,) and ((t > 0) & (t < 1)).all() and not t.requires_grad


def test_mlp_t_block_normalises_over_the_sequence_axis() -> None:
    cfg = tiny(mlp_t=True, pos_encodings="none")
    m = model_for(cfg)
    block = m.inner.L_level.layers[0]
    assert not hasattr(block, "self_attn") and isinstance(block.mlp_t, SwiGLU)
    h = torch.randn(2, DIMS.seq_len + 2, 32)
    t = h.transpose(1, 2)
    expected = rms_norm(t + block.mlp_t(t), 1e-5).transpose(1, 2)
    expected = rms_norm(expected + block.mlp(expected), 1e-5)
    torch.testing.assert_close(block(cos_sin=None, hidden_states=h), expected)


def test_learned_positions_and_no_positions() -> None:
    m = model_for(tiny(pos_encodings="learned"))
    assert m.inner.embed_pos.embedding_weight.shape == (DIMS.seq_len + 2, 32)
    assert not hasattr(m.inner, "rotary_emb")
    m = model_for(tiny(pos_encodings="none"))
    assert not hasattr(m.inner, "rotary_emb") and not hasattr(m.inner, "embed_pos")


def test_without_puzzle_embedding_there_is_no_prefix() -> None:
    m = model_for(tiny(puzzle_emb_ndim=0))
    b = batch()
    carry, out = m(m.initial_carry(b), b)
    assert not hasattr(m.inner, "puzzle_emb")
    assert carry.inner_carry["z_H"].shape[1] == DIMS.seq_len
    assert out["logits"].shape[1] == DIMS.seq_len
