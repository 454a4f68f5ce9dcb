"""The variational bottleneck of ETRM's VAE encoders: Gaussian posterior, sampling, KL.

An encoder projects a pre-latent vector to ``mu`` and ``logvar`` (its own ``mu_proj`` and
``logvar_proj``, ETRM's names), samples ``z = mu + ε·exp(logvar/2)`` in training and uses
``z = mu`` in eval mode, and reports each row's KL divergence to N(0, I):
``KL = −½ Σ_l (1 + logvar_l − mu_l² − exp(logvar_l))``, summed over latent dimensions, averaged
over the row's valid demos when there is one latent per demo, and exactly 0 for a row without
demos. ETRM returned the batch mean instead, which its loss then divided by the batch again
(an effective weight of kl_weight / B); per-row values let the loss head reduce the KL like
every other term.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.encoders.base import DemoEncoder, EncoderOutput, masked_mean_over_demos


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, sample: bool) -> torch.Tensor:
    """``mu + ε·exp(logvar/2)`` with ε ~ N(0, I) when ``sample``, else ``mu``; any shape."""
    if not sample:
        return mu
    std = torch.exp(0.5 * logvar)
    return mu + torch.randn_like(std) * std


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) ‖ N(0, I)) in float32: [..., L] × 2 → [...]."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(dim=-1)


def kl_per_row(mu: torch.Tensor, logvar: torch.Tensor, demo_mask: torch.Tensor) -> torch.Tensor:
    """Each row's KL [B] float32 (module doc): mu, logvar [B, L] (one latent per row) or
    [B, K, L] (one per demo slot, averaged over the valid ones); demo_mask bool [B, K]."""
    kl = gaussian_kl(mu, logvar)
    weights = demo_mask.to(torch.float32)
    if kl.dim() == 2:
        return (kl * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return torch.where(demo_mask.any(dim=1), kl, torch.zeros_like(kl))


class VariationalEncoder(DemoEncoder):
    """Base of the VAE encoders: ``mu_proj`` and ``logvar_proj`` map a pre-latent [..., Dp] to
    the posterior's parameters [..., L]; ``logvar_clamp`` (None = none) bounds ``logvar`` to
    [−c, c] before use, as ETRM's later encoders do to keep exp() finite."""

    is_variational: ClassVar[bool] = True
    logvar_clamp: ClassVar[float | None] = None

    def posterior(self, z_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_pre [..., Dp] → (z, mu, logvar), each [..., L]; z sampled in training."""
        mu, logvar = self.mu_proj(z_pre), self.logvar_proj(z_pre)
        if self.logvar_clamp is not None:
            logvar = logvar.clamp(-self.logvar_clamp, self.logvar_clamp)
        return reparameterize(mu, logvar, self.training), mu, logvar

    def row_latent_output(
        self, z_pre: torch.Tensor, demo_mask: torch.Tensor, project: nn.Module
    ) -> EncoderOutput:
        """One latent per row: z_pre [B, Dp] → z [B, L] → ``project`` [L → T·D] → context."""
        z, mu, logvar = self.posterior(z_pre)
        return EncoderOutput(
            context=self.as_context(project(z)),
            z_pooled=z,
            kl_per_sample=kl_per_row(mu, logvar, demo_mask),
            mu=mu,
            logvar=logvar,
        )

    def demo_latent_output(
        self, slots: torch.Tensor, demo_mask: torch.Tensor, project: nn.Module
    ) -> EncoderOutput:
        """One latent per demo (LPN's way): slots [B, K, Dg] → z_k [B, K, L], their mean over
        the valid demos z [B, L] → ``project`` → context; ``mu``/``logvar`` are reported as
        their means over the valid demos [B, L]."""
        z_k, mu, logvar = self.posterior(slots)
        z = masked_mean_over_demos(z_k, demo_mask)
        return EncoderOutput(
            context=self.as_context(project(z)),
            z_pooled=z,
            kl_per_sample=kl_per_row(mu, logvar, demo_mask),
            mu=masked_mean_over_demos(mu, demo_mask),
            logvar=masked_mean_over_demos(logvar, demo_mask),
        )
