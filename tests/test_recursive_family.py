"""The puzzle-id family refuses options that only demonstration-encoder models have."""

from __future__ import annotations

import pytest

from models.family import family_of
from models.recursive_reasoning.common import ModelDims
from training.config import load_pretrain_config
from utils.config import compose
from utils.schema import ConfigError

DIMS = ModelDims(batch_size=2, seq_len=10, vocab_size=6, num_puzzle_identifiers=5)


def test_encoder_lr_scale_is_refused_in_one_line_without_an_encoder() -> None:
    config = load_pretrain_config(compose(overrides=["+experiment=tiny_cpu", "arch=trm"]))
    family = family_of(config.arch)
    head = family.build(config.arch, DIMS)
    assert list(family.optimizer_groups(head, False, encoder_lr_scale=0.0)) == [
        "puzzle_emb",
        "weights",
    ]
    with pytest.raises(ConfigError) as info:
        family.optimizer_groups(head, False, encoder_lr_scale=0.1)
    assert "\n" not in str(info.value) and "encoder_lr_scale" in str(info.value)
