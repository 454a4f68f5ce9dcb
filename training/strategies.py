"""Step strategies: how one batch becomes the gradients of one optimizer step.

The loop calls ``strategy.compute_gradients(state, batch, guard)``; each strategy runs the
forward(s), writes ``.grad`` and returns the last supervision step's ``LossOutput``, its own
metrics and whether the gradients are already summed over ranks. The rest of the step
(cross-rank reduction, norm, clipping, optimizers, EMA) is the same for all
(``training.step``). Strategies register in ``STEP_STRATEGIES``; ``build_strategy`` takes the
one ``step_strategy`` names, or with ``auto`` picks by the objective (``objective=sum`` is
gradient descent, every other objective Jacobian descent). Adding a strategy is one class plus
a registration; ``step_strategy=<name>`` selects it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from models.family import Capabilities, ModelFamily
from models.losses import LossOutput
from models.recursive_reasoning.act import perturb_carry
from training import jd
from training.config import PretrainConfig
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


class StepStrategy(ABC):
    """Turns one batch into ``.grad`` of the trainable tensors."""

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

    @abstractmethod
    def compute_gradients(self, state: TrainState, batch: Batch, guard: Guard) -> Gradients:
        """Forward(s) and backward(s) for ``batch``; advances ``state.carry``."""

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
        # The one place the loss is normalised: every rank divides its local sum by the global
        # batch size, and the SUM all-reduce of the gradients then gives the global mean.
        (loss / self.config.global_batch_size).backward()
        return Gradients(out, unchecked_non_finite=(~torch.isfinite(loss.detach())).float())


@STEP_STRATEGIES.register("jacobian_descent")
class JacobianDescent(StepStrategy):
    """The losses split into objectives, their gradients combined by a TorchJD aggregator
    (``training.jd``).

    Stacked supervision steps run on the same batch, each differentiated (or folded into the
    Jacobian) before the next, so memory stays that of one. All ``halt_max_steps`` steps
    always run (the research fork stopped once every slot had halted, which for its no-ACT
    ``trmjd`` is the same), so the objectives do not depend on the world size. Per-sample
    layers and TorchJD's autogram hooks work on eager modules: the model runs uncompiled.
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

        def contributions() -> Iterator[torch.Tensor]:
            for s in range(layout.S):
                out: LossOutput = state.model(carry=state.carry, batch=batch, return_keys=())
                state.carry = out.new_carry
                last["out"] = out
                halt = out.halt_loss_per_sample if out.has_halting else None
                c = jd.step_contributions(
                    layout, s, out.normalized_token_loss, halt, out.internal_token_loss
                )
                guard(c.detach().sum())
                if spec.carry_perturbation_rate > 0 and s < layout.S - 1:
                    state.carry = perturb_carry(state.carry, spec.carry_perturbation_rate)
                yield c

        if layout.m == 1:
            for c in contributions():  # gradient descent over stacked steps: one backward each
                (c.sum() / self.config.global_batch_size).backward()
            return Gradients(last["out"], {"jd/num_objectives": 1.0})
        extra = []
        if self.puzzle_emb is not None and self.puzzle_emb.local_weights.requires_grad:
            extra.append(self.puzzle_emb.local_weights)
        result = self.descent.step(
            steps=contributions(),
            layout=layout,
            params=[p for p in state.raw_model.parameters() if p.requires_grad],
            extra_params=extra,
            global_batch_size=self.config.global_batch_size,
            step_index=state.step,
            all_reduce=all_reduce_sum_,
        )
        return Gradients(last["out"], result.metrics, result.reduced_across_ranks)


def strategy_name(config: PretrainConfig) -> str:
    """The registered strategy the config asks for (``step_strategy``, or by the objective)."""
    if config.step_strategy == "auto":
        return "gradient_descent" if config.objective.is_gradient_descent else "jacobian_descent"
    try:
        name = STEP_STRATEGIES.canonical(config.step_strategy)
    except ValueError as e:
        raise ConfigError(f"step_strategy: {e}") from None
    if name == "gradient_descent" and not config.objective.is_gradient_descent:
        raise ConfigError(
            f"step_strategy gradient_descent would ignore objective '{config.objective.name}'; "
            "use step_strategy=auto or objective=sum"
        )
    return name


def build_strategy(
    config: PretrainConfig, head: nn.Module, family: ModelFamily, capabilities: Capabilities
) -> StepStrategy:
    return STEP_STRATEGIES.get(strategy_name(config))(config, head, family, capabilities)
