"""Every registered architecture: forward/backward, parameter counts, checkpoint keys.

Golden state-dict keys and shapes live in tests/golden/state_dict_keys.json, generated at the
paper's ARC config. Regenerate deliberately with
``TRM_REGEN_GOLDEN=1 pytest tests/test_architectures.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from models.arch_config import ARCH_CONFIGS
from models.family import family_of
from models.losses import ACTLossHead, LossOutput
from models.recursive_reasoning.common import ModelDims
from models.recursive_reasoning.recording import record_steps
from models.registry import MODELS, build_loss_head, describe_model
from models.sparse_embedding import CastedSparseEmbedding
from tests.conftest import model_batch
from training.config import load_pretrain_config
from utils.checkpoint import CheckpointMismatchError, load_model_weights, read_state_dict
from utils.config import compose

GOLDEN = Path(__file__).parent / "golden" / "state_dict_keys.json"
ARCHS = ARCH_CONFIGS.names()
ARC_DIMS = ModelDims(batch_size=2, seq_len=900, vocab_size=12, num_puzzle_identifiers=10)
TINY_DIMS = ModelDims(batch_size=3, seq_len=10, vocab_size=6, num_puzzle_identifiers=5)


def arch_config(arch: str, *overrides: str):
    return load_pretrain_config(compose(overrides=[f"arch={arch}", *overrides])).arch


def tiny_head(arch: str, *overrides: str, dims: ModelDims = TINY_DIMS) -> ACTLossHead:
    torch.manual_seed(0)
    config = arch_config(arch, "+experiment=tiny_cpu", *overrides)
    return family_of(config).build(config, dims)


def tiny_batch(arch: str, dims: ModelDims = TINY_DIMS) -> dict[str, torch.Tensor]:
    """The fields ``arch``'s family reads (demonstrations too, for the encoder family)."""
    g = torch.Generator().manual_seed(1)
    shape = (dims.batch_size, dims.seq_len)
    labels = torch.randint(0, dims.vocab_size, shape, generator=g, dtype=torch.int32)
    labels[:, -2:] = -100
    base = {
        "inputs": torch.randint(0, dims.vocab_size, shape, generator=g, dtype=torch.int32),
        "labels": labels,
        "puzzle_identifiers": torch.randint(1, dims.num_puzzle_identifiers, (dims.batch_size,),
                                            generator=g, dtype=torch.int32),
    }  # fmt: skip
    return model_batch(arch, base, dims.vocab_size)


def test_registry_has_a_model_for_every_config() -> None:
    assert MODELS.names() == ARCHS


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch: str, dtype: str, device: torch.device) -> None:
    head = tiny_head(arch, f"arch.forward_dtype={dtype}").to(device)
    head.train()
    b = {k: v.to(device) for k, v in tiny_batch(arch).items()}
    carry = head.initial_carry(b)
    for _ in range(2):
        out = head(carry=carry, batch=b, return_keys=["logits"])
        assert isinstance(out, LossOutput)
        loss = out.total()
        assert torch.isfinite(loss)
        loss.backward()
        carry = out.new_carry
    assert out.outputs["logits"].dtype == getattr(torch, dtype)
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lm_head" in n)
    config = head.model.config
    family = family_of(config)
    tables = [m for m in head.modules() if isinstance(m, CastedSparseEmbedding)]
    if family.capabilities(config, head).sparse_embedding:
        # The puzzle embedding's gradient lands on the batch-sized local buffer.
        assert head.model.inner.puzzle_emb.local_weights.grad is not None
    else:
        assert tables == []
    # Every part whose norm is logged apart (the encoder family: encoder, decoder) learns.
    for part, params in family.norm_groups(head).items():
        assert params and any(p.grad.abs().sum() > 0 for p in params), part


@pytest.mark.parametrize("arch", ARCHS)
def test_recording_sees_every_latent_update(arch: str) -> None:
    head = tiny_head(arch)
    cfg = head.model.config
    b = tiny_batch(arch)
    with record_steps(head, latents=True) as rec:
        out = head(carry=head.initial_carry(b), batch=b)
        head(carry=out.new_carry, batch=b)
    assert len(rec.act_steps) == 2
    n = len(rec.act_steps[0])
    expected = {
        "trm": cfg.H_cycles * (cfg.L_cycles + 1),
        "trm_singlez": cfg.H_cycles * (cfg.L_cycles + 1),
        "trm_hier6": cfg.H_cycles * (cfg.L_cycles + 1),
        "trmjd": cfg.H_cycles * (cfg.L_cycles + 1),
        "hrm": cfg.H_cycles * (cfg.L_cycles + 1),
        "transformers_baseline": 1,
        # The encoder family records its decoder, TRM's inner model, not the encoder.
        "etrm": cfg.H_cycles * (cfg.L_cycles + 1),
        "etrm_fct": cfg.H_cycles * (cfg.L_cycles + 1),
        "etrmtrm": cfg.H_cycles * (cfg.L_cycles + 1),
    }[arch]
    assert n == expected
    last = rec.act_steps[0][-1]
    assert not last.value.requires_grad
    # The recorded final latent is the one carried to the next step.
    carried = out.new_carry.inner_carry["z_H" if arch != "trm_singlez" else "z_L"]
    torch.testing.assert_close(last.value, carried)


@pytest.mark.parametrize("arch", ARCHS)
def test_recording_keeps_the_rows_asked_for_and_decodes_them_with_the_lm_head(arch: str) -> None:
    head = tiny_head(arch)
    head.eval()
    inner = head.model.inner
    b = tiny_batch(arch)
    rows = torch.tensor([2, 0])
    with record_steps(head, rows=rows) as decoded:  # the defaults: decode, no latents
        head(carry=head.initial_carry(b), batch=b)
    with record_steps(head, latents=True, decode=False) as kept:
        head(carry=head.initial_carry(b), batch=b)
    assert len(decoded.act_steps[0]) == len(kept.act_steps[0]) > 0
    B, S, D = TINY_DIMS.batch_size, TINY_DIMS.seq_len, inner.config.hidden_size
    for d, k in zip(decoded.act_steps[0], kept.act_steps[0], strict=True):
        assert (d.name, d.h_cycle, d.l_step) == (k.name, k.h_cycle, k.l_step)
        assert d.value is None and k.preds is None
        assert k.value is not None and k.value.shape == (B, inner.total_seq_len, D)
        assert d.preds is not None and d.preds.shape == (len(rows), S)
        assert d.preds.dtype == torch.int64 and not d.preds.requires_grad
        with torch.no_grad():
            expected = inner.lm_logits(k.value[rows]).argmax(-1)
        assert torch.equal(d.preds, expected)
    with record_steps(head, rows=rows, latents=True) as both:
        head(carry=head.initial_carry(b), batch=b)
    for r, k in zip(both.act_steps[0], kept.act_steps[0], strict=True):
        assert r.value is not None and r.value.shape == (len(rows), inner.total_seq_len, D)
        assert torch.equal(r.value, k.value[rows])


@pytest.mark.parametrize("arch", ARCHS)
def test_recording_changes_neither_outputs_nor_gradients(arch: str) -> None:
    """Two training steps (dropout, exploration, the bootstrapped target) with and without a
    recorder that keeps and decodes latents: bit-identical losses, outputs, carry and grads."""

    def run(record: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        head = tiny_head(arch)
        head.train()
        b = tiny_batch(arch)
        torch.manual_seed(5)
        values: list[torch.Tensor] = []
        with contextlib.ExitStack() as stack:
            if record:
                stack.enter_context(record_steps(head, rows=torch.tensor([1]), latents=True))
            carry = head.initial_carry(b)
            for _ in range(2):
                out = head(carry=carry, batch=b, return_keys=["logits", "q_halt_logits"])
                out.total().backward()
                carry = out.new_carry
                values += [out.token_loss, out.q_halt_loss, *out.outputs.values()]
                values += [*carry.inner_carry.values(), carry.steps, carry.halted]
                values += list(carry.current_data.values())  # the encoder family's state too
                if out.q_continue_loss is not None:
                    values.append(out.q_continue_loss)
        grads = {n: p.grad for n, p in head.named_parameters() if p.grad is not None}
        return values, grads

    plain, plain_grads = run(record=False)
    recorded, recorded_grads = run(record=True)
    assert len(plain) == len(recorded)
    for a, c in zip(plain, recorded, strict=True):
        assert torch.equal(a.detach(), c.detach())
    assert plain_grads.keys() == recorded_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        assert torch.equal(g, recorded_grads[name]), name


def test_recording_refuses_rows_that_are_not_indices() -> None:
    head = tiny_head("trm")
    for rows in (torch.tensor([True, False, True]), torch.tensor([[0]]), torch.tensor([0.0])):
        with pytest.raises(ValueError, match="1-D integer index tensor"), record_steps(head, rows):
            pass


def test_hrm_takes_a_one_step_gradient() -> None:
    head = tiny_head("hrm")
    inner = head.model.inner
    flags: list[tuple[str, bool]] = []
    inner.L_level.register_forward_hook(lambda *_: flags.append(("L", torch.is_grad_enabled())))
    inner.H_level.register_forward_hook(lambda *_: flags.append(("H", torch.is_grad_enabled())))
    head.eval()
    b = tiny_batch("hrm")
    head(carry=head.initial_carry(b), batch=b)
    H, L = head.model.config.H_cycles, head.model.config.L_cycles
    assert [f for f in flags if f[1]] == [("L", True), ("H", True)]
    assert sum(1 for f in flags if f[0] == "L") == H * L
    assert sum(1 for f in flags if f[0] == "H") == H


def test_baseline_halts_only_with_act_and_reports_actual_steps() -> None:
    head = tiny_head("transformers_baseline", "arch.act_inference=True")
    head.eval()
    with torch.no_grad():
        head.model.inner.q_head.bias.copy_(torch.tensor([1.0, 0.0]))
    b = tiny_batch("transformers_baseline")
    out = head(carry=head.initial_carry(b), batch=b, return_keys=["actual_steps"])
    assert out.new_carry.halted.all()
    assert out.outputs["actual_steps"].tolist() == [1.0] * 3
    head = tiny_head("transformers_baseline")
    head.eval()
    out = head(carry=head.initial_carry(b), batch=b)
    assert not out.new_carry.halted.any()  # act_inference off: every step runs


@pytest.mark.parametrize(
    ("arch", "overrides", "dims", "expected"),
    [
        ("trm", [], ARC_DIMS, 6_829_058),  # paper's "7M", ARC attention config
        ("trm", ["arch.mlp_t=True", "arch.pos_encodings=none"], ARC_DIMS, 18_801_666),
        ("trm", ["arch.mlp_t=True", "arch.pos_encodings=none"],
         ModelDims(2, 81, 11, 2), 5_028_866),  # Sudoku MLP, the paper's "5M"
        ("hrm", [], ARC_DIMS, 27_276_290),
    ],
)  # fmt: skip
def test_parameter_counts(arch: str, overrides: list[str], dims: ModelDims, expected: int) -> None:
    head = build_loss_head(arch_config(arch, *overrides), dims)
    info = describe_model(head)
    assert info["num_params"] == expected
    assert info["puzzle_emb_rows"] == dims.num_puzzle_identifiers
    assert info["puzzle_emb_bytes"] == dims.num_puzzle_identifiers * 512 * 4


def _key_shapes(arch: str) -> dict[str, list[int]]:
    head = build_loss_head(arch_config(arch), ARC_DIMS)
    return {k: list(v.shape) for k, v in head.state_dict().items()}


# The encoder family's keys are ETRM's, guarded against the key lists its own code produces:
# tests/test_etrm_model.py::test_state_dict_keys_equal_etrms (etrm) and
# tests/test_recurrent_encoders.py::test_state_dict_keys_and_shapes_equal_etrms (etrmtrm);
# etrm_fct's equal etrm's (test_etrm_fct_keys_are_etrms).
GOLDEN_ARCHS = [a for a in ARCHS if ARCH_CONFIGS.get(a).family != "encoder"]


def test_golden_state_dict_keys() -> None:
    current = {arch: _key_shapes(arch) for arch in GOLDEN_ARCHS}
    if os.environ.get("TRM_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        lines = [
            f'  "{arch}": {{\n' + ",\n".join(
                f'    "{key}": {json.dumps(shape)}' for key, shape in sorted(current[arch].items())
            ) + "\n  }"
            for arch in sorted(current)
        ]  # fmt: skip
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(current)
    for arch in GOLDEN_ARCHS:
        assert current[arch] == golden[arch], f"{arch}: state-dict keys or shapes changed"


def test_etrm_fct_keys_are_etrms() -> None:
    """ETRM-FCT changes only the training loop: its checkpoints are ETRM's."""
    fct = _key_shapes("etrm_fct")
    assert fct == _key_shapes("etrm")
    assert any(k.startswith("model.encoder.") for k in fct)
    assert not any("puzzle_emb" in k for k in fct)


def test_trm_keys_are_upstreams() -> None:
    """Written out by hand from the original code's module tree."""
    per_layer = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_up_proj.weight", "mlp.down_proj.weight"]  # fmt: skip
    expected = {
        "model.inner.H_init": [512],
        "model.inner.L_init": [512],
        "model.inner.embed_tokens.embedding_weight": [12, 512],
        "model.inner.lm_head.weight": [12, 512],
        "model.inner.q_head.weight": [2, 512],
        "model.inner.q_head.bias": [2],
        "model.inner.puzzle_emb.weights": [10, 512],
    }
    shapes = [[1536, 512], [512, 512], [3072, 512], [512, 1536]]
    for i in range(2):
        for name, shape in zip(per_layer, shapes, strict=True):
            expected[f"model.inner.L_level.layers.{i}.{name}"] = shape
    assert _key_shapes("trm") == expected
    hier6 = _key_shapes("trm_hier6")
    assert {k for k in hier6 if k.endswith("_init")} == {
        "model.inner.H_init",
        *(f"model.inner.L{i}_init" for i in range(1, 7)),
    }
    assert "model.inner.H_init" not in _key_shapes("trm_singlez")
    base = _key_shapes("transformers_baseline")
    assert base["model.inner.H_level.layers.7.self_attn.o_proj.weight"] == [512, 504]


def test_upstream_state_dict_round_trips(tmp_path: Path) -> None:
    """An upstream ``step_N`` file (compiled: ``_orig_mod.`` keys) loads with strict matching."""
    src = tiny_head("trm")
    with torch.no_grad():
        src.model.inner.puzzle_emb.weights.normal_()
    path = tmp_path / "step_100"
    torch.save({f"_orig_mod.{k}": v for k, v in src.state_dict().items()}, path)
    dst = tiny_head("trm")
    load_model_weights(dst, read_state_dict(path), source=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_puzzle_embedding_resizes_to_the_mean_and_other_mismatches_fail(tmp_path: Path) -> None:
    src = tiny_head("trm")
    with torch.no_grad():
        src.model.inner.puzzle_emb.weights.normal_()
    state = src.state_dict()
    bigger = ModelDims(TINY_DIMS.batch_size, TINY_DIMS.seq_len, TINY_DIMS.vocab_size, 9)
    dst = tiny_head("trm", dims=bigger)
    load_model_weights(dst, state)
    table = dst.model.inner.puzzle_emb.weights
    assert table.shape[0] == 9
    torch.testing.assert_close(table, state["model.inner.puzzle_emb.weights"].mean(0).expand(9, -1))
    with pytest.raises(CheckpointMismatchError, match=r"puzzle_emb\.weights has shape"):
        load_model_weights(tiny_head("trm", dims=bigger), state, resize_puzzle_emb=False)
    with pytest.raises(CheckpointMismatchError, match=r"keys do not match .*L_level\.layers\.1"):
        load_model_weights(tiny_head("trm", "arch.L_layers=2"), state)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"embedding_weight has shape \(6, 64\), the model expects \(7, 64\)",
    ):
        wrong_vocab = ModelDims(TINY_DIMS.batch_size, TINY_DIMS.seq_len, 7, 5)
        load_model_weights(tiny_head("trm", dims=wrong_vocab), state)
    (tmp_path / "junk").write_text("not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="junk: not a readable state dict"):
        read_state_dict(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="missing: checkpoint file not found"):
        read_state_dict(tmp_path / "missing")


def test_a_trm_checkpoint_loads_into_trmjd_for_fine_tuning() -> None:
    """The fork fine-tunes TRM checkpoints with arch=trmjd: its Q head is dropped and the
    no-ACT model keeps its own output_logits_init."""
    src = tiny_head("trm")
    dst = tiny_head("trmjd")
    before = dst.model.inner.output_logits_init.clone()
    load_model_weights(dst, src.state_dict())
    assert torch.equal(dst.model.inner.output_logits_init, before)
    for key, value in src.state_dict().items():
        if ".q_head." not in key:
            assert torch.equal(dst.state_dict()[key], value), key
