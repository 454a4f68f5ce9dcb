"""Loading model weights: ours or upstream's ``step_N`` state-dict files.

Upstream saved ``torch.save(model.state_dict())`` of the loss head, usually through
``torch.compile`` (keys ``_orig_mod.model.inner...``). Loading strips the compile (and DDP
``module.``) prefixes, matches keys strictly, and can resize the puzzle-embedding table to the
mean embedding as upstream does when fine-tuning on a dataset with other puzzles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

PUZZLE_EMB_KEY = "model.inner.puzzle_emb.weights"
_PREFIXES = ("_orig_mod.", "module.")


class CheckpointMismatchError(ValueError):
    """The weights do not fit the model; the message says which keys or shapes differ."""


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading ``_orig_mod.`` / ``module.`` (torch.compile, DDP) from every key."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a state-dict file, prefixes stripped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure gets the same one-line report
        raise CheckpointMismatchError(f"{path}: not a readable state dict ({e})") from None
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(state).__name__}")
    return strip_prefixes(state)


def load_model_weights(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    resize_puzzle_emb: bool = True,
    source: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module`` (the loss head) with strict key and shape matching.

    If the puzzle-embedding table differs in shape and ``resize_puzzle_emb`` is set, it is
    replaced by the mean embedding broadcast to the model's shape (upstream's rule for new
    puzzles); any other mismatch raises ``CheckpointMismatchError`` naming the keys.
    """
    state = strip_prefixes(state_dict)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source}: keys do not match the model ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); "
            "check arch=... and its options against the run that wrote it"
        )
    state = dict(state)
    for key, target in expected.items():
        value = state[key]
        if value.shape == target.shape:
            continue
        if key == PUZZLE_EMB_KEY and resize_puzzle_emb and value.shape[1:] == target.shape[1:]:
            state[key] = value.mean(dim=0, keepdim=True).expand_as(target).contiguous()
            continue
        raise CheckpointMismatchError(
            f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
            f"{tuple(target.shape)}; check the architecture options (hidden_size, vocab, ...)"
        )
    module.load_state_dict(state, strict=True)
