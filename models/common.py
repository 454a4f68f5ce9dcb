"""Initialisation shared by every layer."""

from __future__ import annotations

import math

import torch


def trunc_normal_init_(
    tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0
) -> torch.Tensor:
    """Fill ``tensor`` in place with JAX/Flax's truncated normal and return it.

    Samples lie in ``[lower·σ', upper·σ']`` and have standard deviation exactly ``std``: σ' is
    ``std`` divided by the standard deviation of a unit normal truncated to ``[lower, upper]``
    (``torch.nn.init.trunc_normal_`` truncates without this correction, so its std is smaller).
    ``std == 0`` gives zeros. Inverse-CDF sampling: uniform in ``[erf(l/√2), erf(u/√2)]``,
    then ``erfinv`` and scaling by ``√2·σ'``.
    """
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        sqrt2 = math.sqrt(2.0)
        a, b = math.erf(lower / sqrt2), math.erf(upper / sqrt2)
        z = (b - a) / 2  # probability mass of [lower, upper] under N(0, 1)
        phi_l = math.exp(-0.5 * lower**2) / math.sqrt(2 * math.pi)
        phi_u = math.exp(-0.5 * upper**2) / math.sqrt(2 * math.pi)
        variance = 1 - (upper * phi_u - lower * phi_l) / z - ((phi_u - phi_l) / z) ** 2
        comp_std = std / math.sqrt(variance)
        tensor.uniform_(a, b)
        tensor.erfinv_()
        tensor.mul_(sqrt2 * comp_std)
        tensor.clip_(lower * comp_std, upper * comp_std)
    return tensor
