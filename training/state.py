"""The train state: everything a run needs to continue, saving and loading itself by component.

Components and where they are saved (``utils.checkpoint`` writes the files):

* ``model.pt``: the loss head's state dict (upstream's keys ``model.inner....``);
* ``ema.pt``: the EMA shadow (``ema=True``);
* ``train_state.pt``: the optimizers keyed by group name, the progress counters, the step
  strategy's state, the data position (the loader's, added by ``training.checkpointing``) and,
  with ``loss_scaling`` on, the loss scale (``training.loss_scaling``);
* ``rank_N.pt``: each process's ACT carry (with gradient accumulation, one per micro-batch
  slot) and RNG states;
* with ``sampling=hard_examples`` (``training.hard_examples``), the run's per-puzzle counts and
  the weights in force in ``train_state.pt``, each rank's counts since the last rebuild in its
  ``rank_N.pt``;
* ``meta.json`` (``training.checkpointing``) also records the provenance of the weights
  (``training.pretrained_decoder``): the tasks of the training data, the decoder's and the
  initial weights' own records.

Checkpoints fall only between optimizer steps: a window of accumulated micro-batches
(``AccumulationWindow``) is never saved, and ``state_dict`` refuses an open one.

A new state starts from a pretrained decoder (``load_pretrained_decoder``) and then from
``load_checkpoint`` when the config names them, as ETRM orders them; a run about to resume
skips both, since the checkpoint's weights and record replace them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dataset.hard_examples import HardExampleSampler
from dataset.puzzle_dataset import PuzzleDataset
from models.ema import EMAHelper, unwrap_module
from models.family import Capabilities, ModelFamily, family_of
from models.recursive_reasoning.act import ACTCarry
from models.recursive_reasoning.common import ModelDims
from training.config import PretrainConfig, check_world_size
from training.hard_examples import HardExampleCounts
from training.loss_scaling import DynamicLossScaler, build_loss_scaler
from training.optimizers import NamedOptimizer, apply_run_hyperparameters, build_optimizers
from training.pretrained_decoder import (
    Contamination,
    check_contamination,
    checkpoint_provenance,
    evaluation_paths,
    load_pretrained_decoder,
    run_provenance,
)
from utils import checkpoint as ckpt
from utils.distributed import DistInfo, broadcast_tensors_, decide_on_main


class StepStrategy(Protocol):
    """What the train state needs of a step strategy (``training.strategies``, which imports
    this module, implements it)."""

    name: str

    def compute_gradients(
        self,
        state: TrainState,
        batch: dict[str, torch.Tensor],
        guard: Callable[[torch.Tensor], None],
    ) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class AccumulationWindow:
    """The micro-batches of the optimizer step in progress (gradient accumulation).

    ``position`` counts the micro-batches already taken (0: between optimizer steps).
    ``metric_sums`` and ``non_finite`` add up the earlier micro-batches' metric sums and
    not-yet-checked non-finite flags (tensors on the device, no host read), ``strategy_metrics``
    keeps each one's own metrics, and ``skip`` names what was not finite once a Jacobian-descent
    guard (``nonfinite=skip``) dropped the window, whose remaining micro-batches then only
    pass. Gradients themselves accumulate in ``.grad`` and in the sparse-embedding optimizer.
    """

    position: int = 0
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    non_finite: torch.Tensor | None = None
    strategy_metrics: list[dict[str, float]] = field(default_factory=list)
    skip: str | None = None

    def reset(self) -> None:
        self.position = 0
        self.metric_sums = {}
        self.non_finite = None
        self.strategy_metrics = []
        self.skip = None


@dataclass
class TrainState:
    """Weights, optimizers by name, progress, carry, EMA and step strategy of one process."""

    model: nn.Module  # the loss head, possibly wrapped by torch.compile
    family: ModelFamily
    capabilities: Capabilities
    optimizers: dict[str, NamedOptimizer] = field(default_factory=dict)
    strategy: StepStrategy | None = None  # a training.strategies entry; None: only evaluating
    total_steps: int = 0
    step: int = 0
    iteration: int = 0  # completed train/eval cycles
    batches_in_iteration: int = 0  # batches consumed in the current cycle
    carry: ACTCarry | None = None  # the ACT carry of the micro-batch being trained
    # Gradient accumulation: micro-batches per optimizer step, and the carry of each slot (slot
    # j of a window continues slot j of the window before; empty without accumulation).
    accumulation_steps: int = 1
    slot_carries: list[ACTCarry | None] = field(default_factory=list)
    window: AccumulationWindow = field(default_factory=AccumulationWindow)
    ema: EMAHelper | None = None
    # sampling=hard_examples: per-puzzle counts (totals shared, each rank's pending its own)
    hard_examples: HardExampleCounts | None = None
    nonfinite_streak: int = 0  # nonfinite=skip: skipped steps in a row (restarts on resume)
    loss_scaler: DynamicLossScaler | None = None  # loss_scaling on (float16): the loss scale
    # Where the weights' tasks came from (saved in meta.json) and, for a strict-split
    # evaluation set, what it shares with them (its metrics join every evaluation result).
    provenance: dict[str, Any] = field(default_factory=dict)
    contamination: Contamination | None = None

    @property
    def raw_model(self) -> nn.Module:
        """The loss head without compile/DDP wrappers (state dicts, EMA)."""
        return unwrap_module(self.model)

    @property
    def loss_scale(self) -> float:
        """The factor the strategies multiply the loss by before its backward (1 unscaled)."""
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    # ------------------------------------------------------------------------------------------
    # Saving and loading, component by component
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The components every rank shares (rank 0 saves them)."""
        if self.window.position != 0:
            raise RuntimeError(
                f"train state saved after {self.window.position} of {self.accumulation_steps} "
                f"micro-batches of step {self.step + 1}: checkpoints fall between optimizer steps"
            )
        state: dict[str, Any] = {
            "model": self.raw_model.state_dict(),
            "optimizers": {n: o.optimizer.state_dict() for n, o in self.optimizers.items()},
            "progress": {
                "step": self.step,
                "iteration": self.iteration,
                "batches_in_iteration": self.batches_in_iteration,
            },
            "strategy": self.strategy.state_dict() if self.strategy is not None else {},
        }
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.hard_examples is not None:
            state["hard_examples"] = self.hard_examples.state_dict()
        return state

    def load_state_dict(
        self, state: Mapping[str, Any], config: PretrainConfig, source: str = "checkpoint"
    ) -> None:
        """Load ``state_dict()`` output; the run's optimizer hyper-parameters win."""
        ckpt.load_model_weights(
            self.raw_model, state["model"], resize_puzzle_emb=False, source=source
        )
        saved = state["optimizers"]
        if list(saved) != list(self.optimizers):
            raise ckpt.CheckpointMismatchError(
                f"{source}: optimizers {list(saved)} saved, the run has {list(self.optimizers)}; "
                "freeze_weights or arch.puzzle_emb_ndim differ from the run that wrote it"
            )
        for name, named in self.optimizers.items():
            named.optimizer.load_state_dict(saved[name])
            apply_run_hyperparameters(named, config)
        if self.ema is not None:
            if "ema" not in state:
                raise ckpt.CheckpointMismatchError(f"{source}: has no EMA state but ema=True")
            self.ema.load_state_dict(state["ema"])
        if self.hard_examples is not None:
            if "hard_examples" not in state:
                raise ckpt.CheckpointMismatchError(
                    f"{source}: has no hard-example counts but sampling=hard_examples"
                )
            self.hard_examples.load_state_dict(state["hard_examples"], source)
        progress = state["progress"]
        self.step = progress["step"]
        self.iteration = progress["iteration"]
        self.batches_in_iteration = progress["batches_in_iteration"]
        if self.strategy is not None:
            self.strategy.load_state_dict(state.get("strategy", {}))
        # A checkpoint written without loss scaling leaves the scale at loss_scale_init.
        if self.loss_scaler is not None and "loss_scaler" in state:
            self.loss_scaler.load_state_dict(state["loss_scaler"])

    def rank_state_dict(self, device: torch.device) -> dict[str, Any]:
        """This process's own components: the ACT carry (per micro-batch slot with gradient
        accumulation) and the RNG states."""
        state: dict[str, Any] = {
            "carry": self.carry.state_dict() if self.carry is not None else None,
            "rng": rng_state(device),
        }
        if self.slot_carries:
            state["slot_carries"] = [c.state_dict() if c is not None else None
                                     for c in self.slot_carries]  # fmt: skip
        if self.hard_examples is not None:
            state["hard_examples"] = self.hard_examples.rank_state_dict()
        return state

    def load_rank_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        if state["carry"] is not None:
            self.carry = carry_to(ACTCarry.from_state_dict(state["carry"]), device)
        slots = state.get("slot_carries")
        if self.slot_carries and slots is not None and len(slots) == len(self.slot_carries):
            self.slot_carries = [
                carry_to(ACTCarry.from_state_dict(c), device) if c is not None else None
                for c in slots
            ]
        if self.hard_examples is not None and "hard_examples" in state:
            self.hard_examples.load_rank_state_dict(state["hard_examples"])
        set_rng_state(state["rng"], device)


def carry_to(carry: ACTCarry, device: torch.device) -> ACTCarry:
    """``carry`` with every tensor on ``device``."""

    def move(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in tensors.items()}

    return ACTCarry(
        move(carry.inner_carry), carry.steps.to(device), carry.halted.to(device),
        move(carry.current_data),
    )  # fmt: skip


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch RNG states this process draws from (CPU, and the accelerator's)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------------------------
# Creation
# ----------------------------------------------------------------------------------------------
def seed_everything(config: PretrainConfig, rank: int) -> None:
    """Seed torch and set the process-wide modes the config asks for, on or off (a run in a
    process that ran another one, such as a test session, gets its own settings)."""
    torch.manual_seed(config.seed + rank)  # upstream: seed + RANK
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(config.deterministic)
    torch.autograd.set_detect_anomaly(config.detect_anomaly)


def want_compile(config: PretrainConfig, device: torch.device) -> bool:
    if os.environ.get("DISABLE_COMPILE"):
        return False
    if config.compile == "auto":
        return device.type == "cuda"
    return bool(config.compile)


def build_model(
    config: PretrainConfig, data: PuzzleDataset, dist_info: DistInfo
) -> tuple[nn.Module, ModelFamily]:
    """The family's loss head on this device, sized by the data and the local batch."""
    meta = data.metadata
    dims = ModelDims(
        batch_size=check_world_size(config, dist_info.world_size),
        seq_len=meta.seq_len,
        vocab_size=meta.vocab_size,
        num_puzzle_identifiers=meta.num_puzzle_identifiers,
    )
    family = family_of(config.arch)
    with torch.device(dist_info.device):
        head = family.build(config.arch, dims)
    return head, family


def will_resume(config: PretrainConfig) -> bool:
    """Whether ``resume`` will find a checkpoint (``resume=auto`` in an empty run folder
    starts afresh); a corrupt one is reported by ``training.checkpointing.resolve_resume``."""
    if config.resume is None:
        return False
    if config.resume != "auto":
        return True
    folder = config.checkpoint_path
    return folder is not None and ckpt.latest_checkpoint(folder) is not None


def initial_weights(
    config: PretrainConfig, head: nn.Module
) -> tuple[dict[str, Any], Contamination | None]:
    """Load the pretrained decoder, then ``load_checkpoint``, into ``head`` unless the run
    resumes; (the run's provenance record, the guard's finding on its evaluation data, None
    when resuming: ``resume_train_state`` checks the checkpoint's record instead)."""
    from training.checkpointing import weights_for_loading

    resuming = will_resume(config)
    decoder = initial = None
    if config.load_pretrained_decoder:
        path = config.load_pretrained_decoder
        if resuming:
            decoder = {"path": path, "provenance": None}
        else:
            decoder = load_pretrained_decoder(head, path, config.arch)
    if config.load_checkpoint:
        source = config.load_checkpoint
        ckpt.load_model_weights(head, weights_for_loading(Path(source), config), source=source)
        initial = {"path": source, "provenance": checkpoint_provenance(source)}
    record = run_provenance(config, decoder, initial)
    if resuming:
        return record, None
    found = check_contamination(
        record,
        evaluation_paths(config),
        allow=config.allow_contaminated_decoder,
        subject="this run",
    )
    return record, found


def schedule_length(config: PretrainConfig, data: PuzzleDataset, updates_per_batch: int) -> int:
    """Optimizer steps of the lr schedule: ``updates_per_batch`` per batch (fixed computation
    time), one per ``accumulation_steps`` batches (gradient accumulation), so warm-up and the
    cosine count optimizer steps either way."""
    return updates_per_batch * data.total_steps(config.epochs) // config.accumulation_steps


def create_train_state(
    config: PretrainConfig, data: PuzzleDataset, dist_info: DistInfo
) -> TrainState:
    """Model (+ initial weights: ``initial_weights``), optimizers, EMA and step strategy;
    every rank starts from rank 0's parameters."""
    from training.strategies import build_strategy

    head, family = build_model(config, data, dist_info)
    # Rank 0 reads the files and checks the evaluation data; a bad file or a refused decoder
    # stops every rank with its line.
    provenance, contamination = decide_on_main(
        lambda: initial_weights(config, head), dist_info.is_main
    )
    # Every rank starts from rank 0's parameters and buffers (puzzle table, init states).
    broadcast_tensors_([*head.parameters(), *head.buffers()])
    # Only a family with a demonstration encoder takes the encoder's learning-rate scale.
    scale = {"encoder_lr_scale": config.encoder_lr_scale} if config.encoder_lr_scale > 0 else {}
    groups = family.optimizer_groups(head, config.freeze_weights, **scale)
    optimizers = build_optimizers(groups, config, dist_info.world_size)
    ema = None
    if config.ema:
        ema = EMAHelper(mu=config.ema_rate)
        ema.register(head)
    capabilities = family.capabilities(config.arch, head)
    strategy = build_strategy(config, head, family, capabilities)
    model: nn.Module = head
    if want_compile(config, dist_info.device) and strategy.compiles:
        model = torch.compile(head)
    k = config.accumulation_steps
    counts = None
    if isinstance(data.sampler, HardExampleSampler):
        counts = HardExampleCounts(data.sampler, dist_info.device)
    return TrainState(
        model=model,
        family=family,
        capabilities=capabilities,
        optimizers=optimizers,
        strategy=strategy,
        total_steps=schedule_length(config, data, strategy.updates_per_batch),
        step=config.start_step,  # the JD fork's start_step; a resumed checkpoint's step wins
        accumulation_steps=k,
        slot_carries=[None] * k if k > 1 else [],
        loss_scaler=build_loss_scaler(config, strategy.name, family.puzzle_embedding(head)),
        ema=ema,
        hard_examples=counts,
        provenance=provenance,
        contamination=contamination,
    )
