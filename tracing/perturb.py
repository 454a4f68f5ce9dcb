"""Reproducible perturbations of the recursion: seeded noise on a latent or the input injection.

``z ← z + sigma_rel · RMS(z) · ε`` with RMS taken per row over all of the row's positions and
features, and ε ~ N(0, I) drawn in float32 on the CPU from a ``torch.Generator`` seeded by
(seed, the record's identity, the ACT step, the latent's name): never the global RNG, so a
perturbed trace is the same on every device, batch composition and rank.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from models.recursive_reasoning.recording import (
    RecordingSite,
    perturbing_injection,
    recording_sites,
)
from tracing.config import Perturbation
from utils.schema import ConfigError


def noise_seed(seed: int, record_key: str, step: int, name: str) -> int:
    """A 63-bit seed from the perturbation seed, the record, the ACT step and the latent."""
    digest = hashlib.sha256(f"{seed}\x1f{record_key}\x1f{step}\x1f{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def add_noise(z: torch.Tensor, sigma_rel: float, seeds: Sequence[int | None]) -> torch.Tensor:
    """``z`` [B, ...] with ``sigma_rel · RMS(z_b) · ε_b`` added to each row b whose seed is not
    None (ε_b drawn from its seed), in float32, cast back to z's dtype. Other rows unchanged."""
    out = z.to(torch.float32).clone()
    for b, seed in enumerate(seeds):
        if seed is None:
            continue
        generator = torch.Generator(device="cpu").manual_seed(seed)
        eps = torch.randn(z.shape[1:], generator=generator, dtype=torch.float32)
        rms = out[b].square().mean().sqrt()
        out[b] = out[b] + sigma_rel * rms * eps.to(z.device)
    return out.to(z.dtype)


def target_latents(site: RecordingSite, target: str) -> list[str]:
    """The carry latents a ``z_H``/``z_L`` target names (every ``z_L*`` of a multi-latent
    model); ``ConfigError`` when the architecture has none."""
    names = [n for n in getattr(site, "carry_inits", {}) if n == target or n.startswith(target)]
    if not names:
        raise ConfigError(
            f"trace.perturb target={target}: this architecture's latents are "
            f"{sorted(getattr(site, 'carry_inits', {}))}; choose one of them or injection"
        )
    return names


@contextlib.contextmanager
def perturbed_forward(
    model: nn.Module, perturbation: Perturbation, record_keys: Sequence[str | None]
) -> Iterator[None]:
    """The next forward of ``model``'s inner model is perturbed (keep one ACT step inside).

    ``record_keys`` [B]: each row's identity (None: left unperturbed, e.g. a padding row).
    A ``z_H``/``z_L`` target perturbs the latents the step starts from (after the reset of
    the first step), the ``injection`` target the step's input injection.
    """
    p = perturbation

    def seeds(name: str) -> list[int | None]:
        return [None if k is None else noise_seed(p.seed, k, p.step, name) for k in record_keys]

    site = recording_sites(model, "perturb")[0]
    if p.target == "injection":
        with perturbing_injection(model, lambda x: add_noise(x, p.sigma_rel, seeds("injection"))):
            yield
        return
    names = target_latents(site, p.target)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        carry = dict(args[0])
        for name in names:
            carry[name] = add_noise(carry[name], p.sigma_rel, seeds(name))
        return (carry, *args[1:]), kwargs

    handle = site.register_forward_pre_hook(hook, prepend=True, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
