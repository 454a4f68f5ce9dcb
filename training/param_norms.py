"""Per-parameter gradient norms: the JD fork's ``train/grad_norm_<name>`` metrics.

The research fork (mattbuot/TinyRecursiveModelsJD, ``pretrain.py``) logs, on rank 0 after the
cross-rank gradient reduction and before the optimizers step, the 2-norm of every parameter's
``.grad`` under the key ``train/grad_norm_<name>``, ``<name>`` from the trained module's
``named_parameters()``. It does so at every step, with one host read per parameter.

Here the interval is ``log_param_grad_norms_every`` (None or 0: never), and the norms are
device tensors that ``training.step`` reads together with the step's other metrics and norms,
before any clipping: one host read per logging step, none on the others.

Names are those of the loss head (``model.inner.L_level.layers.0.mlp.gate_up_proj.weight``),
the module the fork trains, without the ``_orig_mod.`` prefix its compiled model adds. The
puzzle-embedding table gets no entry, as in the fork: its rows (``local_weights``) are a
buffer with a gradient, not a parameter, so ``named_parameters`` does not list them, and the
global ``train/grad_norm`` leaves them out too.
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import PretrainConfig

PREFIX = "train/grad_norm_"


def logs_param_grad_norms(config: PretrainConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (the counter once the step is counted, so 1-based for a
    fresh run) logs the per-parameter norms: every ``log_param_grad_norms_every`` steps."""
    every = config.log_param_grad_norms_every
    return bool(every) and step % every == 0


def param_grad_norms(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{"train/grad_norm_<name>": ‖p.grad‖₂}`` for every parameter of ``module`` that has a
    gradient, in ``named_parameters`` order.

    Each value is a 0-dim tensor on the gradient's device, in float32 (computed by one
    ``torch._foreach_norm`` per device and dtype, no host read); a parameter whose ``.grad`` is
    None (frozen, or outside the graph of this step) has no entry.
    """
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return {}
    grads = [g.float() if g.dtype != torch.float32 else g for _, g in named]
    norms = torch._foreach_norm(grads)
    return {f"{PREFIX}{name}": norm for (name, _), norm in zip(named, norms, strict=True)}
