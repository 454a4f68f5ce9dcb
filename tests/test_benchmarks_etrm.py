"""The ETRM benchmarks run end to end: each module's tiny preset, shrunk further (4 × 4 grids,
hidden 16, one round), prints its JSON report with the keys and the invariants it promises;
the ARC demo-count draw and the saved-activation meter against hand-computed values."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from benchmarks import encoder_packing, etrm_step, eval_caching
from benchmarks.etrm_step import (
    ARC_TEST_DEMO_COUNTS,
    ARC_TRAIN_DEMO_COUNTS,
    SavedTensorMeter,
    demo_batches,
    demo_counts,
    mean_demos,
)

SMOKE = ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
         "--max-demos", "4", "--rounds", "1", "--steps", "1", "--warmup", "0",
         "arch.hidden_size=16", "arch.H_cycles=1", "arch.L_cycles=1"]  # fmt: skip


def report(
    main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture
) -> dict:
    main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_arc_demo_counts_have_the_builds_ranges_and_means() -> None:
    # ETRM's ARC-AGI-1 build: training 1..10 demos, mean 3.07; evaluation 2..7, mean 3.42.
    for table, low, high, mean in ((ARC_TRAIN_DEMO_COUNTS, 1, 10, 3.07),
                                   (ARC_TEST_DEMO_COUNTS, 2, 7, 3.42)):  # fmt: skip
        assert sum(table.values()) == pytest.approx(1.0)
        assert sum(k * p for k, p in table.items()) == pytest.approx(mean)
        counts = demo_counts(table, 1000, 10)
        assert (counts.min().item(), counts.max().item()) == (low, high)
        assert counts.float().mean().item() == pytest.approx(mean, abs=0.01)
    assert demo_counts(ARC_TRAIN_DEMO_COUNTS, 1000, 4).max().item() == 4


def test_demo_batches_deal_one_stratified_draw() -> None:
    batches = demo_batches(4, 4, 10, ARC_TRAIN_DEMO_COUNTS, torch.device("cpu"), seq_len=9)
    masks = [b["demo_mask"] for b in batches]
    for b, mask in zip(batches, masks, strict=True):
        # Each row's first slots hold its demos, as the loader fills them; the rest is PAD.
        assert torch.equal(mask, torch.arange(10) < mask.sum(1, keepdim=True))
        assert (b["demo_inputs"][~mask] == 0).all() and (b["demo_labels"][~mask] == 0).all()
        assert b["demo_inputs"].shape == (4, 10, 9) and b["inputs"].shape == (4, 9)
    counts = torch.cat([m.sum(1) for m in masks])
    # The 16 quantiles of the training table, by hand: 7 × 2, 4 × 3, 3 × 4, one 5 and one 6.
    assert sorted(counts.tolist()) == [2] * 7 + [3] * 4 + [4] * 3 + [5, 6]
    # Dealt round-robin: the smallest 4 counts (all 2) go one to each batch.
    assert all(m.sum(1).min().item() == 2 for m in masks)
    assert mean_demos(batches) == pytest.approx(49 / 16, abs=1e-3)


def test_saved_tensor_meter_counts_unique_saved_storages_without_the_excluded() -> None:
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)
    meter = SavedTensorMeter([a])
    with meter.measure():
        (a * b * b).sum().backward()  # mul saves a and b, then (a·b) and b: b counted once
    assert meter.mib * 2**20 == 2 * 1000 * 4  # b and a·b, float32; a excluded


def test_etrm_step_reports_every_config(capsys: pytest.CaptureFixture) -> None:
    out = report(etrm_step.main, [*SMOKE, "--fct-steps", "3"], capsys)
    assert set(out["configs"]) == {"trm", "etrm", "etrm_fct"}
    assert {k: c["updates_per_batch"] for k, c in out["configs"].items()} == {
        "trm": 1, "etrm": 1, "etrm_fct": 3}  # fmt: skip
    for c in out["configs"].values():
        assert c["s_per_batch"] > 0 and c["saved_activation_mib"] > 0
        assert c["s_per_update"] == pytest.approx(c["s_per_batch"] / c["updates_per_batch"],
                                                  rel=1e-3)  # fmt: skip
        assert c["step_peak_mib"] is None  # CPU
    assert out["configs"]["etrm"]["num_params"] > out["configs"]["trm"]["num_params"]
    ratios = out["ratios"]
    for key in (
        "etrm_vs_trm_time",
        "etrm_fct_update_vs_trm_time",
        "etrm_fct_batch_vs_trm_time",
        "etrm_vs_trm_saved_activations",
        "etrm_fct_vs_trm_saved_activations",
    ):
        assert ratios[key] > 0
    # The encoder's activations come on top of the same decoder's.
    assert ratios["etrm_vs_trm_saved_activations"] > 1
    assert out["decoder"]["hidden_size"] == 16 and out["max_demos"] == 4


def test_encoder_packing_agrees_with_padding(capsys: pytest.CaptureFixture) -> None:
    out = report(encoder_packing.main, SMOKE, capsys)
    assert set(out["encoders"]) == {"standard", "lpn_standard"}
    for e in out["encoders"].values():
        assert e["padded_vs_packed_time"] > 0 and isinstance(e["goal_met"], bool)
        assert e["context_max_abs_diff"] <= 1e-5 * max(e["context_max_abs"], 1.0)
        assert e["grad_max_rel_diff"] <= 1e-4
        # Padding encodes every slot: more saved activations than the valid slots alone.
        assert e["padded_vs_packed_saved_activations"] > 1
    assert 0 < out["valid_slot_fraction"] < 1


def test_eval_caching_encodes_once_and_predicts_the_same(capsys: pytest.CaptureFixture) -> None:
    out = report(eval_caching.main, [*SMOKE, "--act-steps", "4"], capsys)
    assert out["encoder_calls_per_rollout"] == {"cached": 1, "reencode": 4}
    assert out["rollout_steps"] == 4
    assert out["preds_equal"] is True and out["preds_equal_fraction"] == 1.0
    assert out["logits_max_abs_diff"] == 0.0 and out["q_halt_logits_max_abs_diff"] == 0.0
    assert out["reencode_vs_cached_time"] > 0
