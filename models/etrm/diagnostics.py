"""Collapse diagnostics of an encoder's contexts, as metric sums the training step can average.

ETRM (``models/recursive_reasoning/etrm.py``, ``_forward_train``) logged the context's mean,
std and norm, its variance across the batch and within groups of rows sharing a puzzle. The
variances depend on the context's scale (an RMS-normed context is bounded near 1, a VAE's
projection is not), so two scale-free measures are added: the mean cosine similarity between
contexts of different tasks against that between augmented copies of one task (siblings), and
whether each row's nearest other row by cosine is a sibling.

Every value is a sum over the rows it is about, with that family's ``count``, so that summing
over processes and dividing by the count gives the mean over every process's rows: a batch-level
statistic (a variance) enters as its value times its rows. Pairs are formed within one
process's batch. Rows without demonstrations (padding) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENCODER = "encoder"  # every row with demos
SAME_GROUP = "encoder_same_group"  # rows with at least one sibling in the batch
CROSS_GROUP = "encoder_cross_group"  # rows with at least one row of another group


@torch.no_grad()
def context_diagnostics(
    context: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Metric sums of ``context`` [B, T, D] with task groups ``groups`` int [B] over the rows
    where ``valid`` [B] is set, float32 scalars without a host sync:

    * ``encoder/``: ``count``; ``context_norm`` (mean L2 norm of a row's tokens),
      ``context_std`` (std of a row's T·D values), ``cross_sample_var`` (ETRM's: the squared
      distance to the batch mean averaged over T·D, i.e. its batch variance times the rows);
    * ``encoder_same_group/``: rows with a sibling: ``count``, ``within_var`` (squared distance
      to the group mean averaged over T·D; ETRM averaged per group instead), ``cosine`` (mean
      cosine to its siblings), ``nn_retrieval`` (1 when its nearest other row is a sibling);
    * ``encoder_cross_group/``: rows with a row of another group: ``count``, ``cosine``.
    """
    B = context.shape[0]
    c_BE = context.detach().to(torch.float32).reshape(B, -1)
    w_B = valid.to(torch.float32)
    n = w_B.sum()

    norm_B = context.detach().to(torch.float32).norm(dim=-1).mean(-1)
    std_B = c_BE.std(dim=1)
    mean_E = (w_B[:, None] * c_BE).sum(0) / n.clamp_min(1)
    spread_B = (c_BE - mean_E).square().mean(1)

    pair_BB = valid[:, None] & valid[None, :]
    eye_BB = torch.eye(B, dtype=torch.bool, device=context.device)
    same_BB = pair_BB & (groups[:, None] == groups[None, :]) & ~eye_BB
    other_BB = pair_BB & (groups[:, None] != groups[None, :])
    cos_BB = F.normalize(c_BE, dim=1) @ F.normalize(c_BE, dim=1).T

    n_same_B = same_BB.sum(1)
    has_sibling_B = n_same_B > 0
    members_BB = (same_BB | (eye_BB & valid[:, None])).to(torch.float32)
    group_mean_BE = (members_BB @ c_BE) / members_BB.sum(1, keepdim=True).clamp_min(1)
    within_B = (c_BE - group_mean_BE).square().mean(1)
    sibling_cos_B = (cos_BB * same_BB).sum(1) / n_same_B.clamp_min(1)
    others_BB = pair_BB & ~eye_BB
    nearest_B = cos_BB.masked_fill(~others_BB, float("-inf")).argmax(1)
    retrieved_B = same_BB.gather(1, nearest_B[:, None]).squeeze(1)

    n_other_B = other_BB.sum(1)
    has_other_B = n_other_B > 0
    other_cos_B = (cos_BB * other_BB).sum(1) / n_other_B.clamp_min(1)

    def total(values_B: torch.Tensor, rows_B: torch.Tensor) -> torch.Tensor:
        return torch.where(rows_B, values_B.to(torch.float32), 0.0).sum()

    return {
        f"{ENCODER}/count": n,
        f"{ENCODER}/context_norm": total(norm_B, valid),
        f"{ENCODER}/context_std": total(std_B, valid),
        f"{ENCODER}/cross_sample_var": total(spread_B, valid),
        f"{SAME_GROUP}/count": has_sibling_B.sum().to(torch.float32),
        f"{SAME_GROUP}/within_var": total(within_B, has_sibling_B),
        f"{SAME_GROUP}/cosine": total(sibling_cos_B, has_sibling_B),
        f"{SAME_GROUP}/nn_retrieval": total(retrieved_B, has_sibling_B),
        f"{CROSS_GROUP}/count": has_other_B.sum().to(torch.float32),
        f"{CROSS_GROUP}/cosine": total(other_cos_B, has_other_B),
    }
