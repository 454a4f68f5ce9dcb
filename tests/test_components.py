"""The training side's components: model families, step strategies, the self-saving train state
(and its checkpoint migration), the rollout, user errors and the import layering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import pretrain
from models.arch_config import ARCH_CONFIGS
from models.encoders.base import DemoEncoder
from models.family import FAMILIES, family_of
from models.per_sample import uncollected_parameters
from models.recursive_reasoning.common import ModelDims
from models.sparse_embedding import CastedSparseEmbedding
from tests.conftest import model_batch
from tests.test_training import make_config, metric_lines, train
from training.rollout import rollout
from training.strategies import STEP_STRATEGIES, strategy_name
from utils import checkpoint as ckpt
from utils.config import compose
from utils.schema import ConfigError, UserError

REPO = Path(__file__).resolve().parent.parent
DIMS = ModelDims(batch_size=3, seq_len=10, vocab_size=6, num_puzzle_identifiers=5)


def arch(name: str, *overrides: str):
    from training.config import load_pretrain_config

    cfg = compose(overrides=["+experiment=tiny_cpu", f"arch={name}", *overrides])
    return load_pretrain_config(cfg).arch


# ----------------------------------------------------------------------------------------------
# Model families
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCH_CONFIGS.names())
def test_every_architecture_has_a_family_that_builds_it(name: str) -> None:
    config = arch(name)
    family = family_of(config)
    assert family is FAMILIES.get(config.family)
    head = family.build(config, DIMS)
    assert sorted(head.state_dict())[0].startswith("model.")
    caps = family.capabilities(config, head)
    assert caps.halting == (name != "trmjd")  # trmjd has no Q head by default
    assert caps.cycle_losses == (name == "trmjd")
    assert caps.traceable
    # A puzzle table exactly where the config asks for one (the encoder family sets 0).
    has_table = any(isinstance(m, CastedSparseEmbedding) for m in head.modules())
    assert caps.sparse_embedding == has_table == (config.puzzle_emb_ndim > 0)
    assert caps.kl_loss == config.has_kl_loss
    # Every weight outside a demonstration encoder is a Casted layer's; only an encoder may
    # hold others (learned query tokens, norm scales). An encoder model never claims
    # per-sample layers (its packed demo batch is not the sample axis) nor Jacobian descent.
    uncollected = list(uncollected_parameters(head))
    assert all(n.startswith("model.encoder.") for n in uncollected), uncollected
    has_encoder = any(n.startswith("model.encoder.") for n in head.state_dict())
    assert caps.per_sample_layers == (uncollected == [] and not has_encoder)
    assert caps.jacobian_descent == (not has_encoder)


@pytest.mark.parametrize("name", ARCH_CONFIGS.names())
def test_optimizer_groups_cover_every_trainable_tensor_once(name: str) -> None:
    config = arch(name)
    family = family_of(config)
    head = family.build(config, DIMS)
    groups = family.optimizer_groups(head, freeze_weights=False)
    params = {id(p) for p in head.parameters()}
    if family.capabilities(config, head).sparse_embedding:
        assert list(groups) == ["puzzle_emb", "weights"]
        assert groups["puzzle_emb"].kind == "sign_sgd"
        table = next(m for m in head.modules() if isinstance(m, CastedSparseEmbedding))
        assert {id(t) for t in groups["puzzle_emb"].tensors} == {id(b) for b in table.buffers()}
    else:
        assert list(groups) == ["weights"]
    assert groups["weights"].kind == "adam_atan2"
    assert [id(t) for t in groups["weights"].tensors] == [id(p) for p in head.parameters()]

    # With its own learning-rate scale, a demonstration encoder gets a second optimizer.
    encoders = [m for m in head.modules() if isinstance(m, DemoEncoder)]
    if not encoders:
        with pytest.raises(ConfigError, match="encoder_lr_scale applies to models with"):
            family.optimizer_groups(head, freeze_weights=False, encoder_lr_scale=0.5)
        return
    groups = family.optimizer_groups(head, freeze_weights=False, encoder_lr_scale=0.5)
    assert list(groups) == ["weights", "encoder"]
    encoder = {id(p) for p in encoders[0].parameters()}
    named = {id(p): n for n, p in head.named_parameters()}
    assert encoder and all(named[i].startswith("model.encoder.") for i in encoder)
    by_group = {k: [id(t) for t in g.tensors] for k, g in groups.items()}
    assert set(by_group["encoder"]) == encoder and len(by_group["encoder"]) == len(encoder)
    assert set(by_group["weights"]) == params - encoder
    assert len(by_group["weights"]) + len(encoder) == len(params)
    assert groups["encoder"].kind == "adam_atan2" and groups["encoder"].lr_scale == 0.5
    assert groups["weights"].lr_scale == 1.0


def test_frozen_weights_leave_only_the_puzzle_table() -> None:
    config = arch("trm")
    family = family_of(config)
    head = family.build(config, DIMS)
    groups = family.optimizer_groups(head, freeze_weights=True)
    assert list(groups) == ["puzzle_emb"]
    assert not any(p.requires_grad for p in head.parameters())


def test_without_puzzle_embedding_there_is_no_table_group() -> None:
    config = arch("trm", "arch.puzzle_emb_ndim=0")
    family = family_of(config)
    head = family.build(config, DIMS)
    assert list(family.optimizer_groups(head, freeze_weights=False)) == ["weights"]
    assert not family.capabilities(config, head).sparse_embedding
    with pytest.raises(UserError, match="freeze_weights trains only the puzzle embedding"):
        family.optimizer_groups(head, freeze_weights=True)


def test_the_loader_yields_exactly_the_family_batch_fields(arc_data: Path, tmp_path: Path) -> None:
    from training.data import create_dataloader
    from utils.distributed import DistInfo

    config = make_config(arc_data, tmp_path)
    _, data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    _, batch, _ = next(iter(data))
    assert tuple(batch) == family_of(config.arch).batch_fields


# ----------------------------------------------------------------------------------------------
# Step strategies
# ----------------------------------------------------------------------------------------------
def test_strategies_are_chosen_from_the_objective(arc_data: Path, tmp_path: Path) -> None:
    assert STEP_STRATEGIES.names() == [
        "fixed_computation_time",
        "gradient_descent",
        "jacobian_descent",
    ]
    assert strategy_name(make_config(arc_data, tmp_path)) == "gradient_descent"
    jd = make_config(arc_data, tmp_path, "objective=iwrm_with_q_halt_in")
    assert strategy_name(jd) == "jacobian_descent"
    # The architecture fixes N optimizer steps per batch (ETRM-FCT's arch.num_act_steps).
    assert strategy_name(make_config(arc_data, tmp_path, "arch=etrm")) == "gradient_descent"
    fct = make_config(arc_data, tmp_path, "arch=etrm_fct")
    assert fct.arch.optimizer_steps_per_batch == 4
    assert strategy_name(fct) == "fixed_computation_time"
    assert STEP_STRATEGIES.get("gradient_descent").compiles
    assert STEP_STRATEGIES.get("fixed_computation_time").compiles
    assert not STEP_STRATEGIES.get("jacobian_descent").compiles  # per-sample hooks run eagerly


# ----------------------------------------------------------------------------------------------
# Train state and checkpoints
# ----------------------------------------------------------------------------------------------
def test_checkpoints_key_optimizers_by_group_name(arc_data: Path, tmp_path: Path) -> None:
    train(make_config(arc_data, tmp_path, "max_steps=1"))
    state = torch.load(tmp_path / "step_1" / ckpt.TRAIN_FILE, weights_only=True)
    assert list(state["optimizers"]) == ["puzzle_emb", "weights"]
    assert state["progress"] == {"step": 1, "iteration": 0, "batches_in_iteration": 1}
    meta = json.loads((tmp_path / "step_1" / ckpt.META_FILE).read_text())
    assert meta["format_version"] == ckpt.FORMAT_VERSION == 2


def _downgrade_to_format_1(folder: Path) -> None:
    """Rewrite a format-2 checkpoint as the previous release wrote it."""
    train_file = folder / ckpt.TRAIN_FILE
    state = torch.load(train_file, weights_only=True)
    old = {
        "optimizers": list(state["optimizers"].values()),  # build order: puzzle_emb, weights
        **state["progress"],
        "data": state["data"],
    }
    torch.save(old, train_file)
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    (folder / ckpt.META_FILE).write_text(json.dumps({**meta, "format_version": 1}))


def test_a_format_1_checkpoint_resumes_bit_identically(arc_data: Path, tmp_path: Path) -> None:
    train(make_config(arc_data, tmp_path / "a", "max_steps=4", "ema=True"))
    train(make_config(arc_data, tmp_path / "b", "max_steps=2", "ema=True"))
    _downgrade_to_format_1(tmp_path / "b" / "step_2")
    train(make_config(arc_data, tmp_path / "b", "max_steps=4", "ema=True", "resume=auto"))
    a = [m for m in metric_lines(tmp_path / "a") if "train/lm_loss" in m]
    b = [m for m in metric_lines(tmp_path / "b") if "train/lm_loss" in m]
    assert a == b
    wa = torch.load(tmp_path / "a/step_4/model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b/step_4/model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_format_1_checkpoint_with_other_optimizers_is_refused(
    arc_data: Path,
    tmp_path: Path,
) -> None:
    train(make_config(arc_data, tmp_path, "max_steps=1"))
    _downgrade_to_format_1(tmp_path / "step_1")
    config = make_config(arc_data, tmp_path, "max_steps=2", "resume=auto", "freeze_weights=True")
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"2 optimizers saved, the run has 1"):
        train(config)


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trm", "hrm", "transformers_baseline", "etrm", "etrmtrm"])
def test_rollout_runs_every_step_and_marks_each_slot_halted_once(name: str) -> None:
    config = arch(name, "arch.halt_max_steps=3")
    head = family_of(config).build(config, DIMS).eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(0, DIMS.vocab_size, (3, DIMS.seq_len), generator=g),
        "labels": torch.randint(0, DIMS.vocab_size, (3, DIMS.seq_len), generator=g),
        "puzzle_identifiers": torch.tensor([1, 2, 3]),
    }
    batch = model_batch(name, {k: v.to(torch.int32) for k, v in batch.items()}, DIMS.vocab_size)
    with torch.no_grad():
        steps = list(rollout(head, batch, return_keys=["q_halt_logits"]))
        # The same loop written out: three supervision steps from the initial carry.
        carry = head.initial_carry(batch)
        by_hand = []
        for _ in range(3):
            out = head(carry=carry, batch=batch, return_keys=["q_halt_logits"])
            carry = out.new_carry
            by_hand.append(out.outputs["preds"])
    assert [s.index for s in steps] == [0, 1, 2]  # evaluation halts only at halt_max_steps
    assert [int(s.newly_halted.sum()) for s in steps] == [0, 0, 3]
    assert bool(steps[-1].done.all()) and not bool(steps[1].done.any())
    for step, preds in zip(steps, by_hand, strict=True):
        assert torch.equal(step.out.outputs["preds"], preds)
        assert "q_halt_logits" in step.out.outputs


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = compose(overrides=["+experiment=tiny_cpu", f"data_paths=[{tmp_path / 'missing'}]",
                             "logger=none", f"+checkpoint_path={tmp_path / 'run'}"])  # fmt: skip
    run_main = pretrain.main.__wrapped__  # the function under @hydra.main
    with pytest.raises(SystemExit) as exit_info:
        run_main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]

    def bug(*_: object) -> None:
        raise ValueError("an internal bug")

    monkeypatch.setattr(pretrain, "launch", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        run_main(cfg)


# ----------------------------------------------------------------------------------------------
# Layering
# ----------------------------------------------------------------------------------------------
# Package → packages it must not import (each layer imports only those below it).
FORBIDDEN = {
    "utils": {"models", "dataset", "evaluators", "training"},
    "dataset": {"models", "evaluators", "training"},
    "models": {"evaluators", "training"},
    "evaluators": {"models", "training"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downward(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_step_strategy_can_be_named_and_is_checked(arc_data: Path, tmp_path: Path) -> None:
    named = make_config(arc_data, tmp_path, "objective=iwrm_with_q_halt_in",
                        "step_strategy=jacobian_descent")  # fmt: skip
    assert strategy_name(named) == "jacobian_descent"
    with pytest.raises(UserError, match="step_strategy: unknown step strategy 'newton'"):
        strategy_name(make_config(arc_data, tmp_path, "step_strategy=newton"))
    ignoring = make_config(arc_data, tmp_path, "objective=iwrm_with_q_halt_in",
                           "step_strategy=gradient_descent")  # fmt: skip
    with pytest.raises(UserError, match="would ignore objective 'iwrm_with_q_halt_in'"):
        strategy_name(ignoring)


def test_an_unknown_sampler_is_one_user_error(arc_data: Path, tmp_path: Path) -> None:
    config = make_config(arc_data, tmp_path, "sampler=weighted", "max_steps=1")
    with pytest.raises(UserError, match="sampler: unknown sampler 'weighted'; choose one of"):
        train(config)


def test_naming_the_uniform_sampler_changes_nothing(arc_data: Path, tmp_path: Path) -> None:
    train(make_config(arc_data, tmp_path / "a", "max_steps=2"))
    train(make_config(arc_data, tmp_path / "b", "max_steps=2", "sampler=uniform"))
    strip = lambda run: [m for m in metric_lines(run) if "train/lm_loss" in m]  # noqa: E731
    assert strip(tmp_path / "a") == strip(tmp_path / "b")
