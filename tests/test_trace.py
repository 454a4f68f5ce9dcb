"""The step-by-step trace (``tracing``): recording every ACT step, perturbations, per-step
results and the written format, for every architecture.

A tiny TRM trained for two steps on the tiny ARC build gives the checkpoint; its trace is
compared with ``evaluate.py`` on the same checkpoint (predictions and pass@K), with itself
(determinism) and with its perturbed variants. The de-augmentation is checked against a
hand-made augmented puzzle, with the transforms written out independently.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataset.common import PUZZLE_ID_SEPARATOR as SEP
from evaluate import load_configs
from evaluators.arc import crop
from models.arch_config import ARCH_CONFIGS
from models.family import family_of
from models.recursive_reasoning.common import ModelDims
from tests.conftest import model_batch
from tracing.config import TraceConfig, parse_perturbation
from tracing.record import HCycleCapture, StepCapture, inner_site, trace_batch
from tracing.records import TaskFrames, build_record, grid_string, parse_grid
from tracing.trace import run_trace
from training.config import EvaluateConfig, load_pretrain_config
from utils.config import compose, validate_model
from utils.distributed import DistInfo
from utils.schema import ConfigError

H = 3  # halt_max_steps of the tiny checkpoint
PERTURB = ["step=2,target=z_L,sigma_rel=0.5,seed=0", "step=3,target=injection,sigma_rel=1,seed=1"]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, and a busy machine is not oversubscribed
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(arc_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny TRM (hidden 32, H_cycles 2, L_cycles 1, 3 ACT steps) after two training steps."""
    from training.loop import run_training
    from utils.logging import build_logger

    run_dir = tmp_path_factory.mktemp("trm_run")
    overrides = [
        "+experiment=tiny_cpu", "logger=none", "data_workers=0", "global_batch_size=8",
        "arch=trm", "arch.hidden_size=32", "arch.H_cycles=2", "arch.L_cycles=1",
        f"arch.halt_max_steps={H}", "evaluators=[]", "max_steps=2", "lr=3e-3",
        f"data_paths=[{arc_data}]", f"+checkpoint_path={run_dir}",
    ]  # fmt: skip
    config = load_pretrain_config(compose(overrides=overrides))
    logger = build_logger(
        "none", project="t", run_name="t", config={}, run_dir=str(run_dir), is_main=True
    )
    run_training(config, DistInfo(), logger=logger)
    return run_dir / "step_2"


def _ecfg(checkpoint: Path, out: Path, **kw: Any) -> EvaluateConfig:
    return EvaluateConfig(
        checkpoint=str(checkpoint), evaluators=[{"name": "arc"}], output_dir=str(out), **kw
    )


@pytest.fixture(scope="module")
def traced(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint traced over every augmentation, with L-step probes and two
    perturbations (a z_L one at step 2, an injection one at step 3)."""
    out = tmp_path_factory.mktemp("trace") / "traces"
    tc = TraceConfig(aug="all", probe_l_steps=True, out=str(out), perturb=PERTURB, shard_size=7)
    run_trace(_ecfg(checkpoint, out.parent / "eval"), tc, DistInfo())
    return out


def _records(folder: Path) -> list[dict[str, Any]]:
    index = json.loads((folder / "index.json").read_text())
    lines: list[dict[str, Any]] = []
    for shard in index["shards"]:
        lines.extend(json.loads(line) for line in (folder / shard).read_text().splitlines())
    return lines


def _by_variant(records: list[dict[str, Any]], variant: str) -> dict[tuple, dict[str, Any]]:
    return {
        (r["puzzle_id"], r["test_index"], r["aug"]): r for r in records if r["variant"] == variant
    }


# ----------------------------------------------------------------------------------------------
# Against evaluate.py
# ----------------------------------------------------------------------------------------------
def test_traced_last_step_equals_evaluate_py(
    arc_data: Path, checkpoint: Path, traced: Path, tmp_path: Path
) -> None:
    """The trace's last step is evaluate.py's prediction (grid) and q_halt (float32 bits) for
    every test row, and per-step pass@K at halt_max_steps is evaluate.py's pass@K."""
    from evaluate import run as run_evaluate

    keys = ["inputs", "puzzle_identifiers", "preds", "q_halt_logits"]
    metrics = run_evaluate(_ecfg(checkpoint, tmp_path, eval_save_outputs=keys), DistInfo())
    saved = torch.load(tmp_path / "eval_outputs.pt", weights_only=True)
    index = json.loads((traced / "index.json").read_text())
    clean = _by_variant(_records(traced), "clean")
    names = json.loads((arc_data / "identifiers.json").read_text())
    test_puzzles = json.loads((arc_data / "test_puzzles.json").read_text())
    frames = TaskFrames.from_files(names, test_puzzles)
    matched = 0
    for b in range(len(saved["preds"])):
        row = frames.row_key(int(saved["puzzle_identifiers"][b]), saved["inputs"][b].numpy())
        if row is None:
            continue
        record = clean[(row.task, row.test_index, row.aug)]
        last = record["steps"][-1]
        assert last["pred"] == grid_string(row.undo(crop(saved["preds"][b].numpy())))
        q = saved["q_halt_logits"][b]
        assert torch.tensor(last["q_halt"], dtype=torch.float32).view(torch.int32) == q.view(
            torch.int32
        )
        matched += 1
    assert matched == len(clean) == 9  # 3 tasks x (identity + 2 augmentations), one test each
    per_step = index["per_step"]
    assert per_step["pass@1_by_step"][-1] == metrics["ARC/pass@1"]
    assert per_step["pass@2_by_step"][-1] == metrics["ARC/pass@2"]
    assert json.loads((traced / "per_step.json").read_text()) == per_step


# ----------------------------------------------------------------------------------------------
# Determinism and perturbations
# ----------------------------------------------------------------------------------------------
def test_trace_is_deterministic(
    checkpoint: Path, traced: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A second trace, through ``python evaluate.py trace.enabled=True``, writes the same
    files as the first (``run_trace``)."""
    import evaluate

    out = tmp_path / "again"
    cfg = compose("cfg_evaluate", overrides=[
        f"checkpoint={checkpoint}", "evaluators=[{name: arc}]", f"output_dir={tmp_path / 'eval'}",
        "trace.enabled=True", "trace.aug=all", "trace.probe_l_steps=True", f"trace.out={out}",
        "trace.shard_size=7",
    ])  # fmt: skip
    cfg.trace.perturb = PERTURB
    ecfg, tc = load_configs(cfg)
    assert tc.enabled and tc.perturbations()[1].target == "injection"
    evaluate.run_trace_instead(ecfg, tc, DistInfo())
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2] == f"trace written to {out}"
    assert json.loads(printed[-1]) == json.loads((out / "per_step.json").read_text())
    first = json.loads((traced / "index.json").read_text())
    second = json.loads((out / "index.json").read_text())
    # 27 records, 7 per shard
    assert first["shards"] == second["shards"] == [f"shard_{i:05d}.jsonl" for i in range(4)]
    for shard in first["shards"]:
        assert (traced / shard).read_bytes() == (out / shard).read_bytes()
    first["run"].pop("created")
    second["run"].pop("created")
    assert first == second


def test_perturbed_equals_clean_before_its_step_and_differs_from_it(traced: Path) -> None:
    records = _records(traced)
    clean = _by_variant(records, "clean")
    for spec in PERTURB:
        p = parse_perturbation(spec)
        perturbed = _by_variant(records, p.tag)
        assert perturbed.keys() == clean.keys()
        for key, q in perturbed.items():
            c = clean[key]
            assert q["perturbation"] == p.as_json()
            assert q["steps"][: p.step - 1] == c["steps"][: p.step - 1]
            for t in range(p.step - 1, H):  # from the injection step on, the latents moved
                assert q["steps"][t]["h_cos_dist"] != c["steps"][t]["h_cos_dist"]
                assert q["steps"][t]["dz_rel_l"] != c["steps"][t]["dz_rel_l"]


def test_sigma_zero_gives_the_clean_trace(checkpoint: Path, tmp_path: Path) -> None:
    specs = ["step=1,target=z_H,sigma_rel=0,seed=3", "step=2,target=injection,sigma_rel=0"]
    out = tmp_path / "t"
    tc = TraceConfig(groups=2, out=str(out), perturb=specs)
    per_step = run_trace(_ecfg(checkpoint, tmp_path / "eval"), tc, DistInfo())
    records = _records(out)
    clean = _by_variant(records, "clean")
    assert len(clean) == 2  # the identity copies of the first 2 tasks
    assert {r["aug"] for r in clean.values()} == {"identity"}
    for spec in specs:
        tag = parse_perturbation(spec).tag
        for key, q in _by_variant(records, tag).items():
            assert q["steps"] == clean[key]["steps"]
        assert per_step["perturbations"][tag] == {"changed": 0.0, "recovered": 0.0, "lost": 0.0}


def test_noise_is_seeded_per_record_and_step() -> None:
    from tracing.perturb import add_noise, noise_seed

    z = torch.ones(2, 3, 4)
    seeds = [noise_seed(0, "a", 5, "z_L"), None]
    a, b = add_noise(z, 0.5, seeds), add_noise(z, 0.5, seeds)
    assert torch.equal(a, b) and torch.equal(a[1], z[1]) and not torch.equal(a[0], z[0])
    g = torch.Generator().manual_seed(seeds[0])
    assert torch.allclose(a[0], 1 + 0.5 * torch.randn(3, 4, generator=g))  # RMS of ones is 1
    assert len({noise_seed(0, "a", 5, "z_L"), noise_seed(0, "a", 6, "z_L"),
                noise_seed(0, "b", 5, "z_L"), noise_seed(1, "a", 5, "z_L")}) == 4  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Per-step results
# ----------------------------------------------------------------------------------------------
def test_per_step_results_follow_the_records(traced: Path) -> None:
    """exact_by_step, first-halt exact and the perturbation fractions recomputed from the
    shards by hand."""
    index = json.loads((traced / "index.json").read_text())
    records = _records(traced)
    clean = [r for r in records if r["variant"] == "clean"]
    per_step = index["per_step"]
    for t in range(H):
        assert per_step["exact_by_step"][t] == sum(r["steps"][t]["exact"] for r in clean) / 9
    at_halt = [r["steps"][(r["first_halt_step"] or H) - 1]["exact"] for r in clean]
    assert per_step["first_halt"]["exact"] == sum(at_halt) / 9
    by_key = _by_variant(records, "clean")
    for spec in PERTURB:
        tag = parse_perturbation(spec).tag
        pert = _by_variant(records, tag)
        changed = sum(pert[k]["steps"][-1]["pred"] != by_key[k]["steps"][-1]["pred"] for k in pert)
        assert per_step["perturbations"][tag]["changed"] == changed / 9
    for entry, record in zip(index["records"], records, strict=True):
        if entry["variant"] == "clean":
            assert entry["recovered"] is None
        else:
            was = by_key[(record["puzzle_id"], record["test_index"], record["aug"])]
            assert entry["recovered"] == (record["final_exact"] and not was["final_exact"])


def test_record_summary_from_hand_made_steps() -> None:
    from tracing.records import summarise

    def steps(exact: list[bool], halt: list[bool]) -> list[dict[str, Any]]:
        return [
            {"act_step": i + 1, "exact": e, "would_halt": h}
            for i, (e, h) in enumerate(zip(exact, halt, strict=True))
        ]

    got = summarise(steps([False, True, True, False], [False, False, True, True]))
    assert got == {"first_halt_step": 3, "first_correct_step": 2, "final_exact": False,
                   "solved_then_lost": True}  # fmt: skip
    got = summarise(steps([False, False, False, True], [False] * 4))
    assert got == {"first_halt_step": None, "first_correct_step": 4, "final_exact": True,
                   "solved_then_lost": False}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# De-augmentation against a hand-made puzzle
# ----------------------------------------------------------------------------------------------
def _canvas(grid: np.ndarray) -> np.ndarray:
    """A 30x30 token canvas with ``grid`` (colours) at the origin and an EOS frame."""
    canvas = np.zeros((30, 30), dtype=np.int64)
    r, c = grid.shape
    canvas[:r, :c] = grid + 2
    canvas[r, : c + 1] = 1
    canvas[: r + 1, c] = 1
    return canvas.reshape(-1)


def test_every_recorded_grid_is_de_augmented() -> None:
    """A task seen through the variant ``t1`` (rot90) with colours permuted: every grid of its
    record (input, target, predictions, H-cycle decodes, probes) is in the task's frame."""
    grid_in = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    grid_out = np.array([[7, 8], [9, 0], [1, 1]], dtype=np.uint8)
    other = np.array([[3, 0, 0, 5]], dtype=np.uint8)
    perm = np.array([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])  # colour c shows as perm[c]
    aug_name = f"taskA{SEP}t1{SEP}{''.join(map(str, perm))}"
    test_puzzles = {
        "taskA": {
            "train": [{"input": [[1]], "output": [[2, 2]]}],
            "test": [{"input": grid_in.tolist(), "output": grid_out.tolist()}],
        }
    }
    frames = TaskFrames.from_files(["<blank>", "taskA", aug_name], test_puzzles)

    def shown(grid: np.ndarray) -> np.ndarray:  # what the variant shows: rot90, then colours
        return perm[np.rot90(grid, 1)].astype(np.uint8)

    row = frames.row_key(2, _canvas(shown(grid_in)))
    assert row is not None
    assert (row.task, row.test_index, row.aug) == ("taskA", 0, "t1_c3140592687")
    assert frames.row_key(1, _canvas(grid_in)).aug == "identity"  # type: ignore[union-attr]
    assert frames.row_key(0, _canvas(grid_in)) is None  # the blank identifier
    assert frames.row_key(2, _canvas(other)) is None  # not a test input of the task

    solved, wrong = _canvas(shown(grid_out)), _canvas(shown(other))
    preds = [wrong, solved]  # step 1 wrong, step 2 solved

    def cap(p: np.ndarray) -> StepCapture:
        one = np.array([p], dtype=np.int32)
        nan = np.full(1, np.nan)
        return StepCapture(
            preds=one, q_halt=np.zeros(1), q_continue=np.zeros(1), would_halt=np.zeros(1, bool),
            token_acc=np.ones(1), has_labels=np.ones(1, bool), h_cos_dist=nan, l_cos_dist=nan,
            dz_rel_h=nan, dz_rel_l=nan, h_cycles=[HCycleCapture(one, [one, one])],
            full_preds=torch.from_numpy(one), full_q_halt=torch.zeros(1),
        )  # fmt: skip

    record = build_record(frames, row, 0, [cap(p) for p in preds], "clean", None)
    assert record["input"] == "123|456" and record["target"] == "78|90|11"
    assert record["demos"] == [{"input": "1", "output": "22"}]
    s1, s2 = record["steps"]
    assert s1["pred"] == "3005" and s1["exact"] is False
    assert s2["pred"] == "78|90|11" and s2["exact"] is True
    assert s2["cells_changed"] == 6  # the shape changed: every cell counts
    for step, want in ((s1, "3005"), (s2, "78|90|11")):
        assert step["h_cycles"] == [{"pred": want, "l_probes": [want, want]}]
    assert (record["first_correct_step"], record["final_exact"]) == (2, True)
    assert parse_grid("78|90|11").tolist() == grid_out.tolist() and parse_grid("").size == 0


# ----------------------------------------------------------------------------------------------
# Every architecture
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCH_CONFIGS.names())
def test_every_architecture_traces(arch: str) -> None:
    """All steps, one decode per H-cycle, one probe per L-step whose last equals its cycle's
    decode (the H update reads exactly those latents), perturbations on each latent the
    architecture has and on the injection."""
    overrides = ["+experiment=tiny_cpu", "arch.hidden_size=16", "arch.halt_max_steps=3",
                 "arch.H_cycles=2", "arch.L_cycles=2"]  # fmt: skip
    config = load_pretrain_config(compose(overrides=[f"arch={arch}", *overrides])).arch
    dims = ModelDims(batch_size=2, seq_len=900, vocab_size=12, num_puzzle_identifiers=3)
    torch.manual_seed(0)
    head = family_of(config).build(config, dims)
    grid = np.array([[1, 2], [3, 4]])
    inputs = torch.from_numpy(np.stack([_canvas(grid), _canvas(grid.T)])).to(torch.int32)
    base = {"inputs": inputs, "labels": inputs.clone().long(),
            "puzzle_identifiers": torch.tensor([1, 2], dtype=torch.int32)}  # fmt: skip
    batch = model_batch(arch, base, dims.vocab_size)
    site = inner_site(head)
    latents = {n[:3] for n in site.carry_inits}  # z_H, z_L (z_L1..6 count as z_L)
    specs = [f"step=2,target={t},sigma_rel=0.3" for t in sorted(latents)] + [
        "step=1,target=injection,sigma_rel=0.3"
    ]
    perturbations = [parse_perturbation(s) for s in specs]
    traces = trace_batch(head, batch, torch.tensor([1]), ["r0", "r1"], 3, True, perturbations)
    assert set(traces) == {"clean", *(p.tag for p in perturbations)}
    uses_cycles = hasattr(site, "L_level")
    for variant, steps in traces.items():
        assert len(steps) == 3
        for cap in steps:
            assert cap.preds.shape == (1, 900)
            assert len(cap.h_cycles) == (2 if uses_cycles else 1)
            for cycle in cap.h_cycles:
                assert len(cycle.probes) == (2 if uses_cycles else 0)
                if cycle.probes:
                    assert np.array_equal(cycle.probes[-1], cycle.preds)
            # The last H-cycle's decode is the step's prediction.
            assert np.array_equal(cap.h_cycles[-1].preds, cap.preds), variant
        assert np.isnan(steps[0].h_cos_dist).all() and np.isnan(steps[0].l_cos_dist).all()
        measured = steps[1].h_cos_dist if "z_H" in latents else steps[1].l_cos_dist
        assert np.isfinite(measured).all()
    clean = [_fingerprint(cap) for cap in traces["clean"]]
    for p in perturbations:
        got = [_fingerprint(cap) for cap in traces[p.tag]]
        assert got[: p.step - 1] == clean[: p.step - 1], p.tag
        assert got[p.step - 1 :] != clean[p.step - 1 :], p.tag


def _fingerprint(cap: StepCapture) -> tuple[Any, ...]:
    """What a step recorded, comparable (NaN as None)."""
    floats = [cap.q_halt, cap.h_cos_dist, cap.l_cos_dist, cap.dz_rel_h, cap.dz_rel_l]
    values = tuple(None if np.isnan(v) else float(v) for a in floats for v in a)
    return (values, cap.preds.tobytes(), *(c.preds.tobytes() for c in cap.h_cycles))


# ----------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------
GRID_RE = r"^$|^[0-9]+(\|[0-9]+)*$"


def _check_grid(value: Any) -> None:
    import re

    assert isinstance(value, str) and re.match(GRID_RE, value), value
    if value:
        assert len({len(r) for r in value.split("|")}) == 1, value


def _opt(value: Any, kind: type | tuple[type, ...]) -> bool:
    return value is None or isinstance(value, kind)


def test_written_files_follow_the_format(traced: Path) -> None:
    index = json.loads((traced / "index.json").read_text())
    assert index["schema"] == "trm-trace-index/v1"
    assert set(index) == {"schema", "run", "halt_max_steps", "H_cycles", "L_cycles", "shards",
                          "perturbations", "records", "per_step"}  # fmt: skip
    run = index["run"]
    assert set(run) == {"checkpoint", "config_hash", "arch", "conditioner", "created"}
    assert len(run["config_hash"]) == 64 and run["arch"] == "trm"
    assert run["conditioner"] == "puzzle_embedding"
    assert (index["halt_max_steps"], index["H_cycles"], index["L_cycles"]) == (H, 2, 1)
    assert [p["tag"] for p in index["perturbations"]] == [
        parse_perturbation(s).tag for s in PERTURB
    ]
    records = _records(traced)
    assert len(records) == len(index["records"]) == 27  # 9 rows x 3 variants
    step_keys = {"act_step", "pred", "q_halt", "q_continue", "halt_prob", "would_halt",
                 "h_cos_dist", "l_cos_dist", "dz_rel_h", "dz_rel_l", "cells_changed",
                 "token_acc", "exact", "h_cycles"}  # fmt: skip
    for i, (entry, r) in enumerate(zip(index["records"], records, strict=True)):
        assert entry["id"] == r["id"] == i
        assert entry["shard"] == f"shard_{i // 7:05d}.jsonl" and entry["line"] == i % 7
        for k in ("puzzle_id", "test_index", "aug", "variant", "first_halt_step",
                  "first_correct_step", "final_exact", "solved_then_lost"):  # fmt: skip
            assert entry[k] == r[k]
        assert r["schema"] == "trm-trace/v1"
        assert set(r) == {"schema", "id", "puzzle_id", "test_index", "aug", "demos", "input",
                          "target", "variant", "perturbation", "steps", "first_halt_step",
                          "first_correct_step", "final_exact", "solved_then_lost"}  # fmt: skip
        assert r["demos"] and all(set(d) == {"input", "output"} for d in r["demos"])
        for g in [r["input"], r["target"], *(v for d in r["demos"] for v in d.values())]:
            _check_grid(g)
        assert (r["perturbation"] is None) == (r["variant"] == "clean")
        assert [s["act_step"] for s in r["steps"]] == list(range(1, H + 1))
        for t, s in enumerate(r["steps"]):
            assert set(s) == step_keys
            _check_grid(s["pred"])
            assert isinstance(s["q_halt"], float) and isinstance(s["would_halt"], bool)
            assert s["halt_prob"] == pytest.approx(1 / (1 + np.exp(-s["q_halt"])))
            first = t == 0
            for k in ("h_cos_dist", "l_cos_dist", "dz_rel_h", "dz_rel_l"):
                assert (s[k] is None) if first else isinstance(s[k], float), (k, t)
            assert (s["cells_changed"] is None) if first else isinstance(s["cells_changed"], int)
            assert isinstance(s["token_acc"], float) and isinstance(s["exact"], bool)
            assert len(s["h_cycles"]) == 2
            for c in s["h_cycles"]:
                _check_grid(c["pred"])
                assert len(c["l_probes"]) == 1
                for g in c["l_probes"]:
                    _check_grid(g)
        assert _opt(r["first_halt_step"], int) and _opt(r["first_correct_step"], int)
    per_step = index["per_step"]
    assert per_step["steps"] == list(range(1, H + 1))
    for k in ("exact_by_step", "pass@1_by_step", "pass@2_by_step"):
        assert len(per_step[k]) == H and all(isinstance(v, float) for v in per_step[k])
    assert set(per_step["first_halt"]) == {"exact", "pass@1", "pass@2"}
    assert set(per_step["perturbations"]) == {parse_perturbation(s).tag for s in PERTURB}


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def test_trace_command_line_composes() -> None:
    cfg = compose("cfg_trace", overrides=[
        "checkpoint=ckpt", "trace.groups=32", "trace.aug=all", "trace.probe_l_steps=True",
        "trace.out=traces/", 'trace.perturb="step=5,target=z_L,sigma_rel=0.5,seed=0"',
    ])  # fmt: skip
    ecfg, tc = load_configs(cfg)
    assert ecfg.checkpoint == "ckpt"
    assert (tc.groups, tc.aug, tc.probe_l_steps, tc.out) == (32, "all", True, "traces/")
    (p,) = tc.perturbations()
    assert (p.step, p.target, p.sigma_rel, p.seed) == (5, "z_L", 0.5, 0)
    cfg = compose("cfg_trace", overrides=[
        "checkpoint=ckpt", 'trace.perturb=["step=1,target=z_H,sigma_rel=0.1","step=3,sigma_rel=1"]',
    ])  # fmt: skip
    sweep = load_configs(cfg)[1].perturbations()
    assert [(p.step, p.target, p.sigma_rel) for p in sweep] == [(1, "z_H", 0.1), (3, "z_L", 1.0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("step=5,target=z_Q,sigma_rel=0.5", "target must be one of z_H, z_L, injection"),
        ("step=5", "give sigma_rel"),
        ("step=five,sigma_rel=0.5", "step and seed must be integers"),
        ("step=0,sigma_rel=0.5", "step must be >= 1"),
        ("step=2,sigma=0.5", "'sigma=0.5' is not one of"),
    ],
)
def test_bad_perturbation_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate_model(TraceConfig, {"perturb": spec}, prefix="trace")
    assert "\n" not in str(info.value) and "trace.perturb" in str(info.value)
    with pytest.raises(ConfigError, match=message):
        parse_perturbation(spec)


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
def test_trace_overhead_benchmark_prints_its_json_line(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import trace_overhead

    result = trace_overhead.main(
        ["--checkpoint", str(checkpoint), "--rounds", "1", "--device", "cpu"]
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert (last["benchmark"], last["records"], last["halt_max_steps"]) == ("trace_overhead", 9, H)
    for key in ("eval_s", "trace_s", "trace_probes_s"):
        assert last[key] > 0
    ratio = last["trace_s"] / last["eval_s"]
    assert last["trace_vs_eval_time"] == pytest.approx(ratio, rel=1e-2)


def test_step_voting_scores_each_step_as_the_arc_evaluator(tmp_path: Path) -> None:
    """Hand-made votes: task A (identity and one augmented copy) is wrong at step 1, split at
    step 2 (the identity copy right with the higher q, so it wins the tie), right at step 3;
    task B is never solved. pass@K averages the tasks: 0, 0.5, 0.5. The rows halt at step 1,
    so the first-halt answers are step 1's."""
    from evaluators.arc import ARC, ARCEvaluatorConfig
    from tracing.per_step import StepVoting

    grid_a, out_a = np.array([[1, 2]]), np.array([[3], [4]])
    grid_b, out_b = np.array([[5]]), np.array([[6, 6]])
    perm = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8, 9])  # swap colours 1 and 2; transform t0
    names = ["<blank>", "A", f"A{SEP}t0{SEP}{''.join(map(str, perm))}", "B"]
    puzzles = {
        "A": {"train": [], "test": [{"input": grid_a.tolist(), "output": out_a.tolist()}]},
        "B": {"train": [], "test": [{"input": grid_b.tolist(), "output": out_b.tolist()}]},
    }
    (tmp_path / "identifiers.json").write_text(json.dumps(names))
    (tmp_path / "test_puzzles.json").write_text(json.dumps(puzzles))
    base = ARC(ARCEvaluatorConfig(pass_Ks=[1, 2], aggregated_voting=False), [str(tmp_path)], [0])
    inputs = np.stack([_canvas(grid_a), _canvas(perm[grid_a]), _canvas(grid_b), _canvas(grid_b)])
    batch = {
        "inputs": torch.from_numpy(inputs).to(torch.int32),
        "puzzle_identifiers": torch.tensor([1, 2, 3, 3], dtype=torch.int32),
    }
    wrong = _canvas(np.array([[0]]))
    right_id, right_aug = _canvas(out_a), _canvas(perm[out_a])
    right_b = _canvas(out_b)  # only in row 3, which is not traced: it must not vote
    step_preds = [
        [wrong, wrong, wrong, right_b],
        [right_id, wrong, wrong, right_b],
        [right_id, right_aug, wrong, right_b],
    ]
    q = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def cap(preds: list[np.ndarray]) -> StepCapture:
        full = torch.from_numpy(np.stack(preds)).to(torch.int32)
        return StepCapture(
            preds=full[:3].numpy(), q_halt=q[:3].numpy(), q_continue=np.zeros(3),
            would_halt=np.ones(3, bool), token_acc=np.ones(3), has_labels=np.ones(3, bool),
            h_cos_dist=np.zeros(3), l_cos_dist=np.zeros(3), dz_rel_h=np.zeros(3),
            dz_rel_l=np.zeros(3), h_cycles=[], full_preds=full, full_q_halt=q,
        )  # fmt: skip

    voting = StepVoting(base, 3)
    voting.update(batch, torch.tensor([0, 1, 2]), [cap(p) for p in step_preds])
    got = voting.result()
    assert got == {
        "pass@1_by_step": [0.0, 0.5, 0.5],
        "pass@2_by_step": [0.0, 0.5, 0.5],
        "first_halt": {"pass@1": 0.0, "pass@2": 0.0},
    }
    # The split step with the q ranking reversed: the wrong answer wins pass@1, not pass@2.
    voting = StepVoting(base, 3)
    flipped = [cap(p) for p in step_preds]
    flipped = [replace(c, full_q_halt=torch.tensor([0.0, 1.0, 0.0, 0.0])) for c in flipped]
    voting.update(batch, torch.tensor([0, 1, 2]), flipped)
    got = voting.result()
    assert got is not None
    assert (got["pass@1_by_step"], got["pass@2_by_step"]) == ([0.0, 0.0, 0.5], [0.0, 0.5, 0.5])


# ----------------------------------------------------------------------------------------------
# Several ranks
# ----------------------------------------------------------------------------------------------
def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_write_the_one_rank_trace(
    checkpoint: Path, traced: Path, tmp_path: Path
) -> None:
    """``python -m tracing.trace`` under torchrun with 2 ranks (half the batch each) writes the
    records of one process, in the same order (floats to 1e-4: other batch shapes round
    differently), and rank 0 alone writes."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    specs = ",".join(f'"{s}"' for s in PERTURB)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tracing.trace", f"checkpoint={checkpoint}", "evaluators=[{name: arc}]",
           f"output_dir={tmp_path / 'eval'}", "device=cpu", "trace.aug=all",
           "trace.probe_l_steps=True", "trace.shard_size=7", f"trace.out={out}",
           f"trace.perturb=[{specs}]"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _records(traced), _records(out)
    assert [(r["puzzle_id"], r["aug"], r["variant"]) for r in one] == [
        (r["puzzle_id"], r["aug"], r["variant"]) for r in two
    ]
    for a, b in zip(one, two, strict=True):
        assert _close(a, b), (a["puzzle_id"], a["aug"], a["variant"])
    index_one = json.loads((traced / "index.json").read_text())
    index_two = json.loads((out / "index.json").read_text())
    assert _close(index_one["per_step"], index_two["per_step"])
    assert index_one["records"] == index_two["records"]


# ----------------------------------------------------------------------------------------------
# Test-time search in the trace
# ----------------------------------------------------------------------------------------------
SEARCH_STEPS = 2


@pytest.fixture(scope="module")
def strict_checkpoint(strict_arc_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``checkpoint``'s tiny TRM trained on the strict-split build of the same tasks, so the
    evaluation tasks' puzzle-embedding rows were never trained (what the search replaces); 6
    steps at lr 1e-2, so that it decodes grids rather than nothing."""
    from training.loop import run_training
    from utils.logging import build_logger

    run_dir = tmp_path_factory.mktemp("trm_strict_run")
    overrides = [
        "+experiment=tiny_cpu", "logger=none", "data_workers=0", "global_batch_size=8",
        "arch=trm", "arch.hidden_size=32", "arch.H_cycles=2", "arch.L_cycles=1",
        f"arch.halt_max_steps={H}", "evaluators=[]", "max_steps=6", "lr=1e-2",
        f"data_paths=[{strict_arc_data}]", f"+checkpoint_path={run_dir}",
    ]  # fmt: skip
    config = load_pretrain_config(compose(overrides=overrides))
    logger = build_logger(
        "none", project="t", run_name="t", config={}, run_dir=str(run_dir), is_main=True
    )
    run_training(config, DistInfo(), logger=logger)
    return run_dir / "step_6"


@pytest.fixture(scope="module")
def search_traced(strict_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python evaluate.py trace.enabled=True tto.steps=2`` on the strict TRM checkpoint, every
    augmentation, one perturbation."""
    import evaluate

    root = tmp_path_factory.mktemp("search_trace")
    cfg = compose("cfg_evaluate", overrides=[
        f"checkpoint={strict_checkpoint}", "evaluators=[{name: arc}]",
        f"output_dir={root / 'eval'}", "trace.enabled=True", "trace.aug=all",
        f"trace.out={root / 'traces'}", f"tto.steps={SEARCH_STEPS}", "tto.lr=0.1",
    ])  # fmt: skip
    cfg.trace.perturb = PERTURB[:1]
    ecfg, tc = load_configs(cfg)
    evaluate.run_trace_instead(ecfg, tc, DistInfo())
    return root / "traces"


def _search_rows(checkpoint: Path) -> Any:
    """Each query row of the search loader evaluate.py searches with, as (row key, one-row
    batch, the loaded head)."""
    from evaluate import resolve
    from evaluators.arc import ARC, ARCEvaluatorConfig
    from training.data import create_dataloader
    from training.state import build_model
    from utils.checkpoint import load_model_weights

    resolved = resolve(EvaluateConfig(checkpoint=str(checkpoint), evaluators=[{"name": "arc"}]))
    loader, data = create_dataloader(
        resolved.config, "test", DistInfo(), test_set_mode=True, with_demos=True
    )
    head, _ = build_model(resolved.config, data, DistInfo())
    load_model_weights(head, resolved.weights, resize_puzzle_emb=False, source="test")
    head.eval()
    base = ARC(ARCEvaluatorConfig(), data.config.dataset_paths, data.identifier_offsets)
    frames = TaskFrames.from_files(base.identifier_names, base.test_puzzles)
    for _, batch, _ in loader:
        for b in range(len(batch["inputs"])):
            row = frames.row_key(int(batch["puzzle_identifiers"][b]), batch["inputs"][b].numpy())
            if row is not None:
                yield row, {k: v[b : b + 1] for k, v in batch.items()}, head


def test_the_trace_records_the_search_of_each_row(
    strict_checkpoint: Path, search_traced: Path
) -> None:
    """Each clean record's ``search`` is ``search(...)`` of its row computed alone (the
    unaugmented rows, one per task, to keep it short): the trajectory of its every candidate (to
    float32 rounding of other batch shapes), the start, and the attempts' grids (de-augmented
    like the steps) with their demo log-likelihoods; every clean record of the 9 rows holds one,
    perturbed variants hold null."""
    from training.latent_search import TTOConfig, search

    records = _records(search_traced)
    clean = _by_variant(records, "clean")
    assert len(clean) == 9 and len(records) == 18
    assert all(r["search"] is None for r in records if r["variant"] != "clean")
    assert all(len(r["search"]["attempts"]) == 2 for r in clean.values())
    assert all(a["pred"] for r in clean.values() for a in r["search"]["attempts"])
    config = TTOConfig(steps=SEARCH_STEPS, lr=0.1)
    seen = 0
    for row, batch, head in _search_rows(strict_checkpoint):
        if row.aug != "identity":
            continue
        entry = clean[(row.task, row.test_index, row.aug)]["search"]
        assert entry["options"] == {
            k: v for k, v in config.model_dump(mode="json").items() if k != "count_flops"
        }
        alone = search(head, batch, config)
        assert alone.searched.tolist() == [True]
        trajectory = alone.loglik_trajectory[0]
        assert trajectory.shape == (1, SEARCH_STEPS + 1)  # TRM: one candidate, the table mean
        got = torch.tensor(entry["loglik_trajectory"], dtype=torch.float32)
        torch.testing.assert_close(got, trajectory, rtol=1e-5, atol=1e-5)
        assert entry["loglik_start"] == pytest.approx(float(trajectory[0, 0]), abs=1e-5)
        assert entry["best_is_start"] == bool(alone.best_is_start[0])
        assert [a["pred"] for a in entry["attempts"]] == [
            grid_string(row.undo(crop(p.numpy()))) for p in alone.preds[0]
        ]
        demo_ll = [a["demo_loglik"] for a in entry["attempts"]]
        assert demo_ll == pytest.approx(alone.demo_loglik[0].tolist(), abs=1e-5)
        # The best point of the trajectory is attempt 1, and nothing beats the start unseen.
        assert demo_ll[0] == pytest.approx(float(trajectory.max()), abs=1e-6)
        assert demo_ll[0] >= entry["loglik_start"] - 1e-6
        seen += 1
    assert seen == 3


def test_the_traced_attempts_are_evaluate_pys(
    strict_checkpoint: Path, search_traced: Path, tmp_path: Path
) -> None:
    """The records' attempts, voted over augmentations by the ARC-tto rule
    (``evaluators.arc_tto.attempt_order``, a single grid repeated as the ARC evaluator does), are
    the attempts of ``evaluate.py tto.steps=2``'s ``submission.json`` for every test pair of the
    task it evaluates (``max_eval_groups=1``, the first task of the trace)."""
    from evaluate import run as run_evaluate
    from evaluators.arc import grid_hash
    from evaluators.arc_tto import attempt_order
    from training.latent_search import TTOConfig

    tto = TTOConfig(steps=SEARCH_STEPS, lr=0.1)
    ecfg = _ecfg(strict_checkpoint, tmp_path, tto=tto, max_eval_groups=1)
    metrics = run_evaluate(ecfg, DistInfo())
    assert metrics["tto/puzzles"] == 3  # the identity and 2 augmentations of one test pair
    submission = json.loads((tmp_path / "submission.json").read_text())
    pools: dict[tuple[str, int], dict[int, dict[str, list[float]]]] = {}
    grids: dict[str, str] = {}
    for r in _records(search_traced):
        if r["variant"] != "clean":
            continue
        pair = pools.setdefault((r["puzzle_id"], r["test_index"]), {})
        for a, attempt in enumerate(r["search"]["attempts"]):
            h = grid_hash(parse_grid(attempt["pred"]))
            grids[h] = attempt["pred"]
            pair.setdefault(a, {}).setdefault(h, []).append(attempt["demo_loglik"])
    (task,) = submission
    assert task == next(t for t, _ in pools)
    for (other, test_index), pair in pools.items():
        if other != task:
            continue
        order = attempt_order(pair)
        first, second = (grids[h] for h in (order + order[:1])[:2])
        entry = submission[task][test_index]
        assert first == grid_string(np.array(entry["attempt_1"], dtype=np.uint8))
        assert second == grid_string(np.array(entry["attempt_2"], dtype=np.uint8))


def test_the_viewer_loads_a_trace_with_search(search_traced: Path, tmp_path: Path) -> None:
    from tracing.viewer import load_trace
    from tracing.viewer import main as viewer_main

    trace = load_trace(search_traced)
    assert sum(r["search"] is not None for r in trace.records) == 9
    out = tmp_path / "viewer.html"
    viewer_main([str(search_traced), "-o", str(out)])
    assert out.stat().st_size > 0


def test_search_off_leaves_the_trace_byte_for_byte(checkpoint: Path, traced: Path) -> None:
    """tto.steps=0 with every other search option changed writes ``traced``'s shards byte for
    byte (whose records hold exactly the format's keys, no ``search``:
    ``test_written_files_follow_the_format``)."""
    from training.latent_search import TTOConfig

    out = traced.parent / "off"
    tto = TTOConfig(steps=0, lr=0.5, optimizer="sgd", init="perturbed", loo=False)
    tc = TraceConfig(aug="all", probe_l_steps=True, out=str(out), perturb=PERTURB, shard_size=7)
    run_trace(_ecfg(checkpoint, traced.parent / "eval_off", tto=tto), tc, DistInfo())
    first = json.loads((traced / "index.json").read_text())
    assert first["shards"] == json.loads((out / "index.json").read_text())["shards"]
    for shard in first["shards"]:
        assert (traced / shard).read_bytes() == (out / shard).read_bytes()
    assert all("search" not in r for r in _records(out))
