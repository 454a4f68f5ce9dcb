"""ETRMTRM (``arch=etrmtrm``): ETRM with a recurrent demonstration encoder.

ETRM's ``models/recursive_reasoning/etrmtrm.py`` (``TRMWithRecurrentEncoder``, trained by its
``pretrain_etrmtrm.py``): the model of ``arch=etrm`` (TRM's decoder and ACT loop, the demos
re-encoded at every step) whose encoder carries a state across the ACT steps of an item
(``trm_style`` or ``recurrent_standard``, ``models.encoders.recurrent_base``). At every step the
encoder reads the row's demos and its state and returns the step's context and its next state.

The state belongs to the row's item, as its demos do: it lives in the carry's ``current_data``
under ``encoder_state.<name>`` keys, so it persists across batches and checkpoints. A row that
starts an item reloads its data from the batch and, with it, the encoder's ``initial_state``;
the other rows continue from their carried state, which is detached (no graph across steps).

The context keeps its gradient, so the LM and Q losses train the encoder. ETRM fed the decoder
the detached state instead and its recurrent encoders never trained (spec §3.7);
``encoder_detach_context=True`` reproduces that, for comparison only.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from models.arch_config import ARCH_CONFIGS
from models.encoders.base import ENCODERS
from models.encoders.recurrent_base import RecurrentDemoEncoder, RecurrentEncoderConfig
from models.etrm.configs import ETRMConfig
from models.etrm.model import DEMO_FIELDS, TRMWithEncoder
from models.recursive_reasoning.act import ACTCarry
from models.recursive_reasoning.common import Batch
from models.registry import MODELS

STATE_PREFIX = "encoder_state."  # carry.current_data key of each encoder state


@ARCH_CONFIGS.register("etrmtrm", aliases=["recursive_reasoning.etrmtrm@TRMWithRecurrentEncoder"])
class ETRMTRMConfig(ETRMConfig):
    """TRMWithRecurrentEncoder: ``arch=etrm`` with a recurrent encoder whose state evolves with
    the ACT steps (ETRM's ``ETRMTRMConfig``)."""

    recurrent_encoder_type: str = Field(
        "recurrent_standard",
        description="the recurrent encoder (ENCODERS name): recurrent_standard (ETRM's "
        "variant A, one cross-attention update per step) or trm_style (variant B, H/L cycles)",
    )
    encoder_type: str = Field(
        "standard",
        description="ETRM's placeholder, unused here (the encoder is recurrent_encoder_type); "
        "only standard or the recurrent_encoder_type's name are accepted",
    )
    encoder_h_cycles: int = Field(
        3, ge=1, description="trm_style: outer cycles per ACT step, the last with gradient"
    )
    encoder_l_cycles: int = Field(
        1, ge=1, description="trm_style: z_e_L updates per outer cycle (ETRM's YAML: 4)"
    )
    encoder_l_layers: int = Field(2, ge=1, description="trm_style: blocks of its L_level")
    encoder_detach_context: bool = Field(
        False,
        description="reproduces ETRM's bug: the decoder reads the detached state, so no loss "
        "gradient reaches the encoder (its F3 'ETRM-Iterative' run); for comparison only",
    )

    @field_validator("recurrent_encoder_type")
    @classmethod
    def _recurrent_encoder(cls, value: str) -> str:
        name = ENCODERS.canonical(value)
        if not ENCODERS.get(name).is_recurrent:
            recurrent = [n for n in ENCODERS.names() if ENCODERS.get(n).is_recurrent]
            raise ValueError(
                f"'{value}' is not a recurrent encoder; choose one of: {', '.join(recurrent)} "
                "(arch=etrm takes the others)"
            )
        return name

    @model_validator(mode="after")
    def _check_recurrent_keys(self) -> ETRMTRMConfig:
        if self.encoder_type not in ("standard", self.recurrent_encoder_type):
            raise ValueError(
                f"arch=etrmtrm builds arch.recurrent_encoder_type ({self.recurrent_encoder_type}); "
                f"arch.encoder_type={self.encoder_type} would be ignored: set "
                f"arch.recurrent_encoder_type={self.encoder_type} or use arch=etrm"
            )
        if self.conditioning_refresh != "every_step":
            raise ValueError(
                "a recurrent encoder's context changes at every step and cannot be cached: "
                "arch.conditioning_refresh must be every_step"
            )
        unused = {"encoder_set_layers": 1, "lpn_latent_dim": 32}
        for key, default in unused.items():
            if getattr(self, key) != default:
                raise ValueError(
                    f"arch.{key} has no effect on the recurrent encoders: leave it at {default}"
                )
        return self

    @property
    def has_kl_loss(self) -> bool:
        return ENCODERS.get(self.recurrent_encoder_type).is_variational

    def encoder_config(self, vocab_size: int, seq_len: int) -> RecurrentEncoderConfig:
        """``arch=etrm``'s encoder config for ``recurrent_encoder_type``, with its cycles and
        depth."""
        base = super().encoder_config(vocab_size, seq_len).model_dump()
        return RecurrentEncoderConfig(
            **{
                **base,
                "encoder_type": self.recurrent_encoder_type,
                "encoder_h_cycles": self.encoder_h_cycles,
                "encoder_l_cycles": self.encoder_l_cycles,
                "encoder_l_layers": self.encoder_l_layers,
            }
        )


class TRMWithRecurrentEncoder(TRMWithEncoder):
    """ETRMTRM: ``TRMWithEncoder`` whose encoder state rides in the carry (module doc).

    ``forward(carry, batch)`` is one ACT step with ``TRMWithEncoder``'s batch and outputs; the
    carry's ``current_data`` also holds ``encoder_state.<name>`` [B, T, D] in the forward dtype.
    """

    config: ETRMTRMConfig
    encoder: RecurrentDemoEncoder

    def _with_fresh_state(self, batch: Batch) -> Batch:
        """``batch`` plus the state a row starting an item takes, under the carry's keys."""
        fresh = self.encoder.initial_state(batch["inputs"].shape[0], batch["inputs"].device)
        return {**batch, **{STATE_PREFIX + name: value for name, value in fresh.items()}}

    def initial_carry(self, batch: Batch) -> ACTCarry:
        return super().initial_carry(self._with_fresh_state(batch))

    def forward(self, carry: ACTCarry, batch: Batch) -> tuple[ACTCarry, dict[str, Any]]:
        # Rows that start an item reload the fresh state with the rest of their data.
        return super().forward(carry, self._with_fresh_state(batch))

    def _context(
        self, halted: torch.Tensor, data: Batch, cached: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's context [B, T, D] from the demos and state in ``data`` (the step's
        current data, which the new carry keeps), whose state is replaced by the next one."""
        state = {name: data[STATE_PREFIX + name] for name in self.encoder.state_inits}
        out = self.encoder(*(data[k] for k in DEMO_FIELDS), state=state)
        assert out.state is not None
        data.update({STATE_PREFIX + name: value for name, value in out.state.items()})
        context = out.context.detach() if self.config.encoder_detach_context else out.context
        return context, out.kl_per_sample


MODELS.add("etrmtrm", TRMWithRecurrentEncoder)
