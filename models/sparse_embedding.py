"""The puzzle-embedding table and its sign-SGD optimizer.

The table (one row per puzzle identifier, up to ~1M rows for ARC) is a buffer, not a parameter:
only the rows of the current batch get a gradient, through a batch-sized leaf tensor
``local_weights``, and ``CastedSparseEmbeddingSignSGD_Distributed`` writes the update back into
those rows only. Adam would keep two dense moments for the whole table; with such sparse
gradients Adam behaves like sign descent anyway, so sign-SGD is used instead.

Gradient accumulation: each micro-batch looks up other puzzles, so ``local_weights`` and
``local_ids`` hold only the current one's. ``keep_micro_batch`` sets a micro-batch's (ids,
gradient rows) aside before the next forward overwrites them; the step applies sign-SGD once to
the union of every kept micro-batch and the current one, the rows of one id summed first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.common import trunc_normal_init_
from utils.distributed import all_gather_into_tensor


class CastedSparseEmbedding(nn.Module):
    """Embedding table updated row-sparsely by ``CastedSparseEmbeddingSignSGD_Distributed``.

    Buffers (upstream names, so upstream checkpoints load):
        ``weights``: [num_embeddings, embedding_dim] float32, persistent (the table).
        ``local_weights``: [batch_size, embedding_dim] float32 leaf with ``requires_grad``, not
            persistent: the rows of the current batch; the gradient lands on its ``.grad``.
        ``local_ids``: [batch_size] int32, not persistent: the identifiers of those rows.

    Args:
        num_embeddings: number of rows (puzzle identifiers).
        embedding_dim: width of a row.
        batch_size: the local (per-process) batch size; training batches must have exactly it.
        init_std: std of the truncated-normal initialisation; 0 gives zeros (TRM's choice).
        cast_to: dtype of the returned embeddings (the forward dtype, e.g. bfloat16).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        batch_size: int,
        init_std: float,
        cast_to: torch.dtype,
    ) -> None:
        super().__init__()
        self.cast_to = cast_to
        self.register_buffer(
            "weights",
            trunc_normal_init_(torch.empty(num_embeddings, embedding_dim), std=init_std),
            persistent=True,
        )
        self.register_buffer(
            "local_weights",
            torch.zeros(batch_size, embedding_dim, requires_grad=True),
            persistent=False,
        )
        self.register_buffer(
            "local_ids", torch.zeros(batch_size, dtype=torch.int32), persistent=False
        )

    def forward(self, inputs: Tensor) -> Tensor:
        """Look up ``inputs`` (int [B]) and return [B, embedding_dim] in ``cast_to``.

        Evaluation mode reads the table directly (any B). Training mode copies the rows into
        ``local_weights`` and the ids into ``local_ids`` and returns ``local_weights``, so B must
        equal the ``batch_size`` given at construction.
        """
        if not self.training:
            return self.weights[inputs].to(self.cast_to)
        batch_size = self.local_weights.shape[0]
        if inputs.shape != (batch_size,):
            raise ValueError(
                f"CastedSparseEmbedding got puzzle identifiers of shape {tuple(inputs.shape)} in "
                f"training mode, but it was built for a local batch of {batch_size}: every "
                "training batch must have exactly the local batch size (global_batch_size / "
                "world_size); build it with that batch_size, or call .eval() to look up "
                "another number of rows."
            )
        with torch.no_grad():
            self.local_weights.copy_(self.weights[inputs])
            self.local_ids.copy_(inputs)
        return self.local_weights.to(self.cast_to)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        # Module.to() converts buffers outside no_grad, which turns the ``local_weights`` leaf
        # into a non-leaf whose .grad stays empty; upstream avoided it by building the model
        # under ``with torch.device(...)``. Make it a leaf again so .to(device) works too.
        if not self.local_weights.is_leaf:
            self.local_weights = self.local_weights.detach().requires_grad_(True)
        return self


def gather_ids_and_grads(
    local_weights_grad: Tensor, local_ids: Tensor, world_size: int
) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's gradients [N, D] and ids [N] in rank order (N the same on
    every rank: the local batch times the micro-batches kept).

    Returns ``(grads [world_size·N, D], ids [world_size·N])``; the inputs themselves when
    ``world_size == 1``. Collective over the default process group otherwise.
    """
    if world_size == 1:
        return local_weights_grad, local_ids
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"The sparse-embedding optimizer was built with world_size={world_size} but "
            "torch.distributed is not initialised; call init_process_group first, or pass "
            "world_size=1."
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"The sparse-embedding optimizer was built with world_size={world_size}, but the "
            f"default process group has {dist.get_world_size()} ranks; pass the group's size."
        )
    batch_size, dim = local_weights_grad.shape
    all_grads = local_weights_grad.new_empty((world_size * batch_size, dim))
    all_ids = local_ids.new_empty((world_size * batch_size,))
    # Bounded in time like every collective of the run (``utils.distributed``).
    all_gather_into_tensor(all_grads, local_weights_grad)
    all_gather_into_tensor(all_ids, local_ids)
    return all_grads, all_ids


def _sparse_emb_sign_sgd(
    grads: Tensor, ids: Tensor, weights: Tensor, *, lr: float, weight_decay: float
) -> None:
    """Sign-SGD with decoupled weight decay on the rows of ``weights`` named in ``ids``.

    ``grads`` [N, D] and ``ids`` [N] may repeat an id: its gradients are summed first. Only
    the touched rows change: ``w ← w·(1 − lr·wd) − lr·sign(Σ g)``; ``weights`` [num, D] is
    updated in place.
    """
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    summed = grads.new_zeros((unique_ids.shape[0], grads.shape[1]))
    summed.index_add_(0, inverse, grads)
    rows = weights[unique_ids]
    rows.mul_(1.0 - lr * weight_decay).add_(torch.sign(summed), alpha=-lr)
    weights[unique_ids] = rows


class CastedSparseEmbeddingSignSGD_Distributed(torch.optim.Optimizer):
    """Sign-SGD for ``CastedSparseEmbedding``, built from ``puzzle_emb.buffers()``.

    Each parameter group holds the embedding's 3 buffers, told apart as upstream does: the one
    that requires grad is the gradient source (``local_weights``), the 1-D one the ids, the other
    2-D one the table. ``step`` gathers every rank's gradients and ids (``world_size > 1``), sums
    the gradients per id and applies ``_sparse_emb_sign_sgd``; it does nothing when there is no
    gradient. ``lr`` is read from the group at each step (the schedule sets it).

    ``keep_micro_batch`` (gradient accumulation) moves the current (ids [B], gradients [B, D])
    aside; the next ``step`` uses every kept pair with the current one, and ``zero_grad`` drops
    them. Kept pairs are never part of ``state_dict`` (checkpoints fall between steps).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        world_size: int,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate {lr}: it must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay {weight_decay}: it must be >= 0")
        if world_size < 1:
            raise ValueError(f"Invalid world_size {world_size}: it must be >= 1")
        # An attribute, not a group entry: load_state_dict would otherwise bring back the world
        # size of the run that saved the checkpoint.
        self.world_size = world_size
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        for group in self.param_groups:
            self._split_group(group)
        # Per param group: the (ids [B], gradients [B, D]) of the window's earlier micro-batches.
        self._kept: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.param_groups]

    @torch.no_grad()
    def keep_micro_batch(self) -> None:
        """Set the current micro-batch's ids and gradient rows aside for the next ``step`` and
        clear the gradient, so the next micro-batch's rows start from zero."""
        for group, kept in zip(self.param_groups, self._kept, strict=True):
            local_weights, local_ids, _ = self._split_group(group)
            if local_weights.grad is None:
                continue
            # The ids buffer is refilled in place by the next forward; the gradient tensor is
            # handed over (the next backward allocates a new one once .grad is None).
            kept.append((local_ids.clone(), local_weights.grad))
            local_weights.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradient and the kept micro-batches."""
        super().zero_grad(set_to_none=set_to_none)
        for kept in self._kept:
            kept.clear()

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep world_size and
        # the kept micro-batches too (deepcopy and DataLoader workers pickle the optimizer).
        return {**super().__getstate__(), "world_size": self.world_size, "_kept": self._kept}

    @staticmethod
    def _split_group(group: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(local_weights, local_ids, weights)`` of a group, or raise."""
        params = group["params"]
        grad_sources = [p for p in params if p.requires_grad]
        ids = [p for p in params if not p.requires_grad and p.ndim == 1]
        tables = [p for p in params if not p.requires_grad and p.ndim == 2]
        if len(params) != 3 or len(grad_sources) != 1 or len(ids) != 1 or len(tables) != 1:
            shapes = [(tuple(p.shape), p.requires_grad) for p in params]
            raise ValueError(
                "CastedSparseEmbeddingSignSGD_Distributed expects the 3 buffers of one "
                "CastedSparseEmbedding (pass params=puzzle_emb.buffers()): local_weights "
                "(requires grad), local_ids (1-D) and weights (2-D); got (shape, requires_grad) "
                f"{shapes}"
            )
        return grad_sources[0], ids[0], tables[0]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one sign-SGD step to the rows seen in the (global) batch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, kept in zip(self.param_groups, self._kept, strict=True):
            local_weights, local_ids, weights = self._split_group(group)
            pairs = list(kept)
            if local_weights.grad is not None:
                pairs.append((local_ids, local_weights.grad))
            kept.clear()
            if not pairs:
                continue
            local_grads = torch.cat([g for _, g in pairs]) if len(pairs) > 1 else pairs[0][1]
            every_id = torch.cat([i for i, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
            grads, ids = gather_ids_and_grads(local_grads, every_id, self.world_size)
            _sparse_emb_sign_sgd(
                grads, ids, weights, lr=float(group["lr"]), weight_decay=group["weight_decay"]
            )
        return loss
