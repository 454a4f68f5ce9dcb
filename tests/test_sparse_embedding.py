"""The puzzle-embedding table and its sign-SGD optimizer, single-process and over 2 gloo ranks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.sparse_embedding import (
    CastedSparseEmbedding,
    CastedSparseEmbeddingSignSGD_Distributed,
    _sparse_emb_sign_sgd,
)

# 4 rows × 2 dims. Id 2 appears twice with gradients of opposite signs that sum to
# [0.2, -0.3]; id 3 twice with gradients that cancel exactly; row 1 is never touched.
TABLE = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
IDS = [2, 0, 2, 3, 3]
GRADS = [[0.3, -0.5], [-1.0, 0.0], [-0.1, 0.2], [0.25, -2.0], [-0.25, 2.0]]
LR, WD = 0.1, 0.5  # decay factor 1 − 0.1·0.5 = 0.95
EXPECTED = [
    [0.95 + 0.1, 1.9],  # row 0: sign(g) = [-1, 0]
    [3.0, 4.0],  # untouched: no decay either
    [4.75 - 0.1, 5.7 + 0.1],  # row 2: sign([0.2, -0.3]) = [1, -1]
    [6.65, 7.6],  # row 3: gradients cancel, decay only
]


def _embedding(table: list[list[float]], batch_size: int) -> CastedSparseEmbedding:
    emb = CastedSparseEmbedding(len(table), len(table[0]), batch_size, 0.0, torch.float32)
    emb.weights.copy_(torch.tensor(table))
    return emb


def _train_step(
    emb: CastedSparseEmbedding,
    opt: CastedSparseEmbeddingSignSGD_Distributed,
    ids: torch.Tensor,
    grads: torch.Tensor,
) -> None:
    emb.train()
    (emb(ids) * grads).sum().backward()  # d/d(local_weights) = grads
    opt.step()
    opt.zero_grad()


def test_buffers_keep_upstream_names_and_kinds() -> None:
    emb = CastedSparseEmbedding(10, 4, batch_size=3, init_std=0.0, cast_to=torch.bfloat16)
    assert list(emb.state_dict()) == ["weights"]
    assert [name for name, _ in emb.named_buffers()] == ["weights", "local_weights", "local_ids"]
    assert list(emb.parameters()) == []
    assert emb.weights.shape == (10, 4) and emb.weights.dtype == torch.float32
    assert torch.count_nonzero(emb.weights) == 0  # init_std 0: zeros
    assert emb.local_weights.shape == (3, 4) and emb.local_weights.dtype == torch.float32
    assert emb.local_weights.requires_grad and emb.local_weights.is_leaf
    assert emb.local_ids.shape == (3,) and emb.local_ids.dtype == torch.int32


def test_truncated_normal_init() -> None:
    torch.manual_seed(0)
    emb = CastedSparseEmbedding(2000, 8, batch_size=1, init_std=0.02, cast_to=torch.float32)
    assert emb.weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert emb.weights.abs().max().item() < 0.02 * 2.5


def test_eval_forward_reads_the_table_at_any_batch_size() -> None:
    torch.manual_seed(0)
    emb = CastedSparseEmbedding(6, 3, batch_size=2, init_std=1.0, cast_to=torch.bfloat16)
    emb.eval()
    ids = torch.tensor([5, 0, 5, 2, 1])
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 3)
    assert torch.equal(out, emb.weights[ids].to(torch.bfloat16))
    assert not out.requires_grad


def test_train_forward_routes_the_gradient_to_local_weights() -> None:
    torch.manual_seed(0)
    emb = CastedSparseEmbedding(6, 3, batch_size=2, init_std=1.0, cast_to=torch.bfloat16)
    emb.train()
    ids = torch.tensor([4, 1], dtype=torch.int32)
    out = emb(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, emb.weights[ids.long()].to(torch.bfloat16))
    assert torch.equal(emb.local_ids, ids)
    out.float().sum().backward()
    assert torch.equal(emb.local_weights.grad, torch.ones(2, 3))
    assert emb.weights.grad is None


def test_train_forward_rejects_another_batch_size() -> None:
    emb = CastedSparseEmbedding(6, 3, batch_size=4, init_std=0.0, cast_to=torch.float32)
    emb.train()
    with pytest.raises(ValueError, match="local batch of 4"):
        emb(torch.tensor([0, 1, 2]))


def test_to_keeps_local_weights_a_leaf() -> None:
    emb = CastedSparseEmbedding(6, 3, batch_size=2, init_std=0.0, cast_to=torch.float64).double()
    assert emb.local_weights.dtype == torch.float64
    assert emb.local_weights.is_leaf and emb.local_weights.requires_grad
    emb.train()
    emb(torch.tensor([0, 1])).sum().backward()
    assert emb.local_weights.grad is not None


def test_sign_sgd_by_hand() -> None:
    weights = torch.tensor(TABLE)
    _sparse_emb_sign_sgd(torch.tensor(GRADS), torch.tensor(IDS), weights, lr=LR, weight_decay=WD)
    torch.testing.assert_close(weights, torch.tensor(EXPECTED))


def test_optimizer_step_through_the_module() -> None:
    emb = _embedding(TABLE, batch_size=len(IDS))
    opt = CastedSparseEmbeddingSignSGD_Distributed(
        emb.buffers(), world_size=1, lr=LR, weight_decay=WD
    )
    _train_step(emb, opt, torch.tensor(IDS), torch.tensor(GRADS))
    torch.testing.assert_close(emb.weights, torch.tensor(EXPECTED))
    assert emb.local_weights.grad is None  # zero_grad sets it to None


def test_step_without_grad_does_nothing_and_lr_is_read_each_step() -> None:
    emb = _embedding([[1.0], [1.0]], batch_size=1)
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=0.0)
    opt.step()
    assert torch.equal(emb.weights, torch.tensor([[1.0], [1.0]]))
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = 0.5, 0.0
    _train_step(emb, opt, torch.tensor([1]), torch.tensor([[2.0]]))
    assert torch.equal(emb.weights, torch.tensor([[1.0], [0.5]]))


def test_optimizer_rejects_other_tensors() -> None:
    with pytest.raises(ValueError, match=r"puzzle_emb\.buffers"):
        CastedSparseEmbeddingSignSGD_Distributed([torch.zeros(3, 2)], world_size=1)
    emb = CastedSparseEmbedding(4, 2, batch_size=2, init_std=0.0, cast_to=torch.float32)
    with pytest.raises(ValueError, match="world_size"):
        CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=0)
    with pytest.raises(ValueError, match="learning rate"):
        CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1, lr=-1.0)


def test_world_size_above_one_needs_a_process_group() -> None:
    emb = _embedding(TABLE, batch_size=2)
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=2)
    emb.train()
    emb(torch.tensor([0, 1])).sum().backward()
    with pytest.raises(RuntimeError, match="not initialised"):
        opt.step()


def test_world_size_is_not_restored_from_a_checkpoint() -> None:
    emb = _embedding(TABLE, batch_size=2)
    saved = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=4).state_dict()
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=1)
    opt.load_state_dict(saved)
    assert opt.world_size == 1


# ----------------------------------------------------------------------------------------------
# Two gloo ranks equal one process on the concatenated batch
# ----------------------------------------------------------------------------------------------
DIST_TABLE = [[0.5, -1.0, 2.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 3.0], [4.0, 4.0, -4.0]]
# Id 1 gets +0.2 on rank 0 and -0.3, -0.1 on rank 1: the global sum is negative, rank 0's own
# gradient is positive, so a missing all-gather changes the result.
RANK_IDS = [[1, 0, 2], [1, 1, 3]]
RANK_GRADS = [
    [[0.2, 0.5, -0.1], [1.0, -1.0, 0.0], [0.3, 0.3, 0.3]],
    [[-0.3, 0.1, 0.2], [-0.1, -0.7, -0.4], [0.0, 2.0, -2.0]],
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        emb = _embedding(DIST_TABLE, batch_size=3)
        opt = CastedSparseEmbeddingSignSGD_Distributed(
            emb.buffers(), world_size=world_size, lr=0.1, weight_decay=0.2
        )
        _train_step(emb, opt, torch.tensor(RANK_IDS[rank]), torch.tensor(RANK_GRADS[rank]))
        torch.save(emb.weights, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    single = _embedding(DIST_TABLE, batch_size=6)
    opt = CastedSparseEmbeddingSignSGD_Distributed(
        single.buffers(), world_size=1, lr=0.1, weight_decay=0.2
    )
    ids = torch.tensor(RANK_IDS[0] + RANK_IDS[1])
    _train_step(single, opt, ids, torch.tensor(RANK_GRADS[0] + RANK_GRADS[1]))

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(rank0, rank1)
    assert torch.equal(rank0, single.weights)
    # Row 1 moved against the global gradient sum (negative in dim 0), not rank 0's (positive).
    assert rank0[1, 0].item() == pytest.approx(1.0 * 0.98 + 0.1)


def test_optimizer_survives_deepcopy_and_pickle() -> None:
    import copy
    import pickle

    emb = CastedSparseEmbedding(4, 3, batch_size=2, init_std=0, cast_to=torch.float32)
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=3)
    assert copy.deepcopy(opt).world_size == 3
    assert pickle.loads(pickle.dumps(opt)).world_size == 3
