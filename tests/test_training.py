"""The training loop end to end on CPU: every architecture, resume, checkpoints, evaluation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import build_sudoku_dataset
from dataset.common import run_cli
from evaluate import EvaluateConfig
from evaluate import run as run_evaluate
from evaluators.base import build_evaluators
from models import losses
from models.arch_config import ARCH_CONFIGS
from tests.conftest import reads_demos
from training.config import PretrainConfig, load_pretrain_config
from training.loop import NonFiniteLossError, RunOutcome, run_training
from training.objectives import MODES
from utils import checkpoint as ckpt
from utils.config import ConfigError, compose
from utils.distributed import DistInfo
from utils.logging import build_logger

REPO = Path(__file__).resolve().parent.parent
FAST = [
    "+experiment=tiny_cpu",
    "logger=none",
    "data_workers=0",
    "global_batch_size=8",
    "arch.hidden_size=32",
    "arch.H_cycles=2",
    "arch.L_cycles=1",
    "arch.halt_max_steps=2",
    "lr_warmup_steps=2",
]


@pytest.fixture(scope="module")
def sudoku_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "sudoku"
    argv = ["--generate", "24", "--generate-test", "8", "--output-dir", str(out)]
    assert run_cli(build_sudoku_dataset.main, argv) == 0
    return out


def make_config(data: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_pretrain_config(
        compose(
            overrides=[*FAST, f"data_paths=[{data}]", f"+checkpoint_path={run_dir}", *overrides]
        )
    )


def train(config: PretrainConfig) -> RunOutcome:
    logger = build_logger(
        "none", project="p", run_name="r", config={}, run_dir=config.checkpoint_path, is_main=True
    )
    return run_training(
        config,
        DistInfo(),
        logger=logger,
        evaluators_factory=lambda data: build_evaluators(
            config.evaluators, data.config.dataset_paths, data.identifier_offsets
        ),
    )


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ARCH_CONFIGS.names())
def test_every_architecture_trains_and_evaluates(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    overrides = [f"arch={arch}"]
    if reads_demos(arch):
        # Strict-split data (unseen evaluation tasks), every demo pair a query (its 3 training
        # tasks have few test pairs); one encoder layer, 2 demos, batches of 4 and 1 evaluation
        # task keep the encoder's 1800-token demo pairs cheap on a CPU.
        overrides += ["max_demos=2", "target_policy=leave_one_out", "arch.encoder_num_layers=1",
                      "global_batch_size=4", "max_eval_groups=1"]  # fmt: skip
        if "num_act_steps" in ARCH_CONFIGS.get(arch).model_fields:
            overrides.append("arch.num_act_steps=2")
    data = request.getfixturevalue("strict_arc_data" if reads_demos(arch) else "arc_data")
    # Three batches; ETRM-FCT takes N optimizer steps on each and logs its last.
    n = make_config(data, tmp_path, *overrides).arch.optimizer_steps_per_batch or 1
    config = make_config(data, tmp_path, *overrides, f"max_steps={3 * n}")
    outcome = train(config)
    assert outcome.steps == 3 * n
    assert outcome.last_checkpoint == tmp_path / f"step_{3 * n}"
    assert "ARC/pass@2" in outcome.eval_metrics and "all/exact_accuracy" in outcome.eval_metrics
    train_lines = [m for m in metric_lines(tmp_path) if "train/lm_loss" in m]
    assert [m["step"] for m in train_lines] == [n, 2 * n, 3 * n]
    assert all(torch.isfinite(torch.tensor(m["train/lm_loss"])) for m in train_lines)
    assert (tmp_path / f"eval_step_{3 * n}" / "submission.json").is_file()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_objective_mode_trains(mode: str, arc_data: Path, tmp_path: Path) -> None:
    extra = ["arch=trmjd"] if MODES[mode].get("internal") else []
    if "pixel" in MODES[mode].get("keep", []):
        extra.append("objective.groups=4")  # 900 pixels (× samples) are grouped
    config = make_config(arc_data, tmp_path, f"objective={mode}", "max_steps=2",
                         "evaluators=[]", *extra)  # fmt: skip
    outcome = train(config)
    assert outcome.steps == 2
    lines = [m for m in metric_lines(tmp_path) if "train/lm_loss" in m]
    assert len(lines) == 2 and all(math.isfinite(m["train/lm_loss"]) for m in lines)
    if mode == "sum":  # gradient descent: upstream's path, no Jacobian descent at all
        assert not any(k.startswith("jd/") for k in lines[-1])
        return
    m = lines[-1]["jd/num_objectives"]
    assert m >= 1
    if m > 1:  # UPGrad (the default) never increases an objective to first order
        assert lines[-1]["jd/update_conflicts"] == 0.0


def test_stacked_steps_perturb_the_carry_between_steps(arc_data: Path, tmp_path: Path) -> None:
    """The fork's noise between stacked supervision steps reaches training (rate 0: none)."""
    losses = []
    for rate in (0.0, 0.0, 0.5):
        run = tmp_path / f"rate{rate}_{len(losses)}"
        config = make_config(arc_data, run, "objective=stack_supervisions_and_sum", "max_steps=1",
                             "evaluators=[]", "arch.halt_exploration_prob=0",
                             f"objective.carry_perturbation_rate={rate}")  # fmt: skip
        assert train(config).steps == 1
        losses.append(next(m for m in metric_lines(run) if "train/lm_loss" in m)["train/lm_loss"])
    assert losses[0] == losses[1] != losses[2] and math.isfinite(losses[2])


def test_partial_jacobian_descent_trains(arc_data: Path, tmp_path: Path) -> None:
    config = make_config(arc_data, tmp_path, "objective=pixelwise_q_halt_in", "objective.groups=4",
                         "objective.gramian=heads", "max_steps=2", "evaluators=[]")  # fmt: skip
    assert train(config).steps == 2
    last = [m for m in metric_lines(tmp_path) if "train/lm_loss" in m][-1]
    assert math.isfinite(last["train/lm_loss"]) and last["jd/num_objectives"] == 4.0
    assert last["jd/update_conflicts"] == 0.0  # UPGrad on the heads' Gramian


def test_sudoku_without_evaluators(sudoku_data: Path, tmp_path: Path) -> None:
    config = make_config(sudoku_data, tmp_path, "evaluators=[]", "max_steps=2", "arch.mlp_t=True",
                         "arch.pos_encodings=none")  # fmt: skip
    outcome = train(config)
    assert set(outcome.eval_metrics) == {
        "all/accuracy", "all/exact_accuracy", "all/lm_loss", "all/q_halt_accuracy",
        "all/q_halt_loss", "all/steps",
    }  # fmt: skip
    assert outcome.eval_metrics["all/steps"] == 2.0  # evaluation runs every step


def test_lr_schedule_and_loss_normalisation(arc_data: Path, tmp_path: Path) -> None:
    config = make_config(arc_data, tmp_path, "max_steps=3", "lr_warmup_steps=4", "lr=0.4")
    train(config)
    lrs = [m["train/lr"] for m in metric_lines(tmp_path) if "train/lr" in m]
    assert lrs == pytest.approx([0.1, 0.2, 0.3])  # linear warm-up from 0


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bit_identical(arc_data: Path, tmp_path: Path, workers: int) -> None:
    """8 steps straight == 4 steps, stop, resume=auto, 4 more (with or without a loader worker,
    which prefetches ahead of what the loop consumed)."""
    w = f"data_workers={workers}"
    straight = make_config(arc_data, tmp_path / "a", "max_steps=8", "checkpoint_every_steps=4",
                           "ema=True", w)  # fmt: skip
    train(straight)
    first = make_config(arc_data, tmp_path / "b", "max_steps=4", "ema=True", w)
    train(first)
    second = make_config(arc_data, tmp_path / "b", "max_steps=8", "ema=True", "resume=auto", w)
    outcome = train(second)
    assert outcome.steps == 8
    a = [m for m in metric_lines(tmp_path / "a") if "train/lm_loss" in m]
    b = [m for m in metric_lines(tmp_path / "b") if "train/lm_loss" in m]
    assert [m["step"] for m in b] == list(range(1, 9))
    assert a == b  # every metric of every step, exactly
    wa = torch.load(tmp_path / "a/step_8/model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b/step_8/model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_checkpoint_write_leaves_the_previous_one(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(make_config(arc_data, tmp_path, "max_steps=2"))
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_2"
    real_save = torch.save

    def dying_save(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if str(path).endswith(ckpt.RANK_FILE.format(rank=0)):
            raise KeyboardInterrupt("killed while writing")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(arc_data, tmp_path, "max_steps=4", "resume=auto"))
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert (tmp_path / ".step_4.tmp").is_dir()  # the half-written folder is ignored
    outcome = train(make_config(arc_data, tmp_path, "max_steps=4", "resume=auto"))
    assert outcome.last_checkpoint == tmp_path / "step_4"
    assert not (tmp_path / ".step_4.tmp").exists()


def test_keep_last(arc_data: Path, tmp_path: Path) -> None:
    train(make_config(arc_data, tmp_path, "max_steps=6", "checkpoint_every_steps=1", "keep_last=2"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_5", "step_6"]


def test_non_finite_loss_stops_with_step_and_checkpoint(
    arc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = losses.LossOutput.total
    calls = {"n": 0}

    def nan_at_third(out: losses.LossOutput) -> torch.Tensor:
        calls["n"] += 1
        value = real(out)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(losses.LossOutput, "total", nan_at_third)
    config = make_config(arc_data, tmp_path, "max_steps=5", "checkpoint_every_steps=2")
    with pytest.raises(NonFiniteLossError, match=r"at step 3; last good checkpoint: .*step_2"):
        train(config)


def test_freeze_weights_trains_only_the_puzzle_embedding(arc_data: Path, tmp_path: Path) -> None:
    train(make_config(arc_data, tmp_path / "base", "max_steps=1"))
    base = torch.load(tmp_path / "base/step_1/model.pt", weights_only=True)
    load = f"+load_checkpoint={tmp_path / 'base/step_1'}"
    config = make_config(
        arc_data, tmp_path / "ft", "max_steps=2", "freeze_weights=True", load, "puzzle_emb_lr=0.1"
    )
    train(config)
    tuned = torch.load(tmp_path / "ft/step_2/model.pt", weights_only=True)
    for key in base:
        same = torch.equal(base[key], tuned[key])
        assert same == (key != ckpt.PUZZLE_EMB_KEY), key


def test_evaluate_an_upstream_state_dict(arc_data: Path, tmp_path: Path) -> None:
    config = make_config(arc_data, tmp_path / "run", "max_steps=2")
    outcome = train(config)
    state = torch.load(tmp_path / "run/step_2/model.pt", weights_only=True)
    upstream = tmp_path / "upstream" / "step_2"
    upstream.parent.mkdir()
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, upstream)
    arch = config.arch.model_dump()
    ecfg = EvaluateConfig(checkpoint=str(upstream), arch=arch, data_paths=[str(arc_data)],
                          global_batch_size=8, eval_save_outputs=["inputs", "preds"])  # fmt: skip
    metrics = run_evaluate(ecfg, DistInfo())
    for key, value in outcome.eval_metrics.items():
        if key != "ARC/aggregated_evals":
            assert metrics[key] == pytest.approx(value), key
    saved = torch.load(tmp_path / "upstream/step_2_eval/eval_outputs.pt", weights_only=True)
    inputs = np.load(arc_data / "test/all__inputs.npy")
    assert torch.equal(saved["inputs"], torch.from_numpy(inputs.astype("int32")))
    assert (tmp_path / "upstream/step_2_eval/submission.json").is_file()


def test_evaluate_needs_the_architecture_of_a_bare_upstream_file(
    arc_data: Path, tmp_path: Path
) -> None:
    train(make_config(arc_data, tmp_path / "run", "max_steps=1"))
    state = torch.load(tmp_path / "run/step_1/model.pt", weights_only=True)
    torch.save(state, tmp_path / "step_1")
    with pytest.raises(ConfigError, match=r"no all_config\.yaml beside it, so give the arch"):
        run_evaluate(EvaluateConfig(checkpoint=str(tmp_path / "step_1")), DistInfo())


def test_evaluate_rejects_a_mismatched_checkpoint(arc_data: Path, tmp_path: Path) -> None:
    train(make_config(arc_data, tmp_path / "run", "max_steps=1"))
    ecfg = EvaluateConfig(checkpoint=str(tmp_path / "run/step_1"),
                          arch={**load_pretrain_config(compose(overrides=FAST)).arch.model_dump(),
                                "hidden_size": 64})  # fmt: skip
    with pytest.raises(ckpt.CheckpointMismatchError, match="has shape"):
        run_evaluate(ecfg, DistInfo())


def _cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)  # fmt: skip


def test_cli_errors_are_one_line(arc_data: Path, tmp_path: Path) -> None:
    bad = _cli("pretrain.py", "+arch.hiden_size=3", f"data_paths=[{arc_data}]", cwd=tmp_path)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines() == [bad.stderr.strip().splitlines()[0]]
        and "arch.hiden_size: unknown key" in bad.stderr
    )
    missing = _cli("pretrain.py", *FAST, f"data_paths=[{tmp_path / 'nope'}]", cwd=tmp_path)
    assert missing.returncode == 2 and "nope" in missing.stderr.strip().splitlines()[-1]
    ev = _cli("evaluate.py", f"checkpoint={tmp_path / 'nothing'}", cwd=tmp_path)
    assert ev.returncode == 2 and "checkpoint not found" in ev.stderr


def _run_one_and_two(tmp_path: Path, common: list[str]) -> tuple[Path, Path]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(REPO / "pretrain.py"), *common,
                          f"+checkpoint_path={tmp_path / 'one'}"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29533", str(REPO / "pretrain.py"), *common,
                          f"+checkpoint_path={tmp_path / 'two'}"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    return tmp_path / "one", tmp_path / "two"


def _assert_same_training(one: Path, two: Path, steps: int, prefix: str = "train/") -> None:
    a = [m for m in metric_lines(one) if "train/lm_loss" in m]
    b = [m for m in metric_lines(two) if "train/lm_loss" in m]
    assert len(a) == len(b) == steps
    for ma, mb in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()
        for key in ma:
            if key.startswith(prefix) or key == "step":
                assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), (ma["step"], key)
    wa = torch.load(one / f"step_{steps}/model.pt", weights_only=True)
    wb = torch.load(two / f"step_{steps}/model.pt", weights_only=True)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_two_gloo_processes_equal_one(arc_data: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes and the same global batch gives the same training."""
    # Exploration draws from per-rank RNG streams (seed + rank), so it is switched off here.
    common = [*FAST, f"data_paths=[{arc_data}]", "max_steps=4", "evaluators=[]",
              "arch.halt_exploration_prob=0"]  # fmt: skip
    one, two = _run_one_and_two(tmp_path, common)
    _assert_same_training(one, two, 4)
    assert (two / "step_4/rank_1.pt").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize(
    "objective",
    [
        pytest.param(["objective=lm_loss_vs_q_halt_loss"], id="lm_vs_halt"),
        # About 30 s each on 2 cores: the stacked and gramian=heads layouts run in -m slow.
        pytest.param(
            ["objective=stack_supervisions"], id="stack_supervisions", marks=pytest.mark.slow
        ),
        pytest.param(
            ["objective=pixelwise_q_halt_in", "objective.groups=4", "objective.gramian=heads"],
            id="pixel_groups_heads",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_shared_objectives_aggregate_globally_across_ranks(
    objective: list[str], arc_data: Path, tmp_path: Path
) -> None:
    """Objectives every rank shares are aggregated on the global Jacobian (per-objective
    gradients summed over ranks first; for gramian=heads the heads' rows), so 2 processes equal
    1 with the same global batch, UPGrad weights and jd/ metrics included."""
    common = [*FAST, f"data_paths=[{arc_data}]", "max_steps=2", "evaluators=[]",
              "arch.halt_exploration_prob=0", *objective]  # fmt: skip
    one, two = _run_one_and_two(tmp_path, common)
    _assert_same_training(one, two, 2)
    a = [m for m in metric_lines(one) if "jd/cos_to_mean" in m]
    b = [m for m in metric_lines(two) if "jd/cos_to_mean" in m]
    for key in ("jd/cos_to_mean", "jd/gramian_trace", "jd/weight_min", "jd/weight_max"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-4), key
