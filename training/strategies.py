"""Step strategies: how one batch becomes the gradients of one optimizer step.

The loop calls ``strategy.compute_gradients(state, batch, guard)``; each strategy runs the
forward(s), writes ``.grad`` and returns the last supervision step's ``LossOutput``, its own
metrics and whether the gradients are already summed over ranks. The rest of the step
(cross-rank reduction, norm, clipping, optimizers, EMA) is the same for all
(``training.step``). A strategy may take several optimizer steps on one batch
(``updates_per_batch``, ETRM-FCT's N): the loop then hands it the same batch that many times in
a row, and ``position`` (saved with the strategy, so a checkpoint may fall between them) says
how many it has taken. With gradient accumulation the loop hands the strategy each micro-batch
of an optimizer step in turn and its gradients add up in ``.grad``; ``loss_divisor``
(``global_batch_size × accumulation_steps``) makes their sum the mean over the whole effective
batch. Strategies register in ``STEP_STRATEGIES``; ``build_strategy`` takes the
one ``step_strategy`` names, or with ``auto`` picks fixed computation time when the number of
steps per batch is known (``arch.optimizer_steps_per_batch``, ``updates_per_batch``) and
otherwise by the objective (``objective=sum`` is gradient descent, every other objective
Jacobian descent). Adding a strategy is one class plus a registration;
``step_strategy=<name>`` selects it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from models.family import Capabilities, ModelFamily
from models.losses import LossOutput
from models.recursive_reasoning.act import perturb_carry
from training import jd
from training.config import PretrainConfig
from training.optimizers import keep_micro_batch_gradients
from utils.distributed import all_reduce_sum_
from utils.registry import Registry
from utils.schema import ConfigError

if TYPE_CHECKING:
    from training.state import TrainState

Batch = dict[str, torch.Tensor]
Guard = Callable[[torch.Tensor], None]  # raises when a loss is not finite (on every rank)


@dataclass
class Gradients:
    """What a strategy leaves for the shared part of the step."""

    out: LossOutput  # the last supervision step's output (its metrics are logged)
    metrics: dict[str, float] = field(default_factory=dict)  # the strategy's own
    reduced_across_ranks: bool = False  # ``.grad`` already holds the sum over ranks
    # 1.0 where this rank's loss was not finite and not yet checked: the step checks it with
    # the metrics, in the same all-reduce and host read, before any optimizer update.
    unchecked_non_finite: torch.Tensor | None = None
    # The strategy counted every forward's rows for hard-example sampling itself (stacked
    # supervision steps: rows halt at any of them), so the step does not count ``out`` again.
    rows_observed: bool = False


class StepStrategy(ABC):
    """Turns one batch into ``.grad`` of the trainable tensors.

    ``norm_groups`` are the family's named parameter groups whose gradient norms the step logs
    (``ModelFamily.norm_groups``; empty for TRM). ``updates_per_batch`` optimizer steps are
    taken on each batch; ``position`` counts those already taken on the current one.
    ``loss_divisor`` divides every summed loss before its backward: the examples of one
    optimizer step over all ranks and micro-batches.
    """

    name: ClassVar[str]
    compiles: ClassVar[bool] = True  # whether the model may run under torch.compile

    def __init__(
        self,
        config: PretrainConfig,
        head: nn.Module,
        family: ModelFamily,
        capabilities: Capabilities,
    ) -> None:
        self.config = config
        self.family = family
        self.capabilities = capabilities
        self.norm_groups: dict[str, list[nn.Parameter]] = family.norm_groups(head)
        self.updates_per_batch = 1
        self.position = 0
        self.loss_divisor = config.global_batch_size * config.accumulation_steps

    @abstractmethod
    def compute_gradients(self, state: TrainState, batch: Batch, guard: Guard) -> Gradients:
        """Forward(s) and backward(s) for ``batch``; advances ``state.carry``."""

    def advance(self) -> bool:
        """Count one optimizer step (taken or skipped) on the current batch; whether that
        finished the batch."""
        self.position = (self.position + 1) % self.updates_per_batch
        return self.position == 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


STEP_STRATEGIES: Registry[type[StepStrategy]] = Registry("step strategy")


@STEP_STRATEGIES.register("gradient_descent")
class GradientDescent(StepStrategy):
    """Upstream's step: one supervision step, the summed loss, one backward."""

    name: ClassVar[str] = "gradient_descent"

    def compute_gradients(self, state: TrainState, batch: Batch, guard: Guard) -> Gradients:
        out: LossOutput = state.model(carry=state.carry, batch=batch, return_keys=())
        state.carry = out.new_carry
        loss = out.total()
        # The one place the loss is normalised: every rank divides its local sum by the
        # examples of the optimizer step (global batch × micro-batches), and the SUM
        # all-reduce of the accumulated gradients then gives the mean over them. The loss
        # scale (a power of two, 1 unless training.loss_scaling is on) lifts float16's
        # activation gradients out of underflow; training.step divides it out again.
        (loss * state.loss_scale / self.loss_divisor).backward()
        return Gradients(out, unchecked_non_finite=(~torch.isfinite(loss.detach())).float())


@STEP_STRATEGIES.register("fixed_computation_time")
class FixedComputationTime(GradientDescent):
    """ETRM-FCT's loop (``pretrain_encoder.py`` at ETRM 67e3e0b): N optimizer steps per batch.

    At the first step of a batch every row loads it afresh (latents from the init states, no
    carry from the previous batch); each later step continues from the previous step's carry
    (detached by the model) with the weights that step updated. The loss is always on the
    batch's labels, and rows never halt in training: a row that the Q head (or
    ``halt_max_steps``) would stop keeps working on its item until the batch's N steps are
    done. Every step is a whole optimizer step (backward, cross-rank reduction, clipping,
    optimizers, EMA; ``training.step``) with its own learning rate: the schedule counts
    optimizer steps, where ETRM gave all N steps of a batch the batch's learning rate. The
    metrics logged are those of the last of the N steps, as ETRM's. Gradient accumulation is
    refused: each of a batch's N steps needs the update of the one before, so micro-batches of
    other batches have no step to join.
    """

    name: ClassVar[str] = "fixed_computation_time"

    def __init__(
        self,
        config: PretrainConfig,
        head: nn.Module,
        family: ModelFamily,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(config, head, family, capabilities)
        steps = fct_steps_per_batch(config)
        assert steps is not None  # strategy_name picks this strategy only then
        self.updates_per_batch = steps

    def compute_gradients(self, state: TrainState, batch: Batch, guard: Guard) -> Gradients:
        assert state.carry is not None  # training.step creates it
        # halted=True makes every row reload the batch (ACTModel resets halted rows); False
        # keeps every row on its item, whatever the Q head decided at the previous step.
        restart = self.position == 0
        halted = torch.full_like(state.carry.halted, restart)
        state.carry = replace(state.carry, halted=halted)
        return super().compute_gradients(state, batch, guard)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state.get("position", 0))


@STEP_STRATEGIES.register("jacobian_descent")
class JacobianDescent(StepStrategy):
    """The losses split into objectives, their gradients combined by a TorchJD aggregator
    (``training.jd``).

    Stacked supervision steps run on the same batch, each differentiated (or folded into the
    Jacobian) before the next, so memory stays that of one. All ``halt_max_steps`` steps
    always run (the research fork stopped once every slot had halted, which for its no-ACT
    ``trmjd`` is the same), so the objectives do not depend on the world size. Per-sample
    layers and TorchJD's autogram hooks work on eager modules: the model runs uncompiled.

    With gradient accumulation each micro-batch is aggregated on its own, as the research fork
    does: its objectives' Jacobian goes through the aggregator and the aggregated vector
    (scaled by ``m / loss_divisor``; with ``objective.scale=global_batch`` the fork's Jᵀw of
    the rows divided by ``loss_divisor``) is added to ``.grad``, so the update is the sum of
    the micro-batches' aggregations, not one aggregation of the whole effective batch's
    objectives. Objectives every rank shares sum their Jacobian over ranks per micro-batch
    (the aggregation needs the global one; ``objective.ranks=local``: each rank's own, as the
    fork); per-sample objectives are reduced once, at the window's end. Each stacked step's
    puzzle-embedding rows are handed to the sparse optimizer with the ids that step looked up
    (``jd.EmbeddingRows``), as micro-batches are: a slot that halts mid-stack has reloaded
    another puzzle.
    """

    name: ClassVar[str] = "jacobian_descent"
    compiles: ClassVar[bool] = False

    def __init__(
        self,
        config: PretrainConfig,
        head: nn.Module,
        family: ModelFamily,
        capabilities: Capabilities,
    ) -> None:
        super().__init__(config, head, family, capabilities)
        if not capabilities.jacobian_descent or capabilities.kl_loss:
            raise ConfigError(
                f"objective.name: '{config.objective.name}' (Jacobian descent) is not supported "
                f"for arch={config.arch.name}: its demonstration encoder encodes demos packed, "
                "so per-sample and per-objective gradients are not formed; use objective=sum"
            )
        self.descent = jd.JacobianDescent(
            config.objective, config.aggregator, model=head, seed=config.seed
        )
        self.puzzle_emb = family.puzzle_embedding(head)

    def _layout(self, batch: Batch) -> jd.Layout:
        spec, arch = self.config.objective, self.config.arch
        S = arch.halt_max_steps if spec.supervisions == "stacked" else 1
        families = (0 if spec.internal == "only" else 1) + (
            arch.H_cycles if spec.internal != "none" else 0
        )
        return jd.Layout(
            spec=spec,
            S=S,
            C=families,
            B=batch["inputs"].shape[0],
            P=batch["inputs"].shape[1],
            has_halt=self.capabilities.halting,
        )

    def compute_gradients(self, state: TrainState, batch: Batch, guard: Guard) -> Gradients:
        spec = self.config.objective
        layout = self._layout(batch)
        last: dict[str, LossOutput] = {}
        # A slot that halts between stacked steps reloads another puzzle: each step's
        # puzzle-embedding rows are written with the ids that step looked up (jd.EmbeddingRows).
        emb = None
        if self.puzzle_emb is not None and self.puzzle_emb.local_weights.requires_grad:
            emb = jd.EmbeddingRows(
                self.puzzle_emb.local_weights,
                self.puzzle_emb.local_ids,
                keep=lambda: keep_micro_batch_gradients(state.optimizers),
            )

        def contributions() -> Iterator[torch.Tensor]:
            for s in range(layout.S):
                out: LossOutput = state.model(carry=state.carry, batch=batch, return_keys=())
                state.carry = out.new_carry
                last["out"] = out
                if state.hard_examples is not None:
                    state.hard_examples.observe_output(out)
                if emb is not None:
                    emb.seen.append(emb.ids.clone())
                halt = out.halt_loss_per_sample if out.has_halting else None
                c = jd.step_contributions(
                    layout, s, out.normalized_token_loss, halt, out.internal_token_loss
                )
                guard(c.detach().sum())
                if spec.carry_perturbation_rate > 0 and s < layout.S - 1:
                    state.carry = perturb_carry(state.carry, spec.carry_perturbation_rate)
                yield c

        if layout.m == 1:
            for s, c in enumerate(contributions()):  # gradient descent over stacked steps
                (c.sum() / self.loss_divisor).backward()
                if emb is not None and s < layout.S - 1:
                    emb.keep()  # this step's rows, before the next forward reloads slots
            return Gradients(last["out"], {"jd/num_objectives": 1.0}, rows_observed=True)
        result = self.descent.step(
            steps=contributions(),
            layout=layout,
            params=[p for p in state.raw_model.parameters() if p.requires_grad],
            extra_params=[],
            embedding=emb,
            global_batch_size=self.loss_divisor,
            step_index=state.step,
            all_reduce=all_reduce_sum_,
        )
        return Gradients(
            last["out"], result.metrics, result.reduced_across_ranks, rows_observed=True
        )


def fct_steps_per_batch(config: PretrainConfig) -> int | None:
    """Optimizer steps per batch for fixed computation time: the architecture's
    (``arch=etrm_fct``: ``arch.num_act_steps``) or ``updates_per_batch``; None when neither
    gives one."""
    steps = config.arch.optimizer_steps_per_batch
    if steps is not None and config.updates_per_batch is not None:
        raise ConfigError(
            f"updates_per_batch: arch={config.arch.name} takes {steps} optimizer steps per "
            "batch (arch.num_act_steps); set that instead"
        )
    return steps if steps is not None else config.updates_per_batch


def strategy_name(config: PretrainConfig) -> str:
    """The registered strategy the config asks for (``step_strategy``, or chosen as the module
    docstring says)."""
    fct_steps = fct_steps_per_batch(config)
    if config.step_strategy == "auto":
        if fct_steps is not None:
            name = "fixed_computation_time"
        elif config.objective.is_gradient_descent:
            name = "gradient_descent"
        else:
            name = "jacobian_descent"
    else:
        try:
            name = STEP_STRATEGIES.canonical(config.step_strategy)
        except ValueError as e:
            raise ConfigError(f"step_strategy: {e}") from None
    summed_only = name in ("gradient_descent", "fixed_computation_time")
    if summed_only and not config.objective.is_gradient_descent:
        fix = "objective=sum" if fct_steps is not None else "step_strategy=auto or objective=sum"
        raise ConfigError(
            f"step_strategy {name} would ignore objective '{config.objective.name}'; use {fix}"
        )
    if name == "fixed_computation_time" and fct_steps is None:
        raise ConfigError(
            "step_strategy fixed_computation_time needs the optimizer steps per batch: "
            "arch=etrm_fct arch.num_act_steps=N, or updates_per_batch=N for other models"
        )
    if name == "fixed_computation_time" and config.accumulation_steps > 1:
        raise ConfigError(
            f"grad_accum_steps: fixed computation time takes {fct_steps} optimizer steps on each "
            "batch, each continuing the batch's carry, so micro-batches of other batches cannot "
            "join them; drop effective_batch_size/grad_accum_steps or raise global_batch_size"
        )
    if name != "fixed_computation_time" and fct_steps is not None:
        what = (
            f"arch={config.arch.name} (arch.num_act_steps)"
            if config.arch.optimizer_steps_per_batch is not None
            else f"updates_per_batch={fct_steps}"
        )
        raise ConfigError(
            f"step_strategy {name}: {what} asks for {fct_steps} optimizer steps per batch, "
            "which only fixed_computation_time takes; use step_strategy=auto"
        )
    return name


def build_strategy(
    config: PretrainConfig, head: nn.Module, family: ModelFamily, capabilities: Capabilities
) -> StepStrategy:
    """The strategy ``strategy_name`` picks; ``freeze_decoder_steps`` needs a model whose
    family names its decoder (``norm_groups``)."""
    strategy = STEP_STRATEGIES.get(strategy_name(config))(config, head, family, capabilities)
    if config.freeze_decoder_steps > 0 and "decoder" not in strategy.norm_groups:
        raise ConfigError(
            f"freeze_decoder_steps: arch={config.arch.name} has no encoder, so nothing would "
            "train while its decoder is frozen; use an encoder model (arch=etrm, etrm_fct) or "
            "set freeze_decoder_steps=0"
        )
    return strategy
