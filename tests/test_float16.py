"""forward_dtype=float16 and dynamic loss scaling (``training.loss_scaling``): float16 trains as
float32 does, a scaled float32 run takes the unscaled run's updates bit for bit, an overflow
skips its update and halves the scale without stopping the run, the scale grows, resumes and is
refused where it would change the update."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models import losses
from models.arch_config import ARCH_CONFIGS
from models.encoders.base import EncoderConfig
from tests.conftest import reads_demos
from tests.test_training import make_config, metric_lines, train
from training import step
from training.config import PretrainConfig
from training.loop import NonFiniteLossError, run_training
from training.loss_scaling import DynamicLossScaler
from utils import checkpoint as ckpt
from utils.config import ConfigError
from utils.distributed import init_distributed
from utils.logging import build_logger

# The tiny hand-written data (4-token rows): a float16 step costs milliseconds on a CPU.
SMALL = ["evaluators=[]", "arch.hidden_size=16", "arch.num_heads=2"]


def _config(data: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    return make_config(data, run_dir, *SMALL, *overrides)


def _train_lines(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metric_lines(run_dir) if any(k.startswith("train/") for k in m)}


def _load(folder: Path, name: str) -> dict:
    return torch.load(folder / name, weights_only=True)


def _flat(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by a path name."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    found: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            found.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found.update(_flat(v, f"{prefix}/{i}"))
    return found


def _weights_and_moments(folder: Path) -> dict[str, torch.Tensor]:
    """Model weights (the puzzle table included), EMA shadow and optimizer moments."""
    found = _flat(_load(folder, ckpt.MODEL_FILE), "model")
    if (folder / ckpt.EMA_FILE).is_file():
        found.update(_flat(_load(folder, ckpt.EMA_FILE), "ema"))
    found.update(_flat(_load(folder, ckpt.TRAIN_FILE)["optimizers"], "optimizers"))
    return found


def _inf_gradient_at(monkeypatch: pytest.MonkeyPatch, step_number: int, sparse: bool) -> None:
    """A finite loss whose gradient holds an inf at one optimizer step: in a dense weight, or
    in the puzzle-embedding rows alone (reached through the run's scaler, built as usual)."""
    import training.state

    scalers: list[DynamicLossScaler] = []
    real_build, real_reduce = training.state.build_loss_scaler, step.reduce_gradients

    def build(*args: object) -> DynamicLossScaler | None:
        scaler = real_build(*args)
        scalers.append(scaler)
        return scaler

    calls = {"n": 0}

    def poisoned(params: list[torch.nn.Parameter]) -> None:
        calls["n"] += 1
        real_reduce(params)
        if calls["n"] != step_number:
            return
        if sparse:
            table = scalers[-1].puzzle_emb
            assert table is not None
            table.local_weights.grad.view(-1)[0] = float("inf")
        else:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("inf")

    monkeypatch.setattr(training.state, "build_loss_scaler", build)
    monkeypatch.setattr(step, "reduce_gradients", poisoned)


def test_float16_trains_as_float32_does(data: Path, tmp_path: Path) -> None:
    """6 steps in float16 (loss scaling on by default there) follow the float32 run's losses and
    gradient norms closely but not exactly, with the scale at 2**16 and no step skipped."""
    runs = {}
    for dtype in ("float32", "float16"):
        run_dir = tmp_path / dtype
        train(_config(data, run_dir, f"arch.forward_dtype={dtype}", "max_steps=6"))
        runs[dtype] = _train_lines(run_dir)
    fp32, fp16 = runs["float32"], runs["float16"]
    assert sorted(fp16) == list(range(1, 7))
    for s in range(1, 7):
        for key in ("train/lm_loss", "train/grad_norm"):
            assert fp16[s][key] == pytest.approx(fp32[s][key], rel=2e-2), (s, key)
        assert fp16[s]["train/loss_scale"] == 2.0**16
        assert fp16[s]["train/loss_scale_skipped"] == 0.0
        assert "train/loss_scale" not in fp32[s]  # auto: off in float32
    assert any(fp16[s]["train/lm_loss"] != fp32[s]["train/lm_loss"] for s in fp16)


@pytest.mark.parametrize("accumulation", [[], ["global_batch_size=4", "++grad_accum_steps=2"]])
def test_scaled_float32_takes_the_unscaled_updates_exactly(
    data: Path, tmp_path: Path, accumulation: list[str]
) -> None:
    """loss_scaling=dynamic in float32: the scale is a power of two, so the unscaled gradients,
    their norm and every update (clipped here, so an unscaling error would move the weights)
    equal the unscaled run's bit for bit, with or without 2 micro-batches per step; the
    unscaled checkpoint has no scaler state."""
    common = ["max_steps=4", "checkpoint_every_steps=4", "ema=True", "grad_clip_norm=0.5",
              *accumulation]  # fmt: skip
    train(_config(data, tmp_path / "plain", *common, "++loss_scaling=none"))
    train(_config(data, tmp_path / "scaled", *common, "++loss_scaling=dynamic"))
    plain, scaled = _train_lines(tmp_path / "plain"), _train_lines(tmp_path / "scaled")
    for s in range(1, 5):
        assert scaled[s]["train/loss_scale"] == 2.0**16
        assert scaled[s]["train/grad_norm"] == plain[s]["train/grad_norm"]
        assert scaled[s]["train/grad_norm"] > 0.5  # clipping acted
    a = _weights_and_moments(tmp_path / "plain/step_4")
    b = _weights_and_moments(tmp_path / "scaled/step_4")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "loss_scaler" not in _load(tmp_path / "plain/step_4", ckpt.TRAIN_FILE)
    saved = _load(tmp_path / "scaled/step_4", ckpt.TRAIN_FILE)["loss_scaler"]
    assert saved == {"scale": 2.0**16, "good_steps": 4}


@pytest.mark.parametrize("where", ["dense", "puzzle_embedding"])
def test_an_overflow_skips_the_update_and_halves_the_scale(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """An inf in one gradient at step 2 under nonfinite=stop: step 2's update is dropped
    (weights, puzzle table, EMA and moments as step 1 left them), the scale halves, the run
    goes on to step 4 with updates again, and no non-finite event is counted."""
    _inf_gradient_at(monkeypatch, 2, sparse=where == "puzzle_embedding")
    config = _config(data, tmp_path, "max_steps=4", "checkpoint_every_steps=1", "ema=True",
                     "++loss_scaling=dynamic", "nonfinite=stop")  # fmt: skip
    assert train(config).steps == 4
    lines = _train_lines(tmp_path)
    assert [lines[s]["train/loss_scale"] for s in range(1, 5)] == [2.0**16, 2.0**16, 2.0**15,
                                                                   2.0**15]  # fmt: skip
    assert [lines[s]["train/loss_scale_skipped"] for s in range(1, 5)] == [0.0, 1.0, 0.0, 0.0]
    assert all("train/nonfinite_skipped" not in m for m in lines.values())
    assert all(torch.isfinite(torch.tensor(m["train/lm_loss"])) for m in lines.values())
    one, two, three = (_weights_and_moments(tmp_path / f"step_{s}") for s in (1, 2, 3))
    for key in one:
        assert torch.equal(one[key], two[key]), key
    assert any(not torch.equal(two[k], three[k]) for k in two if k.startswith("model"))
    table = "model/model.inner.puzzle_emb.weights"
    assert not torch.equal(two[table], three[table])
    assert _load(tmp_path / "step_2", ckpt.TRAIN_FILE)["loss_scaler"]["scale"] == 2.0**15


def test_a_float16_overflow_backs_off_until_the_gradients_fit(data: Path, tmp_path: Path) -> None:
    """A real float16 overflow: at 2**60 the activation gradients are inf, so each step halves
    the scale and no optimizer ever steps (no moments), under nonfinite=stop."""
    config = _config(data, tmp_path, "arch.forward_dtype=float16", "max_steps=3",
                     f"++loss_scale_init={2.0**60!r}", "checkpoint_every_steps=3")  # fmt: skip
    assert train(config).steps == 3
    lines = _train_lines(tmp_path)
    assert [lines[s]["train/loss_scale"] for s in (1, 2, 3)] == [2.0**60, 2.0**59, 2.0**58]
    assert [lines[s]["train/loss_scale_skipped"] for s in (1, 2, 3)] == [1.0, 1.0, 1.0]
    optimizers = _load(tmp_path / "step_3", ckpt.TRAIN_FILE)["optimizers"]
    assert optimizers and all(o["state"] == {} for o in optimizers.values())


def test_an_overflow_at_the_smallest_scale_is_a_real_non_finite_gradient(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the scale floor (2**-24, float16's smallest step) the scale is no longer to blame:
    a non-finite gradient stops the run under nonfinite=stop, as without scaling."""
    _inf_gradient_at(monkeypatch, 2, sparse=False)
    config = _config(data, tmp_path, "++loss_scaling=dynamic", f"++loss_scale_init={2.0**-24!r}",
                     "max_steps=4")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm at step 2"):
        train(config)


def test_the_scale_grows_after_the_interval_and_resumes(data: Path, tmp_path: Path) -> None:
    """growth_interval=2: the scale doubles after every 2 finite steps; 3 steps, stop, resume,
    2 more equals 5 steps straight (scale, good-step count and updates)."""
    common = ["++loss_scaling=dynamic", "++loss_scale_growth_interval=2", "ema=True"]
    train(_config(data, tmp_path / "a", *common, "max_steps=5", "checkpoint_every_steps=5"))
    train(_config(data, tmp_path / "b", *common, "max_steps=3"))
    saved = _load(tmp_path / "b/step_3", ckpt.TRAIN_FILE)["loss_scaler"]
    assert saved == {"scale": 2.0**17, "good_steps": 1}
    train(_config(data, tmp_path / "b", *common, "max_steps=5", "resume=auto"))
    a, b = _train_lines(tmp_path / "a"), _train_lines(tmp_path / "b")
    expected = [2.0**16, 2.0**16, 2.0**17, 2.0**17, 2.0**18]
    assert [a[s]["train/loss_scale"] for s in range(1, 6)] == expected
    assert a == b
    wa, wb = (
        _weights_and_moments(tmp_path / "a/step_5"),
        _weights_and_moments(tmp_path / "b/step_5"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _one_rank_overflows(rank: int, port: int, data: str, run_dir: str) -> None:
    """A gloo rank of a 2-process run in which rank 1 alone gets an inf puzzle-embedding row
    at step 2; saves this rank's weights and scaler state at the end."""
    import training.loop
    import training.state

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    monkeypatch = pytest.MonkeyPatch()
    states = []
    real_create = training.state.create_train_state

    def create(*args: object) -> object:
        states.append(real_create(*args))
        return states[-1]

    monkeypatch.setattr(training.loop, "create_train_state", create)
    _inf_gradient_at(monkeypatch, 2 if rank == 1 else 0, sparse=True)
    dist_info = init_distributed("cpu")
    try:
        config = _config(Path(data), Path(run_dir), "max_steps=3", "++loss_scaling=dynamic",
                         "arch.halt_exploration_prob=0")  # fmt: skip
        logger = build_logger("none", project="p", run_name="r", config={},
                              run_dir=config.checkpoint_path, is_main=rank == 0)  # fmt: skip
        run_training(config, dist_info, logger=logger, evaluators_factory=lambda data: [])
        state = states[-1]
        saved = {"model": state.raw_model.state_dict(), "scaler": state.loss_scaler.state_dict()}
        torch.save(saved, Path(run_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # about 20 s on 2 busy cores
@pytest.mark.timeout(180)
def test_an_overflow_on_one_rank_skips_on_every_rank(data: Path, tmp_path: Path) -> None:
    """Rank 1's sparse rows overflow at step 2, rank 0's do not: the flag rides on the step's
    all-reduce, so both ranks skip step 2 and halve the scale, and end with the same weights
    (a rank that updated alone would leave them apart, or hang the collectives)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_one_rank_overflows, args=(port, str(data), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["scaler"] == ranks[1]["scaler"] == {"scale": 2.0**15, "good_steps": 1}
    assert ranks[0]["model"].keys() == ranks[1]["model"].keys()
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    lines = _train_lines(tmp_path)
    assert [lines[s]["train/loss_scale_skipped"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]


def test_a_nan_loss_still_stops(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-finite loss is a real non-finite event with loss scaling on: nonfinite=stop ends
    the run at that step, as without scaling."""
    real = losses.LossOutput.total
    calls = {"n": 0}

    def total(out: losses.LossOutput) -> torch.Tensor:
        calls["n"] += 1
        value = real(out)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(losses.LossOutput, "total", total)
    config = _config(data, tmp_path, "arch.forward_dtype=float16", "max_steps=4")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2"):
        train(config)


def test_the_scaler_follows_grad_scalers_update_rule() -> None:
    """Against torch's own update kernel (what torch.amp.GradScaler.update runs), over a run of
    finite steps and overflows, with a growth every 3 finite steps in a row."""
    overflows = [False, False, False, True, False, False, True, True, False, False, False, False]
    ours = DynamicLossScaler(2.0**10, growth_interval=3)
    scale = torch.tensor(2.0**10)
    tracker = torch.tensor(0, dtype=torch.int32)
    for overflow in overflows:
        logged = ours.update(overflow)
        assert logged["train/loss_scale_skipped"] == float(overflow)
        torch._amp_update_scale_(scale, tracker, torch.tensor(float(overflow)), 2.0, 0.5, 3)
        assert (ours.scale, ours.good_steps) == (scale.item(), tracker.item())
    assert ours.scale != 2.0**10


def test_unscaling_divides_by_the_scale_exactly() -> None:
    scaler = DynamicLossScaler(2.0**16, growth_interval=2000)
    g = torch.randn(50) * 2.0**16
    grads = [g.clone(), (g * 3).clone()]
    scaler.unscale_(grads)
    assert torch.equal(grads[0], g / 65536) and torch.equal(grads[1], g * 3 / 65536)


def test_refusals(data: Path, tmp_path: Path) -> None:
    """Jacobian descent with a loss scale, and a scale that is not a power of two: one line
    each, naming the key."""
    jd = _config(data, tmp_path, "arch.forward_dtype=float16", "objective=lm_loss_vs_q_halt_loss")
    with pytest.raises(ConfigError, match=r"^loss_scaling: Jacobian descent .*loss_scaling=none"):
        train(jd)
    odd = _config(data, tmp_path, "++loss_scaling=dynamic", "++loss_scale_init=1000")
    with pytest.raises(ConfigError, match=r"^loss_scale_init: 1000 is not a power of two"):
        train(odd)


@pytest.mark.parametrize("arch", [a for a in ARCH_CONFIGS.names() if not reads_demos(a)])
def test_every_architecture_trains_in_float16(data: Path, tmp_path: Path, arch: str) -> None:
    """Two scaled float16 steps of every architecture that reads no demos: finite losses and
    gradient norms, no overflow at the first scale."""
    train(_config(data, tmp_path, f"arch={arch}", "arch.forward_dtype=float16", "max_steps=2"))
    lines = _train_lines(tmp_path)
    assert sorted(lines) == [1, 2]
    for m in lines.values():
        assert m["train/loss_scale"] == 2.0**16 and m["train/loss_scale_skipped"] == 0.0
        assert torch.isfinite(torch.tensor([m["train/lm_loss"], m["train/grad_norm"]])).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCH_CONFIGS.names() if reads_demos(a)])
def test_encoder_models_train_in_float16(strict_arc_data: Path, tmp_path: Path, arch: str) -> None:
    """ETRM's encoders in float16 (about 20 s each on a CPU): 3 scaled steps follow the
    float32 run's losses within 2%."""
    overrides = [f"arch={arch}", "max_steps=3", "evaluators=[]", "max_demos=2",
                 "target_policy=leave_one_out", "arch.encoder_num_layers=1",
                 "global_batch_size=4", "max_eval_groups=1"]  # fmt: skip
    if "num_act_steps" in ARCH_CONFIGS.get(arch).model_fields:
        overrides.append("arch.num_act_steps=2")
    runs = {}
    for dtype in ("float32", "float16"):
        config = make_config(strict_arc_data, tmp_path / dtype, *overrides,
                             f"arch.forward_dtype={dtype}")  # fmt: skip
        assert config.arch.encoder_config(12, 900).forward_dtype == dtype
        train(config)
        runs[dtype] = _train_lines(tmp_path / dtype)
    assert sorted(runs["float16"]) == sorted(runs["float32"]) and runs["float16"]
    for s, m in runs["float16"].items():
        assert m["train/loss_scale_skipped"] == 0.0
        assert m["train/lm_loss"] == pytest.approx(runs["float32"][s]["train/lm_loss"], rel=2e-2)


def test_encoder_configs_accept_float16() -> None:
    assert EncoderConfig(forward_dtype="float16").forward_dtype == "float16"
