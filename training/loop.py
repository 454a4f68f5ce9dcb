"""The training loop of ``pretrain.py``: plain functions over a ``TrainState``.

Semantics are upstream's (spec §4): the ACT carry persists across batches (slots refill only
when they halt), each train iteration is ``eval_interval`` epochs of the loader followed by an
evaluation, the loss is summed over the local batch and divided by the global batch size, the
gradients are summed over ranks, both optimizers follow warm-up + cosine, and the EMA shadow is
updated after every step. On top: complete resumable checkpoints, a data position that survives
restarts, gradient-norm logging and a loud stop on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dataset.common import PuzzleDatasetMetadata
from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from models.ema import EMAHelper, unwrap_module
from models.losses import REDUCTIONS, LossOutput, sum_row_metrics
from models.recursive_reasoning.common import ACTCarry, ModelDims, perturb_carry
from models.registry import build_loss_head, describe_model
from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
from training import jd
from training.config import PretrainConfig, check_world_size
from utils import checkpoint as ckpt
from utils.distributed import (
    DistInfo,
    all_reduce_sum_,
    barrier,
    broadcast_object,
    broadcast_tensors_,
    gather_objects,
)
from utils.optim import AdamATan2, cosine_schedule_with_warmup_lr_lambda, set_lr


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def create_dataloader(
    config: PretrainConfig, split: str, dist_info: DistInfo, *, test_set_mode: bool
) -> tuple[DataLoader, PuzzleDataset]:
    """Upstream's loader: ``PuzzleDataset`` yields whole batches (``batch_size=None``)."""
    use_test_paths = split == "test" and config.data_paths_test
    paths = config.data_paths_test if use_test_paths else config.data_paths
    dataset = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=config.seed,
            dataset_paths=paths,
            global_batch_size=config.global_batch_size,
            test_set_mode=test_set_mode,
            epochs_per_iter=1 if test_set_mode else config.epochs_per_iteration,
            rank=dist_info.rank,
            num_replicas=dist_info.world_size,
        ),
        split=split,
    )
    workers = config.data_workers
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=8 if workers else None,
        pin_memory=dist_info.device.type == "cuda",
        persistent_workers=workers > 0,
    )
    return loader, dataset


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a run needs to continue: weights, optimizers, position, carry, EMA."""

    model: nn.Module  # the loss head, possibly wrapped by torch.compile
    optimizers: list[torch.optim.Optimizer]
    base_lrs: list[float]
    total_steps: int
    step: int = 0
    iteration: int = 0  # completed train/eval cycles
    batches_in_iteration: int = 0  # batches consumed in the current cycle
    carry: ACTCarry | None = None
    ema: EMAHelper | None = None
    jd: jd.JacobianDescent | None = None  # set when the objective is not plain gradient descent

    @property
    def raw_model(self) -> nn.Module:
        """The loss head without compile/DDP wrappers (state dicts, EMA)."""
        return unwrap_module(self.model)


def _seed_everything(config: PretrainConfig, rank: int) -> None:
    torch.manual_seed(config.seed + rank)  # upstream: seed + RANK
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _want_compile(config: PretrainConfig, device: torch.device) -> bool:
    if os.environ.get("DISABLE_COMPILE"):
        return False
    if config.compile == "auto":
        return device.type == "cuda"
    return bool(config.compile)


def create_train_state(
    config: PretrainConfig, metadata: PuzzleDatasetMetadata, dist_info: DistInfo
) -> TrainState:
    """Model (+ upstream weights if ``load_checkpoint``), optimizers, EMA; broadcast from rank 0."""
    local_bs = check_world_size(config, dist_info.world_size)
    dims = ModelDims(
        batch_size=local_bs,
        seq_len=metadata.seq_len,
        vocab_size=metadata.vocab_size,
        num_puzzle_identifiers=metadata.num_puzzle_identifiers,
    )
    with torch.device(dist_info.device):
        head = build_loss_head(config.arch, dims)
    if config.load_checkpoint and dist_info.is_main:
        ckpt.load_model_weights(
            head,
            _weights_for_loading(Path(config.load_checkpoint)),
            source=config.load_checkpoint,
        )
    # Every rank starts from rank 0's parameters and buffers (puzzle table, init states).
    broadcast_tensors_([*head.parameters(), *head.buffers()])

    puzzle_emb = getattr(head.model.inner, "puzzle_emb", None)
    optimizers: list[torch.optim.Optimizer] = []
    base_lrs: list[float] = []
    if puzzle_emb is not None:
        optimizers.append(
            CastedSparseEmbeddingSignSGD_Distributed(
                puzzle_emb.buffers(),
                world_size=dist_info.world_size,
                lr=0,  # set every step by the schedule
                weight_decay=config.puzzle_emb_weight_decay,
            )
        )
        base_lrs.append(config.puzzle_emb_lr)
    if config.freeze_weights:
        if puzzle_emb is None:
            raise ValueError("freeze_weights trains only the puzzle embedding, but it is disabled")
        # Only the embedding trains: no gradient is computed for the other weights at all.
        for p in head.parameters():
            p.requires_grad_(False)
    else:
        optimizers.append(
            AdamATan2(
                head.parameters(),
                lr=0,
                weight_decay=config.weight_decay,
                betas=(config.beta1, config.beta2),
            )
        )
        base_lrs.append(config.lr)

    ema = None
    if config.ema:
        ema = EMAHelper(mu=config.ema_rate)
        ema.register(head)
    descent = None
    if not config.objective.is_gradient_descent:
        descent = jd.JacobianDescent(
            config.objective,
            config.aggregator,
            model=head,
            seed=config.seed,
        )
    # Per-sample layers and TorchJD's autogram hooks work on eager modules: Jacobian descent
    # runs uncompiled.
    compile_model = _want_compile(config, dist_info.device) and descent is None
    model: nn.Module = torch.compile(head) if compile_model else head
    return TrainState(
        model=model,
        optimizers=optimizers,
        base_lrs=base_lrs,
        total_steps=total_train_steps(config, metadata),
        ema=ema,
        jd=descent,
    )


def _check_eval_data(
    config: PretrainConfig, train: PuzzleDatasetMetadata, test: PuzzleDatasetMetadata
) -> None:
    """Evaluation data the model cannot read fails at start-up, not hours later."""
    paths = config.data_paths_test or config.data_paths
    for field in ("seq_len", "vocab_size"):
        if getattr(test, field) != getattr(train, field):
            raise ValueError(
                f"data_paths_test {paths}: {field} {getattr(test, field)} differs from the "
                f"training data's {getattr(train, field)}; build both with the same builder"
            )
    if test.num_puzzle_identifiers > train.num_puzzle_identifiers:
        raise ValueError(
            f"data_paths_test {paths}: {test.num_puzzle_identifiers} puzzle identifiers, more "
            f"than the training data's {train.num_puzzle_identifiers} embedding rows"
        )


def total_train_steps(config: PretrainConfig, metadata: PuzzleDatasetMetadata) -> int:
    """Upstream: epochs × groups × mean examples per puzzle / global batch."""
    steps = config.epochs * metadata.total_groups * metadata.mean_puzzle_examples
    return int(steps / config.global_batch_size)


def _weights_for_loading(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from our checkpoint folder (EMA weights if it has them) or an upstream file."""
    if path.is_dir():
        shared, _ = ckpt.load_checkpoint_files(path, rank=0)
        return evaluation_weights(shared, use_ema=True)
    return ckpt.read_state_dict(path)


def evaluation_weights(shared: dict[str, Any], use_ema: bool) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint, with the EMA shadow substituted when asked and present."""
    state = dict(shared[ckpt.MODEL_FILE])
    if use_ema and ckpt.EMA_FILE in shared:
        for name, value in shared[ckpt.EMA_FILE]["shadow"].items():
            state[name] = value
    return state


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def save_train_state(
    config: PretrainConfig, state: TrainState, dist_info: DistInfo, data: PuzzleDataset
) -> Path:
    """Write ``checkpoint_path/step_N`` with everything needed to resume bit-exactly."""
    assert config.checkpoint_path is not None
    folder = ckpt.step_dir(config.checkpoint_path, state.step)
    shared = None
    if dist_info.is_main:
        shared = {
            ckpt.MODEL_FILE: state.raw_model.state_dict(),
            ckpt.TRAIN_FILE: {
                "optimizers": [opt.state_dict() for opt in state.optimizers],
                "step": state.step,
                "iteration": state.iteration,
                "batches_in_iteration": state.batches_in_iteration,
                "data": data.state_at(state.iteration, state.batches_in_iteration),
            },
        }
        if state.ema is not None:
            shared[ckpt.EMA_FILE] = state.ema.state_dict()
    per_rank = {
        "carry": state.carry.state_dict() if state.carry is not None else None,
        "rng": _rng_state(dist_info.device),
    }
    ckpt.save_checkpoint(
        folder,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        shared=shared,
        per_rank=per_rank,
        meta={"step": state.step, "config": config.model_dump(mode="json")},
        barrier=lambda: barrier(dist_info.cpu_group),
        keep_last=config.keep_last,
    )
    return folder


def resolve_resume(config: PretrainConfig) -> Path | None:
    """The checkpoint ``resume`` points at; refuses to branch off an older one in place."""
    if config.resume == "auto":
        return ckpt.latest_checkpoint(config.checkpoint_path or "")
    folder = Path(str(config.resume))
    if not ckpt.is_complete(folder):
        raise FileNotFoundError(f"resume={folder}: not a complete checkpoint (no meta.json)")
    if config.checkpoint_path and folder.parent.resolve() == Path(config.checkpoint_path).resolve():
        newer = [
            p.name for p in ckpt.list_checkpoints(folder.parent) if _step_of(p) > _step_of(folder)
        ]
        if newer:
            raise ValueError(
                f"resume={folder}: {folder.parent} also holds newer checkpoints {newer}, which "
                "keep_last and resume=auto would mix with this branch; move them away or give "
                "a new +checkpoint_path"
            )
    return folder


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def resume_train_state(
    folder: Path,
    state: TrainState,
    dist_info: DistInfo,
    data: PuzzleDataset,
    config: PretrainConfig | None = None,
) -> None:
    """Load a checkpoint written by ``save_train_state`` into ``state`` and the dataset."""
    shared, per_rank = ckpt.load_checkpoint_files(folder, dist_info.rank)
    ckpt.load_model_weights(
        state.raw_model, shared[ckpt.MODEL_FILE], resize_puzzle_emb=False, source=str(folder)
    )
    train = shared[ckpt.TRAIN_FILE]
    if len(train["optimizers"]) != len(state.optimizers):
        raise ckpt.CheckpointMismatchError(
            f"{folder}: {len(train['optimizers'])} optimizers saved, the run has "
            f"{len(state.optimizers)}; freeze_weights or puzzle_emb_ndim differ"
        )
    for opt, opt_state in zip(state.optimizers, train["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
        if config is not None:
            # The run's configuration wins over the hyper-parameters stored in the checkpoint.
            for group in opt.param_groups:
                if "betas" in group:
                    group["betas"] = (config.beta1, config.beta2)
                    group["weight_decay"] = config.weight_decay
                else:
                    group["weight_decay"] = config.puzzle_emb_weight_decay
    if state.ema is not None:
        if ckpt.EMA_FILE not in shared:
            raise ckpt.CheckpointMismatchError(f"{folder}: has no EMA state but ema=True")
        state.ema.load_state_dict(shared[ckpt.EMA_FILE])
    state.step = train["step"]
    state.iteration = train["iteration"]
    state.batches_in_iteration = train["batches_in_iteration"]
    data.load_state_dict(train["data"])
    same_world = shared["meta"].get("world_size") == dist_info.world_size
    if per_rank is not None and same_world:
        if per_rank["carry"] is not None:
            carry = ACTCarry.from_state_dict(per_rank["carry"])
            state.carry = _carry_to(carry, dist_info.device)
        _set_rng_state(per_rank["rng"], dist_info.device)
    elif dist_info.is_main:
        print(
            f"note: {folder} was written by {shared['meta'].get('world_size')} processes; "
            "the ACT carry and RNG states restart"
        )


def _carry_to(carry: ACTCarry, device: torch.device) -> ACTCarry:
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return ACTCarry(
        move(carry.inner_carry),
        carry.steps.to(device),
        carry.halted.to(device),
        move(carry.current_data),
    )


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------
def _reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum gradients over ranks with one flat all-reduce (upstream: one call per parameter)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not torch.distributed.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(metrics: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Scalar metrics summed over ranks, in sorted key order (the same on every rank)."""
    keys = sorted(metrics)
    values = torch.stack([metrics[k].to(dtype) for k in keys])
    all_reduce_sum_(values)
    return dict(zip(keys, values.cpu().tolist(), strict=True))


def reduce_metrics(
    metrics: dict[str, torch.Tensor], global_batch_size: int, prefix: str
) -> dict[str, float]:
    """Sum over ranks; losses / global batch, the rest / count (upstream)."""
    reduced = sum_over_ranks(metrics, torch.float32)
    count = max(reduced["count"], 1.0)
    return {
        f"{prefix}/{k}": v / (global_batch_size if k.endswith("loss") else count)
        for k, v in reduced.items()
    }


def _check_finite(loss: torch.Tensor, state: TrainState, last_checkpoint: Path | None) -> None:
    """Stop every rank together when any rank's loss is NaN or infinite (a rank that raised
    alone would leave the others waiting in the gradient all-reduce)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    all_reduce_sum_(bad)
    if bad.item() > 0:
        where = last_checkpoint or "none written yet"
        raise NonFiniteLossError(
            f"non-finite loss at step {state.step}; last good checkpoint: {where}"
        )


def _objective_backward(
    config: PretrainConfig,
    state: TrainState,
    batch: dict[str, torch.Tensor],
    last_checkpoint: Path | None,
) -> tuple[LossOutput, dict[str, float], bool]:
    """Split the losses into objectives and write the aggregated gradient (``training.jd``).

    Returns the last supervision step's output, the ``jd/`` metrics and whether ``.grad`` is
    already reduced across ranks. Stacked supervision steps run on the same batch, each
    differentiated (or folded into the Jacobian) before the next, so memory stays that of one.
    All ``halt_max_steps`` steps always run (the fork stopped once every slot had halted, which
    for its no-ACT ``trmjd`` is the same), so the objectives do not depend on the world size.
    """
    spec, arch = config.objective, config.arch
    S = arch.halt_max_steps if spec.supervisions == "stacked" else 1
    families = (0 if spec.internal == "only" else 1) + (
        arch.H_cycles if spec.internal != "none" else 0
    )
    layout = jd.Layout(
        spec=spec,
        S=S,
        C=families,
        B=batch["inputs"].shape[0],
        P=batch["inputs"].shape[1],
        has_halt=not getattr(arch, "no_act", False),
    )
    last: dict[str, LossOutput] = {}

    def contributions() -> Iterator[torch.Tensor]:
        for s in range(S):
            out: LossOutput = state.model(carry=state.carry, batch=batch, return_keys=())
            state.carry = out.new_carry
            last["out"] = out
            halt = out.halt_loss_per_sample if getattr(out, "has_halting", True) else None
            c = jd.step_contributions(
                layout,
                s,
                out.normalized_token_loss,
                halt,
                getattr(out, "internal_token_loss", None),
            )
            _check_finite(c.detach().sum(), state, last_checkpoint)
            if spec.carry_perturbation_rate > 0 and s < S - 1:
                state.carry = perturb_carry(state.carry, spec.carry_perturbation_rate)
            yield c

    if layout.m == 1:
        for c in contributions():  # gradient descent over stacked steps: one backward each
            (c.sum() / config.global_batch_size).backward()
        return last["out"], {"jd/num_objectives": 1.0}, False
    assert state.jd is not None
    extra = []
    puzzle_emb = getattr(state.raw_model.model.inner, "puzzle_emb", None)
    if puzzle_emb is not None and puzzle_emb.local_weights.requires_grad:
        extra.append(puzzle_emb.local_weights)
    result = state.jd.step(
        steps=contributions(),
        layout=layout,
        params=[p for p in state.raw_model.parameters() if p.requires_grad],
        extra_params=extra,
        global_batch_size=config.global_batch_size,
        step_index=state.step,
        all_reduce=all_reduce_sum_,
    )
    return last["out"], result.metrics, result.reduced_across_ranks


def train_batch(
    config: PretrainConfig,
    state: TrainState,
    batch: dict[str, torch.Tensor],
    dist_info: DistInfo,
    last_checkpoint: Path | None = None,
) -> dict[str, float] | None:
    """One optimizer step on one global batch; metrics (rank 0's view) or None if skipped."""
    state.step += 1
    if state.step > state.total_steps:
        return None  # upstream skips batches beyond the schedule
    batch = {k: v.to(dist_info.device, non_blocking=True) for k, v in batch.items()}
    if state.carry is None:
        state.carry = state.model.initial_carry(batch)

    if config.objective.is_gradient_descent:
        out: LossOutput = state.model(carry=state.carry, batch=batch, return_keys=())
        state.carry = out.new_carry
        loss = REDUCTIONS.get("sum")(out)
        _check_finite(loss, state, last_checkpoint)
        # The one place the loss is normalised: every rank divides its local sum by the global
        # batch size, and the SUM all-reduce of the gradients then gives the global mean.
        (loss / config.global_batch_size).backward()
        jd_metrics: dict[str, float] = {}
        reduced = False
    else:
        out, jd_metrics, reduced = _objective_backward(config, state, batch, last_checkpoint)

    params = [p for p in state.raw_model.parameters() if p.requires_grad]
    if not reduced:
        _reduce_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    # The global norm after the reduction, logged before any clipping.
    grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else None
    if config.grad_clip_norm is not None and grads:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)

    lr_this_step = 0.0
    for opt, base_lr in zip(state.optimizers, state.base_lrs, strict=True):
        lr_this_step = cosine_schedule_with_warmup_lr_lambda(
            state.step,
            base_lr=base_lr,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=state.total_steps,
            min_ratio=config.lr_min_ratio,
        )
        set_lr(opt, lr_this_step)
        opt.step()
        opt.zero_grad()
    if state.ema is not None:
        state.ema.update(state.raw_model)

    metrics = reduce_metrics(out.metrics, config.global_batch_size, "train")
    metrics.update(jd_metrics)
    metrics["train/lr"] = lr_this_step
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: dict[str, float]
    outputs: dict[str, torch.Tensor] | None  # saved per-example outputs (rank 0), test order


def _real_rows(global_effective: int, local_bs: int, rank: int) -> int:
    """Rows of this rank's slice that hold examples (the rest is padding)."""
    return max(0, min(local_bs, global_effective - rank * local_bs))


def evaluate(
    config: PretrainConfig,
    state: TrainState,
    loader: DataLoader,
    evaluators: list[Any],
    dist_info: DistInfo,
    save_path: Path | None,
) -> EvalResult:
    """Run every test batch to the end of ACT and score it (spec §4 ``evaluate``).

    Each slot is scored at the step where it first halts: with the default (no halting at
    evaluation) that is ``halt_max_steps`` for every slot, exactly upstream's final-step
    metrics; with ``halt_at_eval`` it is the slot's own halting step.
    """
    model = state.model
    model.eval()
    save_keys = list(config.eval_save_outputs)
    return_keys = set(save_keys)
    for ev in evaluators:
        return_keys |= set(ev.required_outputs)
        ev.begin_eval()
    sums: dict[str, dict[str, torch.Tensor]] = {}
    saved: list[dict[str, torch.Tensor]] = []
    local_bs = config.global_batch_size // dist_info.world_size
    with torch.inference_mode():
        for set_name, batch, global_effective in loader:
            batch = {k: v.to(dist_info.device) for k, v in batch.items()}
            carry = model.initial_carry(batch)
            done = torch.zeros(batch["inputs"].shape[0], dtype=torch.bool, device=dist_info.device)
            rows: dict[str, torch.Tensor] = {}
            outputs: dict[str, torch.Tensor] = {}
            while True:
                out: LossOutput = model(carry=carry, batch=batch, return_keys=sorted(return_keys))
                carry = out.new_carry
                newly = carry.halted & ~done
                per_row = {
                    **out.row_metrics,
                    "lm_loss": out.lm_loss_per_sample,
                    "q_halt_loss": out.q_halt_loss,
                }
                for k, v in per_row.items():
                    rows[k] = torch.where(newly, v, rows[k]) if k in rows else v.clone()
                for k, v in out.outputs.items():
                    mask = newly.view(-1, *([1] * (v.ndim - 1)))
                    outputs[k] = torch.where(mask, v, outputs[k]) if k in outputs else v.clone()
                done |= newly
                if bool(done.all()):
                    break
            metrics = sum_row_metrics(rows, done)
            metrics["lm_loss"] = rows["lm_loss"].sum()
            metrics["q_halt_loss"] = rows["q_halt_loss"].sum()
            acc = sums.setdefault(
                set_name,
                {k: torch.zeros((), dtype=torch.float64, device=dist_info.device) for k in metrics},
            )
            for k, v in metrics.items():
                acc[k] += v.to(torch.float64)
            for ev in evaluators:
                ev.update_batch(batch, outputs)
            if save_keys:
                n = _real_rows(int(global_effective), local_bs, dist_info.rank)
                source = {**batch, **outputs}
                saved.append({k: source[k][:n].cpu() for k in save_keys if k in source})

    result: dict[str, float] = {}
    for set_name in sorted(sums):
        reduced = sum_over_ranks(sums[set_name], torch.float64)
        count = max(reduced.pop("count"), 1.0)
        result.update({f"{set_name}/{k}": v / count for k, v in reduced.items()})
    for ev in evaluators:
        ev_metrics = ev.result(
            str(save_path) if save_path is not None else None, group=dist_info.cpu_group
        )
        if ev_metrics:
            result.update(ev_metrics)
    return EvalResult(result, _collect_outputs(saved, dist_info) if save_keys else None)


def _collect_outputs(
    saved: list[dict[str, torch.Tensor]], dist_info: DistInfo
) -> dict[str, torch.Tensor] | None:
    """Rank 0: every rank's outputs interleaved back into test-split order."""
    gathered = gather_objects(saved, group=dist_info.cpu_group)
    if gathered is None:
        return None
    ordered: list[dict[str, torch.Tensor]] = []
    for batch_index in range(len(gathered[0])):
        ordered.extend(per_rank[batch_index] for per_rank in gathered)
    if not ordered:
        return {}
    return {k: torch.cat([part[k] for part in ordered]) for k in ordered[0]}


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    steps: int
    last_checkpoint: Path | None
    eval_metrics: dict[str, float]


def run_training(
    config: PretrainConfig,
    dist_info: DistInfo,
    *,
    logger: Any,
    progress: Any = None,
    evaluators_factory: Any = None,
) -> RunOutcome:
    """Train (resuming if asked), evaluating every ``eval_interval`` epochs."""
    _seed_everything(config, dist_info.rank)
    train_loader, train_data = create_dataloader(config, "train", dist_info, test_set_mode=False)
    try:
        eval_loader, eval_data = create_dataloader(config, "test", dist_info, test_set_mode=True)
    except FileNotFoundError as e:
        eval_loader, eval_data = None, None
        if dist_info.is_main:
            print(f"no evaluation data ({e}); evaluation is skipped")
    if eval_data is not None:
        _check_eval_data(config, train_data.metadata, eval_data.metadata)
    evaluators = []
    if eval_loader is not None and evaluators_factory is not None:
        evaluators = evaluators_factory(eval_data)

    state = create_train_state(config, train_data.metadata, dist_info)
    if dist_info.is_main:
        info = describe_model(state.raw_model)
        logger.log({f"model/{k}": float(v) for k, v in info.items()}, step=0)
        print(
            f"model: {info['num_params']:,} trainable parameters; puzzle-embedding table "
            f"{info['puzzle_emb_rows']:,} rows, {info['puzzle_emb_bytes'] / 2**20:.1f} MiB"
        )

    last_checkpoint: Path | None = None
    if config.resume is not None:
        # Rank 0 decides (one view of the shared checkpoint folder) and tells the others.
        folder = broadcast_object(resolve_resume(config) if dist_info.is_main else None)
        if folder is not None:
            resume_train_state(folder, state, dist_info, train_data, config)
            last_checkpoint = folder
            if dist_info.is_main:
                print(f"resumed from {folder} at step {state.step}")
        elif dist_info.is_main:
            print(f"resume=auto: no checkpoint in {config.checkpoint_path}; starting fresh")
    if config.max_steps is not None and state.step >= config.max_steps:
        if dist_info.is_main:
            print(f"max_steps={config.max_steps} already reached at step {state.step}")
        return RunOutcome(state.step, last_checkpoint, {})

    if progress is not None:
        progress.start(total=state.total_steps, initial=state.step)
    eval_metrics: dict[str, float] = {}
    stop = False
    for iteration in range(state.iteration, config.iterations):
        state.model.train()
        started, examples = time.perf_counter(), 0
        # A checkpoint taken after an iteration's last batch (before its evaluation) resumes
        # straight into that evaluation; the data position already points at the next one.
        finished = 0 < train_data.num_batches(iteration) <= state.batches_in_iteration
        for _set_name, batch, _gbs in [] if finished else train_loader:
            metrics = train_batch(config, state, batch, dist_info, last_checkpoint)
            state.batches_in_iteration += 1
            if metrics is not None and dist_info.is_main:
                logger.log(metrics, step=state.step)
                examples += config.global_batch_size
                if progress is not None:
                    rate = examples / max(time.perf_counter() - started, 1e-9)
                    progress.update(loss=metrics["train/lm_loss"], examples_per_s=rate)
            if config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0:
                last_checkpoint = save_train_state(config, state, dist_info, train_data)
            if config.max_steps is not None and state.step >= config.max_steps:
                stop = True
                break
        if not stop:
            state.iteration = iteration + 1
            state.batches_in_iteration = 0
        is_last = stop or iteration == config.iterations - 1
        if eval_loader is not None and (iteration >= (config.min_eval_interval or 0) or is_last):
            save_path = None
            if config.checkpoint_path:
                save_path = Path(config.checkpoint_path) / f"eval_step_{state.step}"
            with ema_weights(state):
                result = evaluate(config, state, eval_loader, evaluators, dist_info, save_path)
            eval_metrics = result.metrics
            if dist_info.is_main:
                logger.log(eval_metrics, step=state.step)
                if result.outputs is not None and save_path is not None:
                    save_path.mkdir(parents=True, exist_ok=True)
                    torch.save(result.outputs, save_path / "eval_outputs.pt")
        if config.checkpoint_path and (config.checkpoint_every_eval or is_last):
            last_checkpoint = save_train_state(config, state, dist_info, train_data)
        if stop:
            break
    if progress is not None:
        progress.close()
    return RunOutcome(state.step, last_checkpoint, eval_metrics)


@contextlib.contextmanager
def ema_weights(state: TrainState) -> Iterator[None]:
    """Evaluate with the EMA shadow in place of the weights, then put the weights back
    (a parameter copy instead of upstream's deep copy of the whole train state)."""
    if state.ema is None:
        yield
        return
    model = state.raw_model
    backup = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.ema.ema(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in backup:
                    p.copy_(backup[name])
