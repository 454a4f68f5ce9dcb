"""The ETRM model family: arch configs, TRMWithEncoder's ACT loop and context, loss, metrics,
diagnostics, optimizer groups and the checkpoint key list of ETRM's own code.

Small stand-in encoders (registered for each test only) keep the model tests independent of the
real encoders: a mean-pooling one, a Gaussian (variational) one and one that reads TRM's puzzle
embedding through the encoder seam.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.arch_config import ARCH_CONFIGS
from models.encoders.base import ENCODERS, DemoEncoder, EncoderConfig, EncoderOutput
from models.etrm.configs import ETRMConfig, ETRMFCTConfig
from models.etrm.diagnostics import context_diagnostics
from models.etrm.family import EncoderFamily
from models.etrm.model import CONTEXT, TRMWithEncoder, TRMWithEncoderFCT
from models.family import FAMILIES, family_of
from models.losses import IGNORE_LABEL_ID, LossOutput
from models.recursive_reasoning.act import ACTCarry
from models.recursive_reasoning.common import ModelDims
from models.recursive_reasoning.configs import TRMConfig
from models.recursive_reasoning.recording import record_steps
from training.config import PretrainConfig, load_pretrain_config
from training.optimizers import build_optimizers
from utils.config import compose
from utils.schema import ConfigError

Batch = dict[str, torch.Tensor]
Tensor = torch.Tensor
State = dict[str, torch.Tensor] | None
DIMS = ModelDims(batch_size=4, seq_len=16, vocab_size=6, num_puzzle_identifiers=5)  # 4 × 4 grids
K = 3  # demo slots
FIXTURES = Path(__file__).parent / "fixtures"


# ----------------------------------------------------------------------------------------------
# Stand-in encoders
# ----------------------------------------------------------------------------------------------
class MeanEncoder(DemoEncoder):
    """Token embeddings of each demo pair averaged, then over the valid demos; a linear map
    gives the T context tokens (a row without demos gets the bias)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        D, T = config.hidden_size, config.output_tokens
        self.embed = nn.Embedding(config.vocab_size, D)
        self.proj = nn.Linear(D, T * D)

    def pooled(
        self, demo_inputs: torch.Tensor, demo_labels: torch.Tensor, demo_mask: torch.Tensor
    ) -> torch.Tensor:
        per_demo = (self.embed(demo_inputs.long()) + self.embed(demo_labels.long())).mean(2)
        w = demo_mask.to(per_demo.dtype)[..., None]
        return (per_demo * w).sum(1) / w.sum(1).clamp_min(1)

    def to_context(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).view(z.shape[0], self.config.output_tokens, self.config.hidden_size)

    def forward(
        self, demo_inputs: Tensor, demo_labels: Tensor, demo_mask: Tensor, state: State = None
    ) -> EncoderOutput:
        pooled = self.pooled(demo_inputs, demo_labels, demo_mask)
        return EncoderOutput(context=self.to_context(pooled))


class GaussianEncoder(MeanEncoder):
    """A variational stand-in: z ~ N(mu, exp(logvar)) in training, mu at evaluation; keeps its
    last (mu, logvar, has_demos) for the tests."""

    is_variational = True

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        D = config.hidden_size
        self.mu = nn.Linear(D, D)
        self.logvar = nn.Linear(D, D)

    def forward(
        self, demo_inputs: Tensor, demo_labels: Tensor, demo_mask: Tensor, state: State = None
    ) -> EncoderOutput:
        pooled = self.pooled(demo_inputs, demo_labels, demo_mask)
        mu, logvar = self.mu(pooled), self.logvar(pooled)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        has_demos = demo_mask.any(-1)
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1) * has_demos
        self.last = (mu.detach(), logvar.detach(), has_demos)
        return EncoderOutput(context=self.to_context(z), kl_per_sample=kl, mu=mu, logvar=logvar)


class PuzzleTableEncoder(DemoEncoder):
    """TRM's conditioning through the encoder seam: the puzzle id, written into the first demo
    token, selects a table row, zero-padded to T tokens as TRM pads its puzzle embedding."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.table = nn.Parameter(torch.zeros(DIMS.num_puzzle_identifiers, config.hidden_size))

    def forward(
        self, demo_inputs: Tensor, demo_labels: Tensor, demo_mask: Tensor, state: State = None
    ) -> EncoderOutput:
        T, D = self.config.output_tokens, self.config.hidden_size
        emb = self.table[demo_inputs[:, 0, 0].long()]
        return EncoderOutput(context=F.pad(emb, (0, T * D - D)).view(-1, T, D))


STAND_INS = {"test_mean": MeanEncoder, "test_gaussian": GaussianEncoder,
             "test_puzzle_table": PuzzleTableEncoder}  # fmt: skip


@pytest.fixture(autouse=True)
def stand_in_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    ENCODERS.names()  # the real encoders register first
    for name, cls in STAND_INS.items():
        monkeypatch.setitem(ENCODERS._entries, name, cls)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
TINY = dict(
    hidden_size=16, num_heads=2, expansion=2, L_layers=1, H_cycles=2, L_cycles=1,
    halt_max_steps=3, puzzle_emb_len=2, forward_dtype="float32", encoder_type="test_mean",
)  # fmt: skip


def etrm_config(**overrides: object) -> ETRMConfig:
    return ETRMConfig(**{"name": "etrm", **TINY, **overrides})


def build(config: ETRMConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return family_of(config).build(config, DIMS)


def demo_batch(seed: int = 0) -> Batch:
    """4 rows with 2, 1, 3 and 2 of 3 demo slots filled; rows 0 and 1 share a task group."""
    g = torch.Generator().manual_seed(seed)
    B, S, V = DIMS.batch_size, DIMS.seq_len, DIMS.vocab_size
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    slots = mask[..., None].to(torch.int32)
    return {
        "inputs": torch.randint(2, V, (B, S), generator=g, dtype=torch.int32),
        "labels": torch.randint(2, V, (B, S), generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(1, DIMS.num_puzzle_identifiers, (B,), generator=g,
                                            dtype=torch.int32),
        "demo_inputs": torch.randint(2, V, (B, K, S), generator=g, dtype=torch.int32) * slots,
        "demo_labels": torch.randint(2, V, (B, K, S), generator=g, dtype=torch.int32) * slots,
        "demo_mask": mask,
        "group_ids": torch.tensor([0, 0, 1, 2], dtype=torch.int32),
    }  # fmt: skip


def step(head: nn.Module, carry: ACTCarry, batch: Batch, keys: tuple[str, ...] = ()) -> LossOutput:
    return head(carry=carry, batch=batch, return_keys=keys)


def encoder_params(head: nn.Module) -> list[nn.Parameter]:
    return list(head.model.encoder.parameters())


def row_loss(out: LossOutput) -> torch.Tensor:
    return out.lm_loss_per_sample + out.halt_loss_per_sample


def encoder_grad_norm(loss: torch.Tensor, head: nn.Module) -> float:
    grads = torch.autograd.grad(loss, encoder_params(head), retain_graph=True, allow_unused=True)
    return sum(float(g.norm()) for g in grads if g is not None)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def test_yaml_files_validate_with_etrm_values() -> None:
    c = load_pretrain_config(compose(overrides=["arch=etrm", "arch.encoder_type=test_mean"]))
    assert isinstance(c.arch, ETRMConfig) and c.arch.family == "encoder"
    assert (c.arch.L_cycles, c.arch.puzzle_emb_len, c.arch.puzzle_emb_ndim) == (4, 16, 0)
    assert c.arch.loss.kl_weight == 1e-4 and c.arch.halt_exploration_prob == 0.1
    assert c.arch.context_scale == "embed_scale" and c.arch.conditioning_refresh == "every_step"
    assert c.arch.optimizer_steps_per_batch is None
    fct = load_pretrain_config(compose(overrides=["arch=etrm_fct", "arch.encoder_type=test_mean",
                                                  "arch.num_act_steps=8"])).arch  # fmt: skip
    assert isinstance(fct, ETRMFCTConfig) and fct.L_cycles == 6
    assert fct.optimizer_steps_per_batch == 8
    assert TRMConfig(name="trm").optimizer_steps_per_batch is None


def test_etrm_module_class_strings_are_aliases() -> None:
    for alias in ("recursive_reasoning.etrm@TRMWithEncoder",
                  "recursive_reasoning.etrm_original@TRMWithEncoder"):  # fmt: skip
        assert ARCH_CONFIGS.canonical(alias) == "etrm"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder_type": "test_gaussian", "loss": {"kl_weight": 0}}, "kl_weight > 0"),
        ({"puzzle_emb_ndim": 16}, "puzzle_emb_ndim=0"),
        ({"encoder_type": "no_such_encoder"}, "unknown encoder_type 'no_such_encoder'"),
    ],
)
def test_bad_encoder_keys_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        etrm_config(**overrides)


def test_variational_encoders_have_a_kl_term() -> None:
    assert etrm_config(encoder_type="test_gaussian").has_kl_loss
    assert not etrm_config().has_kl_loss


def test_encoder_config_takes_the_decoders_sizes() -> None:
    c = etrm_config(encoder_num_layers=3, encoder_set_layers=2, encoder_norm_style="pre",
                    encoder_pooling_method="attention", lpn_latent_dim=7)  # fmt: skip
    e = c.encoder_config(vocab_size=12, seq_len=900)
    assert (e.hidden_size, e.num_heads, e.expansion, e.rms_norm_eps) == (16, 2, 2, 1e-5)
    assert (e.output_tokens, e.num_layers, e.set_encoder_layers, e.lpn_latent_dim) == (2, 3, 2, 7)
    assert (e.norm_style, e.pooling_method, e.forward_dtype) == ("pre", "attention", "float32")
    assert (e.vocab_size, e.seq_len, e.encoder_type) == (12, 900, "test_mean")


def test_every_etrm_key_is_documented() -> None:
    for schema in (ETRMConfig, ETRMFCTConfig, ETRMConfig.model_fields["loss"].annotation):
        missing = [k for k, f in schema.model_fields.items() if not (f.description or "").strip()]
        assert missing == []


# ----------------------------------------------------------------------------------------------
# The model: structure, gradients, carry
# ----------------------------------------------------------------------------------------------
def test_prefix_is_the_context_and_q_reads_position_0() -> None:
    head = build(etrm_config())
    model = head.model
    assert isinstance(model, TRMWithEncoder) and model.inner.puzzle_emb_len == 2
    assert model.inner.rotary_emb.cos_cached.shape[0] == DIMS.seq_len + 2
    assert not any("puzzle_emb" in k for k in head.state_dict())
    b = demo_batch()
    with torch.no_grad():
        model.inner.q_head.weight.normal_()
    out = step(head, head.initial_carry(b), b, ("logits", "q_halt_logits"))
    assert out.outputs["logits"].shape == (4, DIMS.seq_len, DIMS.vocab_size)
    assert out.new_carry.inner_carry["z_H"].shape == (4, DIMS.seq_len + 2, 16)
    # The Q head is TRM's: it reads z_H's first position, a context token.
    z_H = out.new_carry.inner_carry["z_H"]
    q_halt = model.inner.q_head(z_H[:, 0]).to(torch.float32)[:, 0]
    torch.testing.assert_close(out.outputs["q_halt_logits"], q_halt, rtol=0, atol=0)
    assert not torch.allclose(q_halt, model.inner.q_head(z_H[:, 2])[:, 0])


def test_every_step_gives_the_encoder_gradient_from_every_row() -> None:
    head = build(etrm_config())
    head.train()
    b = demo_batch()
    carry = head.initial_carry(b)
    for _ in range(2):  # the second step continues every row (nothing halts before step 3)
        out = step(head, carry, b)
        carry = out.new_carry
    assert carry.steps.tolist() == [2, 2, 2, 2]
    per_row = row_loss(out)
    assert all(encoder_grad_norm(per_row[r], head) > 0 for r in range(4))
    out.total().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder_params(head))
    assert CONTEXT not in carry.current_data  # nothing is cached in this mode


REAL_ENCODERS = [n for n in ENCODERS.names() if not ENCODERS.get(n).is_recurrent]


@pytest.mark.parametrize("encoder_type", REAL_ENCODERS)
def test_every_registered_encoder_learns_through_the_act_loop(encoder_type: str) -> None:
    head = build(etrm_config(encoder_type=encoder_type, encoder_num_layers=1))
    head.train()
    b = demo_batch()
    carry = head.initial_carry(b)
    for _ in range(2):
        out = step(head, carry, b)
        carry = out.new_carry
    out.total().backward()
    grads = {n: p.grad for n, p in head.model.encoder.named_parameters()}
    assert [n for n, g in grads.items() if g is None] == []
    assert sum(float(g.norm()) for g in grads.values()) > 0


def test_on_reset_detached_gives_gradient_from_reset_rows_only() -> None:
    head = build(etrm_config(conditioning_refresh="on_reset_detached"))
    head.train()
    b1, b2 = demo_batch(0), demo_batch(1)
    out = step(head, head.initial_carry(b1), b1)
    assert all(encoder_grad_norm(row_loss(out)[r], head) > 0 for r in range(4))  # all reset
    cached = out.new_carry.current_data[CONTEXT]
    assert not cached.requires_grad

    out = step(head, out.new_carry, b2)  # nobody resets: no gradient reaches the encoder
    assert encoder_grad_norm(out.total(), head) == 0
    torch.testing.assert_close(out.new_carry.current_data[CONTEXT], cached, rtol=0, atol=0)

    carry = out.new_carry
    carry.halted = torch.tensor([True, False, True, False])
    out = step(head, carry, b2)
    norms = [encoder_grad_norm(row_loss(out)[r], head) for r in range(4)]
    assert norms[0] > 0 and norms[2] > 0 and norms[1] == 0 and norms[3] == 0
    # Reset rows were encoded from their new demos; the others kept their context.
    new = out.new_carry.current_data[CONTEXT]
    fresh = head.model.encode(b2).context.detach()
    torch.testing.assert_close(new[[0, 2]], fresh[[0, 2]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new[[1, 3]], cached[[1, 3]], rtol=0, atol=0)


def test_halted_rows_reload_their_demos_and_the_carry_persists() -> None:
    head = build(etrm_config())
    head.train()
    b1, b2 = demo_batch(0), demo_batch(1)
    out = step(head, head.initial_carry(b1), b1)
    carry = out.new_carry
    z_H_before = carry.inner_carry["z_H"].clone()
    carry.halted = torch.tensor([True, False, True, False])
    out = step(head, carry, b2)
    data, steps = out.new_carry.current_data, out.new_carry.steps
    assert steps.tolist() == [1, 2, 1, 2]
    for key in ("inputs", "labels", "demo_inputs", "demo_labels", "demo_mask", "group_ids"):
        assert torch.equal(data[key][[0, 2]], b2[key][[0, 2]]), key
        assert torch.equal(data[key][[1, 3]], b1[key][[1, 3]]), key
    # Continuing rows started from their carried latents, reset rows from H_init.
    z_H_reset = head.model.inner.reset_carry(carry.halted, carry.inner_carry)["z_H"]
    assert torch.equal(z_H_reset[[1, 3]], z_H_before[[1, 3]])
    assert torch.equal(z_H_reset[0], head.model.inner.H_init.expand_as(z_H_reset[0]))


def test_a_carry_with_its_cached_context_survives_a_checkpoint() -> None:
    head = build(etrm_config(conditioning_refresh="on_reset_detached"))
    head.train()
    b = demo_batch()
    carry = step(head, head.initial_carry(b), b).new_carry
    buffer = io.BytesIO()
    torch.save(carry.state_dict(), buffer)
    buffer.seek(0)
    restored = ACTCarry.from_state_dict(torch.load(buffer, weights_only=True))
    assert CONTEXT in restored.current_data
    torch.manual_seed(3)
    direct = step(head, carry, b).total()
    torch.manual_seed(3)
    again = step(head, restored, b).total()
    assert torch.equal(direct, again)


def test_recording_sees_the_decoders_latent_updates() -> None:
    head = build(etrm_config())  # H_cycles 2, L_cycles 1: 2 × (1 + 1) updates per step
    b = demo_batch()
    with record_steps(head, latents=True) as rec:
        out = step(head, head.initial_carry(b), b)
        step(head, out.new_carry, b)
    assert [len(s) for s in rec.act_steps] == [4, 4]
    torch.testing.assert_close(rec.act_steps[0][-1].value, out.new_carry.inner_carry["z_H"])


def test_freeze_encoder_leaves_the_encoder_without_gradient() -> None:
    head = build(etrm_config(freeze_encoder=True))
    b = demo_batch()
    step(head, head.initial_carry(b), b).total().backward()
    assert all(not p.requires_grad and p.grad is None for p in encoder_params(head))
    assert head.model.inner.lm_head.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# Evaluation: one encoding per item
# ----------------------------------------------------------------------------------------------
class CountCalls:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *hook_args: object) -> None:
        self.calls += 1


def eval_run(head: nn.Module, batches: list[Batch], resets: dict[int, list[bool]]) -> list[Batch]:
    """Eval-mode steps, one per batch, forcing the halted flags of ``resets`` before a step."""
    outs = []
    carry = head.initial_carry(batches[0])
    with torch.inference_mode():
        for i, b in enumerate(batches):
            if i in resets:
                carry.halted = torch.tensor(resets[i])
            out = step(head, carry, b, ("logits", "q_halt_logits"))
            carry = out.new_carry
            outs.append(out.outputs)
    return outs


def test_eval_encodes_each_item_once_and_matches_reencoding() -> None:
    head = build(etrm_config(halt_max_steps=4))
    head.eval()
    b1, b2 = demo_batch(0), demo_batch(1)
    batches = [b1, b1, b2, b2]
    resets = {2: [True, False, False, True]}  # two rows start new items before step 3
    counter = CountCalls(head.model.encoder)
    cached = eval_run(head, batches, resets)
    assert counter.calls == 2  # all rows at step 1, rows 0 and 3 at step 3
    # ETRM's evaluation (arch.eval_context=reencode), the same weights.
    etrm_like = build(etrm_config(halt_max_steps=4, eval_context="reencode"), seed=1)
    etrm_like.load_state_dict(head.state_dict())
    etrm_like.eval()
    counter = CountCalls(etrm_like.model.encoder)
    reencoded = eval_run(etrm_like, batches, resets)
    assert counter.calls == 4
    # Steps 1 and 2 reuse a whole-batch encoding: identical to re-encoding, bit for bit.
    for c, r in zip(cached[:2], reencoded[:2], strict=True):
        assert all(torch.equal(c[k], r[k]) for k in ("logits", "q_halt_logits", "preds"))
    # Steps 3 and 4 use rows 0 and 3 encoded on their own: the same up to float rounding of
    # a matrix product over 2 rows instead of 4.
    for c, r in zip(cached[2:], reencoded[2:], strict=True):
        assert torch.equal(c["preds"], r["preds"])
        for key in ("logits", "q_halt_logits"):
            torch.testing.assert_close(c[key], r[key], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Context scale
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "ratio"), [("embed_scale", math.sqrt(512)), ("none", 1.0),
                                             ("learned", math.sqrt(512))])  # fmt: skip
def test_context_scale_sets_the_prefix_rms(mode: str, ratio: float) -> None:
    """An RMS-1 context (an RMS-normed encoder output) against grid tokens at D = 512."""
    config = etrm_config(hidden_size=512, num_heads=8, context_scale=mode)
    torch.manual_seed(0)
    inner = TRMWithEncoder(config, DIMS).inner
    b = demo_batch()
    context = torch.randn(4, 2, 512)
    context = context / context.square().mean(-1, keepdim=True).sqrt()
    x = inner.input_embeddings({**b, CONTEXT: context})
    rms = lambda t: float(t.detach().square().mean().sqrt())  # noqa: E731
    prefix, grid = rms(x[:, :2]), rms(x[:, 2:])
    assert grid == pytest.approx(1.0, rel=0.05)  # √D · embeddings of std 1/√D
    assert prefix == pytest.approx(ratio, rel=1e-5)
    if mode == "learned":
        with torch.no_grad():
            inner.context_log_scale.zero_()
        assert rms(inner.input_embeddings({**b, CONTEXT: context})[:, :2]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Loss and metrics
# ----------------------------------------------------------------------------------------------
def stablemax_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token −log s(x)_y / Σ s(x), s(x) = x + 1 (x ≥ 0) or 1/(1 − x), 0 at ignored labels."""
    x = logits.to(torch.float64)
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))
    p = s / s.sum(-1, keepdim=True)
    y = labels.clamp_min(0).long()
    return torch.where(labels != IGNORE_LABEL_ID, -p.gather(-1, y[..., None]).squeeze(-1).log(), 0)


def test_total_is_lm_plus_half_q_halt_plus_weighted_kl_sum() -> None:
    w = 0.25
    head = build(etrm_config(encoder_type="test_gaussian", loss={"kl_weight": w}))
    head.train()
    b = demo_batch()
    b["labels"][1, :5] = IGNORE_LABEL_ID
    out = step(head, head.initial_carry(b), b, ("logits", "q_halt_logits"))
    logits, q = out.outputs["logits"], out.outputs["q_halt_logits"]
    labels = out.new_carry.current_data["labels"]
    n_B = (labels != IGNORE_LABEL_ID).sum(-1)
    lm = (stablemax_ce(logits, labels).sum(-1) / n_B).sum()
    exact_B = ((logits.argmax(-1) == labels) | (labels == IGNORE_LABEL_ID)).all(-1).double()
    p = torch.sigmoid(q.double())
    q_halt = -(exact_B * p.log() + (1 - exact_B) * (1 - p).log()).sum()
    mu, logvar, has = head.model.encoder.last
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1) * has).sum()
    expected = lm + 0.5 * q_halt + w * kl
    assert w * kl > 0.01 * expected  # the KL term is large enough to be seen
    assert float(out.total().detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(out.metrics["kl_loss"]) == pytest.approx(float(kl), rel=1e-6)
    assert float(out.metrics["kl_loss_weighted"]) == pytest.approx(w * float(kl), rel=1e-6)
    assert out.kl_loss is not None and out.kl_loss.requires_grad


def test_kl_metrics_keep_their_keys_when_no_row_is_encoded() -> None:
    """Every rank must emit the same metric keys at every step (they are summed together)."""
    head = build(
        etrm_config(encoder_type="test_gaussian", conditioning_refresh="on_reset_detached")
    )
    head.train()
    b = demo_batch()
    first = step(head, head.initial_carry(b), b)
    second = step(head, first.new_carry, b)  # no row resets: nothing is encoded
    assert sorted(first.metrics) == sorted(second.metrics)
    assert float(second.metrics["kl_loss"]) == 0 and float(first.metrics["kl_loss"]) > 0


def test_all_steps_and_at_halt_metrics_count_different_rows() -> None:
    head = build(etrm_config(halt_exploration_prob=0.0))  # halt_max_steps = 3
    head.train()
    b = demo_batch()
    b["labels"][3] = IGNORE_LABEL_ID  # row 3 has nothing to score
    carry = step(head, head.initial_carry(b), b).new_carry
    carry.steps = torch.tensor([2, 2, 0, 0], dtype=torch.int32)  # rows 0, 1 reach step 3 now
    out = step(head, carry, b, ("logits",))
    assert out.new_carry.halted.tolist() == [True, True, False, False]
    labels = out.new_carry.current_data["labels"]
    mask = labels != IGNORE_LABEL_ID
    correct = (out.outputs["logits"].argmax(-1) == labels) & mask
    acc_B = correct.sum(-1) / mask.sum(-1).clamp_min(1)
    m = {k: float(v) for k, v in out.metrics.items()}
    assert (m["count"], m["all_steps/count"]) == (2, 3)
    assert m["accuracy"] == pytest.approx(float(acc_B[:2].sum()))
    assert m["all_steps/accuracy"] == pytest.approx(float(acc_B[:3].sum()))
    assert m["steps"] == 6  # two halted rows at step 3
    assert {"all_steps/exact_accuracy", "all_steps/q_halt_accuracy"} <= set(m)
    # Nothing is correct yet, so the Q head's "not solved" is right for every scored row.
    assert m["all_steps/exact_accuracy"] == 0 and m["all_steps/q_halt_accuracy"] == 3


def test_the_puzzle_table_through_the_encoder_seam_reproduces_trm() -> None:
    """condition() is the only difference: TRM's weights and table in ETRM give TRM's numbers."""
    trm_cfg = TRMConfig(name="trm", **{k: v for k, v in TINY.items() if k != "encoder_type"},
                        puzzle_emb_ndim=16, halt_exploration_prob=0.5)  # fmt: skip
    torch.manual_seed(0)
    trm = FAMILIES.get("recursive").build(trm_cfg, DIMS)
    with torch.no_grad():
        trm.model.inner.puzzle_emb.weights.normal_()
    etrm = build(etrm_config(encoder_type="test_puzzle_table", halt_exploration_prob=0.5), 1)
    state = {k: v for k, v in trm.state_dict().items() if "puzzle_emb" not in k}
    state["model.encoder.table"] = trm.model.inner.puzzle_emb.weights.clone()
    etrm.load_state_dict(state)

    b = demo_batch()
    b["demo_inputs"][:, 0, 0] = b["puzzle_identifiers"]
    trm.train()
    etrm.train()
    carry_t, carry_e = trm.initial_carry(b), etrm.initial_carry(b)
    for i in range(4):  # through step 3 (everything halts) and a reload
        torch.manual_seed(10 + i)
        out_t = step(trm, carry_t, b)
        torch.manual_seed(10 + i)
        out_e = step(etrm, carry_e, b)
        carry_t, carry_e = out_t.new_carry, out_e.new_carry
        assert torch.equal(out_t.total(), out_e.total())
        assert torch.equal(out_t.token_loss, out_e.token_loss)
        assert torch.equal(out_t.q_halt_loss, out_e.q_halt_loss)
        assert torch.equal(carry_t.halted, carry_e.halted)
        for key, value in out_t.metrics.items():
            assert torch.equal(value, out_e.metrics[key]), key
    assert carry_t.steps.tolist() == [1, 1, 1, 1]  # step 4 reloaded every row


# ----------------------------------------------------------------------------------------------
# ETRM-FCT
# ----------------------------------------------------------------------------------------------
def test_fct_never_halts_before_num_act_steps_in_training() -> None:
    config = ETRMFCTConfig(name="etrm_fct", **TINY, num_act_steps=2)
    head = build(config)
    assert isinstance(head.model, TRMWithEncoderFCT)
    head.train()
    with torch.no_grad():
        head.model.inner.q_head.bias.fill_(5)  # the Q head says halt everywhere
    b = demo_batch()
    out = step(head, head.initial_carry(b), b)
    assert not out.new_carry.halted.any()
    out = step(head, out.new_carry, b)
    assert out.new_carry.halted.all() and out.new_carry.steps.tolist() == [2, 2, 2, 2]
    head.eval()  # evaluation runs halt_max_steps (3) steps, Q head or not
    carry = head.initial_carry(b)
    with torch.inference_mode():
        for expected in (False, False, True):
            carry = step(head, carry, b).new_carry
            assert bool(carry.halted.all()) is expected


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------
def test_diagnostics_by_hand() -> None:
    # T = 1, D = 2: rows 0, 1 are identical siblings (group 0); row 4 is padding.
    context = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]], [[5.0, 5.0]]])
    groups = torch.tensor([0, 0, 1, 2, 0])
    valid = torch.tensor([True, True, True, True, False])
    d = {k: float(v) for k, v in context_diagnostics(context, groups, valid).items()}
    assert d["encoder/count"] == 4 and d["encoder/context_norm"] == pytest.approx(4.0)
    assert d["encoder/context_std"] == pytest.approx(4 * math.sqrt(0.5))
    # ETRM's cross-sample variance over the 4 valid rows, times 4.
    etrm_var = float(context[:4].var(dim=0, unbiased=False).mean())
    assert d["encoder/cross_sample_var"] == pytest.approx(4 * etrm_var) == pytest.approx(1.75)
    assert d["encoder_same_group/count"] == 2 and d["encoder_same_group/within_var"] == 0
    assert d["encoder_same_group/cosine"] == pytest.approx(2.0)
    assert d["encoder_same_group/nn_retrieval"] == 2
    # Cosines to other groups: rows 0, 1: (0 − 1)/2; row 2: 0; row 3: (−1 − 1 + 0)/3.
    assert d["encoder_cross_group/count"] == 4
    assert d["encoder_cross_group/cosine"] == pytest.approx(-0.5 - 0.5 + 0 - 2 / 3)


def test_nn_retrieval_fails_when_a_stranger_is_nearer() -> None:
    context = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.1]]])
    d = context_diagnostics(context, torch.tensor([0, 0, 1]), torch.ones(3, dtype=torch.bool))
    assert float(d["encoder_same_group/count"]) == 2
    assert float(d["encoder_same_group/nn_retrieval"]) == 0
    # Within-group variance: each sibling is (0.5, 0.5) from the mean in both coordinates.
    assert float(d["encoder_same_group/within_var"]) == pytest.approx(2 * 0.25)


def test_training_outputs_diagnostics_and_evaluation_does_not() -> None:
    head = build(etrm_config())
    b = demo_batch()
    b["demo_mask"][3] = False  # a padding-like row without demos
    head.train()
    out = step(head, head.initial_carry(b), b)
    assert float(out.metrics["encoder/count"]) == 3
    assert float(out.metrics["encoder_same_group/count"]) == 2  # rows 0 and 1 (group 0)
    head.eval()
    with torch.inference_mode():
        out = step(head, head.initial_carry(b), b)
    assert not any(k.startswith("encoder") for k in out.metrics)


# ----------------------------------------------------------------------------------------------
# Family: batch fields, optimizer groups, norm groups, capabilities
# ----------------------------------------------------------------------------------------------
def pretrain_config(*overrides: str) -> PretrainConfig:
    return load_pretrain_config(compose(overrides=[
        "arch=etrm", "arch.encoder_type=test_mean", "+experiment=tiny_cpu",
        "arch.puzzle_emb_len=2", *overrides,
    ]))  # fmt: skip


def test_family_fields_and_capabilities() -> None:
    config = etrm_config()
    family = family_of(config)
    assert isinstance(family, EncoderFamily) and family is FAMILIES.get("encoder")
    assert {"demo_inputs", "demo_labels", "demo_mask", "group_ids"} <= set(family.batch_fields)
    head = family.build(config, DIMS)
    caps = family.capabilities(config, head)
    assert caps.halting and caps.traceable and not caps.sparse_embedding and not caps.kl_loss
    assert not caps.cycle_losses
    variational = etrm_config(encoder_type="test_gaussian")
    assert family.capabilities(variational, family.build(variational, DIMS)).kl_loss
    assert family.puzzle_embedding(head) is None


def test_one_weights_group_without_encoder_lr_scale() -> None:
    config = pretrain_config()
    family = family_of(config.arch)
    head = family.build(config.arch, DIMS)
    groups = family.optimizer_groups(head, freeze_weights=False)
    assert list(groups) == ["weights"] and groups["weights"].kind == "adam_atan2"
    assert {id(t) for t in groups["weights"].tensors} == {id(p) for p in head.parameters()}
    with pytest.raises(ConfigError, match="freeze_weights"):
        family.optimizer_groups(head, freeze_weights=True)


def test_encoder_lr_scale_gives_the_encoder_its_own_optimizer() -> None:
    config = pretrain_config("++encoder_lr_scale=0.1", "weight_decay=0.3", "lr=2e-4")
    family = family_of(config.arch)
    head = family.build(config.arch, DIMS)
    groups = family.optimizer_groups(head, False, encoder_lr_scale=config.encoder_lr_scale)
    assert list(groups) == ["weights", "encoder"]
    enc_ids = {id(p) for p in head.model.encoder.parameters()}
    assert {id(t) for t in groups["encoder"].tensors} == enc_ids
    all_ids = [id(t) for g in groups.values() for t in g.tensors]
    assert sorted(all_ids) == sorted(id(p) for p in head.parameters())  # each exactly once
    assert groups["encoder"].lr_scale == 0.1 and groups["encoder"].weight_decay_scale == 0.1
    optimizers = build_optimizers(groups, config, world_size=1)
    assert optimizers["encoder"].base_lr == pytest.approx(2e-5)
    assert optimizers["weights"].base_lr == pytest.approx(2e-4)
    assert optimizers["encoder"].optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.03)
    assert optimizers["weights"].optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.3)


def test_norm_groups_split_encoder_and_decoder() -> None:
    head = build(etrm_config())
    groups = EncoderFamily().norm_groups(head)
    assert list(groups) == ["encoder", "decoder"]
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in head.model.encoder.parameters()}
    assert len(groups["encoder"]) + len(groups["decoder"]) == len(list(head.parameters()))
    assert FAMILIES.get("recursive").norm_groups(head) == {}


# ----------------------------------------------------------------------------------------------
# ETRM checkpoints load: the key list of ETRM's own TRMWithEncoder
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def etrm_golden() -> dict:
    return json.loads((FIXTURES / "etrm_model_keys.json").read_text())


def unpack(entry: dict) -> torch.Tensor:
    raw = bytearray(base64.b64decode(entry["data"]))
    return torch.frombuffer(raw, dtype=getattr(torch, entry["dtype"])).reshape(entry["shape"])


def golden_head(golden: dict) -> nn.Module:
    config = ETRMConfig(name="etrm", **golden["config"])
    run = golden["reference_run"]
    dims = ModelDims(batch_size=3, seq_len=run["seq_len"], vocab_size=run["vocab_size"],
                     num_puzzle_identifiers=1)  # fmt: skip
    torch.manual_seed(0)
    return family_of(config).build(config, dims)


def test_state_dict_keys_equal_etrms(etrm_golden: dict) -> None:
    head = golden_head(etrm_golden)
    ours = {k: list(v.shape) for k, v in sorted(head.state_dict().items())}
    assert ours == etrm_golden["keys"]


def test_etrm_weights_give_etrms_evaluation_outputs(etrm_golden: dict) -> None:
    """ETRM's own model, its weights loaded into ours: the same logits at every eval step."""
    run = etrm_golden["reference_run"]
    head = golden_head(etrm_golden)
    state = {k: unpack(v) for k, v in run["state_dict"].items()}
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    batch = {k: unpack(v) for k, v in run["batch"].items()}
    logits, q_halt = unpack(run["logits"]), unpack(run["q_halt_logits"])
    head.eval()
    carry = head.initial_carry(batch)
    with torch.inference_mode():
        for s in range(logits.shape[0]):
            out = step(head, carry, batch, ("logits", "q_halt_logits"))
            carry = out.new_carry
            torch.testing.assert_close(out.outputs["logits"], logits[s], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.outputs["q_halt_logits"], q_halt[s], rtol=1e-4,
                                       atol=1e-5)  # fmt: skip
    assert bool(carry.halted.all())


@pytest.mark.parametrize("encoder_type", ["standard", "hybrid_variational"])
def test_jacobian_descent_is_refused_in_one_line(encoder_type: str) -> None:
    from training.strategies import build_strategy

    overrides = ["+experiment=tiny_cpu", "arch=etrm", f"arch.encoder_type={encoder_type}",
                 "objective=lm_loss_vs_q_halt_loss"]  # fmt: skip
    config = load_pretrain_config(compose(overrides=overrides))
    family = family_of(config.arch)
    head = family.build(config.arch, DIMS)
    capabilities = family.capabilities(config.arch, head)
    assert not capabilities.jacobian_descent and not capabilities.per_sample_layers
    with pytest.raises(ConfigError) as info:
        build_strategy(config, head, family, capabilities)
    message = str(info.value)
    assert "\n" not in message and "use objective=sum" in message
