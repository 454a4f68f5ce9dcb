"""Hand-written references the model tests compare against, kept apart from the model code.

``trm_recursion_by_hand`` re-derives TRM's recursion (upstream
``models/recursive_reasoning/trm.py``, ``TinyRecursiveReasoningModel_ACTV1_Inner.forward``) as
plain loops over the inner model's blocks, so TRM and TRM-JD (same recursion, different
gradients) are both checked against one independent statement of it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def trm_recursion_by_hand(inner: nn.Module, batch: dict[str, Tensor]) -> list[Tensor]:
    """z_H [B, P + S, D] after each of the T = ``H_cycles`` outer cycles of one supervision
    step started from the init buffers, without gradient.

    z ← f(z + y + x) n = ``L_cycles`` times, then y ← f(y + z), T times, with y = z_H, z = z_L,
    f the blocks of ``inner.L_level`` applied in order and x the input embedding. Needs RoPE
    (``inner.rotary_emb``).
    """
    config = inner.config
    with torch.no_grad():
        x = inner.input_embeddings(batch)
        z_H = inner.H_init.expand_as(x).clone()
        z_L = inner.L_init.expand_as(x).clone()
        cos_sin = inner.rotary_emb()

        def f(h: Tensor) -> Tensor:
            for layer in inner.L_level.layers:
                h = layer(cos_sin=cos_sin, hidden_states=h)
            return h

        after_each_cycle = []
        for _ in range(config.H_cycles):
            for _ in range(config.L_cycles):
                z_L = f(z_L + z_H + x)
            z_H = f(z_H + z_L)
            after_each_cycle.append(z_H)
    return after_each_cycle
