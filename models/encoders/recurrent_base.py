"""What the recurrent demonstration encoders share: a state carried across ACT steps.

ETRM's "ETRMTRM" (bdsaglam/etrm, ``models/encoders/recurrent_base.py``, used by
``models/recursive_reasoning/etrmtrm.py``) gives the encoder a state s of T tokens [B, T, D]
that evolves alongside the decoder's latents. At every ACT step the encoder reads the row's
demos again, with gradient, computes a new state s' from them and from s, and blends

    s_next = 0.9 · s + 0.1 · s'

(ETRM's exponential moving average: the decoder follows a slowly moving context). s arrives
detached, so gradient flows through the 0.1 · s' part alone; rows that start an item begin
from ``initial_state`` (fixed random buffers, trunc-normal std 1, as the decoder's ``H_init``).

The context the decoder reads at this step is the blended state (one named state,
``context_state``) **with its gradient**; only the state handed on to the next step is
detached. ETRM handed the decoder that detached state, so no gradient of the LM or Q loss
ever reached its recurrent encoders, which stayed at their random initialisation (its F3
"ETRM-Iterative" run). ``TRMWithRecurrentEncoder`` keeps that behaviour reachable behind
``arch.encoder_detach_context`` for reproduction only.

Shapes: B rows, K demo slots, S grid tokens, T state tokens (``output_tokens``), D hidden.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from pydantic import Field

from models.common import trunc_normal_init_
from models.encoders.base import DemoEncoder, EncoderConfig, EncoderOutput, encode_demo_slots
from models.encoders.grid import DemoGridEncoder

# ETRM's blend of the carried state (kept) with the step's new state.
EMA_KEEP = 0.9
EMA_NEW = 0.1

State = dict[str, torch.Tensor]


class RecurrentEncoderConfig(EncoderConfig):
    """``EncoderConfig`` plus the depth of ``trm_style``'s reasoning network (ETRM's
    ``ETRMTRMConfig.encoder_l_layers``)."""

    encoder_l_layers: int = Field(
        2, ge=1, description="trm_style: blocks of the encoder's L_level network"
    )


def as_recurrent_config(config: EncoderConfig) -> RecurrentEncoderConfig:
    """``config`` as a ``RecurrentEncoderConfig`` (ETRM's defaults for the keys it lacks)."""
    if isinstance(config, RecurrentEncoderConfig):
        return config
    return RecurrentEncoderConfig(**config.model_dump())


def blend(carried: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``0.9 · carried + 0.1 · new`` (same shapes), with gradient through ``new`` only."""
    return EMA_KEEP * carried.detach() + EMA_NEW * new


class RecurrentDemoEncoder(DemoEncoder):
    """Base of the recurrent encoders: demos and a carried state in, context and next state out.

    Subclasses name their states and init buffers in ``state_inits`` (state name → buffer
    [T, D] in the forward dtype), the state the decoder reads in ``context_state``, and
    implement ``update``. Every valid demo pair goes through ``grid_encoder`` (ETRM's
    ``DemoGridEncoder``), re-run at every step with gradient.
    """

    is_recurrent: ClassVar[bool] = True
    state_inits: ClassVar[dict[str, str]] = {}
    context_state: ClassVar[str]

    config: RecurrentEncoderConfig

    def __init__(self, config: EncoderConfig) -> None:
        config = as_recurrent_config(config)
        super().__init__(config)
        self.grid_encoder = DemoGridEncoder(config)
        for buffer in self.state_inits.values():
            init = torch.empty(config.output_tokens, config.hidden_size, dtype=self.forward_dtype)
            self.register_buffer(buffer, trunc_normal_init_(init, std=1.0), persistent=True)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> State:
        """Every state of ``batch_size`` rows that start an item: [B, T, D] copies of the
        init buffers (own storage, so that writing a row leaves the others alone)."""
        states = {}
        for name, buffer in self.state_inits.items():
            init = getattr(self, buffer)
            init = init if device is None else init.to(device)
            states[name] = init.expand(batch_size, -1, -1).clone()
        return states

    def reset_state(self, reset_flag: torch.Tensor, state: State) -> State:
        """``state`` with the rows where ``reset_flag`` [B] is set back at the init buffers."""
        flag = reset_flag.view(-1, 1, 1)
        return {
            name: torch.where(flag, getattr(self, buffer), state[name])
            for name, buffer in self.state_inits.items()
        }

    def forward(
        self,
        demo_inputs: torch.Tensor,
        demo_labels: torch.Tensor,
        demo_mask: torch.Tensor,
        state: State | None = None,
    ) -> EncoderOutput:
        """demo_inputs, demo_labels int [B, K, S], demo_mask bool [B, K], ``state`` {name:
        [B, T, D]} (None: every row starts an item) → ``context`` [B, T, D] with gradient,
        ``z_pooled`` [B, D] (its token mean) and the detached next ``state``."""
        demo_mask = demo_mask.to(torch.bool)
        if state is None:
            state = self.initial_state(demo_inputs.shape[0], demo_inputs.device)
        slots = encode_demo_slots(
            self.grid_encoder, demo_inputs, demo_labels, demo_mask, self.pack_demos
        )
        new = self.update(slots, demo_mask, {name: state[name] for name in self.state_inits})
        blended = {name: blend(state[name], new[name]) for name in self.state_inits}
        context = blended[self.context_state]
        return EncoderOutput(
            context=context,
            z_pooled=context.mean(dim=1),
            # Truncated backpropagation: the next step starts a new graph, as the decoder's carry.
            state={name: value.detach() for name, value in blended.items()},
        )

    @abstractmethod
    def update(self, slots: torch.Tensor, demo_mask: torch.Tensor, state: State) -> State:
        """The step's new states before the blend, with gradient: ``slots`` [B, K, D] (the grid
        encoder's vectors, zeros at invalid slots), ``demo_mask`` bool [B, K], ``state``
        {name: [B, T, D]} → {name: [B, T, D]}."""
