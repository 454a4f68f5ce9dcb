"""Metric sums become means by family: ``F/name`` over ``F/count``, bare names over ``count``,
losses over the global batch (``training.step.normalize_metrics``), on hand-made sums."""

from __future__ import annotations

import pytest

from training.step import normalize_metrics

# Two ranks' sums, added by hand: rank 0 and rank 1 of a global batch of 16.
RANK0 = {"count": 3.0, "accuracy": 2.4, "exact_accuracy": 1.0, "steps": 9.0, "lm_loss": 12.0,
         "q_halt_loss": 4.0, "all_steps/count": 8.0, "all_steps/accuracy": 6.0,
         "all_steps/exact_accuracy": 2.0, "encoder/count": 8.0, "encoder/context_norm": 40.0,
         "kl_loss": 1.6, "kl_loss_weighted": 0.16}  # fmt: skip
RANK1 = {"count": 1.0, "accuracy": 0.6, "exact_accuracy": 0.0, "steps": 3.0, "lm_loss": 4.0,
         "q_halt_loss": 2.0, "all_steps/count": 7.0, "all_steps/accuracy": 3.0,
         "all_steps/exact_accuracy": 1.0, "encoder/count": 8.0, "encoder/context_norm": 24.0,
         "kl_loss": 0.0, "kl_loss_weighted": 0.0}  # fmt: skip


def test_each_family_is_divided_by_its_own_count() -> None:
    summed = {k: RANK0[k] + RANK1[k] for k in RANK0}
    means = normalize_metrics(summed, global_batch_size=16, prefix="train")
    assert means == pytest.approx({
        # TRM's, over the 4 rows that halted
        "train/count": 1.0, "train/accuracy": 3.0 / 4, "train/exact_accuracy": 1.0 / 4,
        "train/steps": 12.0 / 4,
        # losses over the global batch, whatever their family or suffix
        "train/lm_loss": 16.0 / 16, "train/q_halt_loss": 6.0 / 16, "train/kl_loss": 1.6 / 16,
        "train/kl_loss_weighted": 0.16 / 16,
        # ETRM's, over the 15 rows with labels at this step
        "train/all_steps/accuracy": 9.0 / 15, "train/all_steps/exact_accuracy": 3.0 / 15,
        # the encoder's, over the 16 encoded rows
        "train/encoder/context_norm": 64.0 / 16,
    })  # fmt: skip
    assert "train/all_steps/count" not in means and "train/encoder/count" not in means


def test_an_empty_family_gives_zeros_not_nan() -> None:
    sums = {"count": 0.0, "accuracy": 0.0, "all_steps/count": 0.0, "all_steps/accuracy": 0.0,
            "lm_loss": 0.0}  # fmt: skip
    means = normalize_metrics(sums, global_batch_size=8, prefix="eval")
    assert means == {"eval/count": 0.0, "eval/accuracy": 0.0, "eval/all_steps/accuracy": 0.0,
                     "eval/lm_loss": 0.0}  # fmt: skip


def test_upstream_metrics_are_unchanged() -> None:
    """Without families: upstream's ``v / (global_batch if k.endswith("loss") else count)``."""
    sums = {"count": 5.0, "accuracy": 4.0, "exact_accuracy": 2.0, "q_halt_accuracy": 3.0,
            "steps": 10.0, "lm_loss": 7.0, "q_halt_loss": 1.5, "q_continue_loss": 0.5}  # fmt: skip
    expected = {f"train/{k}": v / (32 if k.endswith("loss") else 5.0) for k, v in sums.items()}
    assert normalize_metrics(sums, global_batch_size=32, prefix="train") == expected


def test_a_family_without_count_is_refused() -> None:
    with pytest.raises(ValueError, match="'probe/accuracy' has no probe/count"):
        normalize_metrics({"count": 1.0, "probe/accuracy": 1.0}, 4, "train")
