"""Loss head of the ACT models: per-token cross-entropy and the halting (Q) losses.

Upstream ``models/losses.py`` (``ACTLossHead``, ``stablemax_cross_entropy``); the no-ACT head,
the differential loss and the per-cycle losses come from the Jacobian-descent fork
(mattbuot/TinyRecursiveModelsJD, ``models/losses.py``).

``ACTLossHead`` wraps a model and runs one supervision step for every slot of the carry. It does
not reduce: it returns a ``LossOutput`` holding the per-token LM loss, the per-sample halting
losses, detached metric sums and the all-halted flag. ``LossOutput.total()`` is upstream's scalar,
the gradient-descent objective; the step strategies (``training.strategies``) reduce a
``LossOutput`` to one objective or to many.

``NoACTLossHead`` is the JD fork's head for models without halting (``arch=trmjd``). Both heads
fill ``LossOutput.internal_token_loss`` when the model outputs per-H-cycle logits, and take the
fork's ``differential_loss`` flag (the LM loss sees the logits minus the previous supervision
step's).

For demonstration-conditioned models (ETRM, ``models.etrm``) the head also adds a variational
encoder's KL term (``kl_weight · Σ_b KL_b``, reduced like the other terms), passes the model's
encoder diagnostics through to the metrics and, with ``all_steps_metrics``, adds ETRM's training
metrics counted over every row at every step (``all_steps/...``) beside TRM's at-halt ones.

Registries: ``LOSS_FUNCTIONS`` (``arch.loss.loss_type``), ``LOSS_HEADS`` (``arch.loss.name``,
with upstream's ``losses@ACTLossHead`` alias).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataset.common import IGNORE_LABEL_ID  # also importable from here, as in upstream
from models.arch_config import LOSS_HEAD_ALIASES
from utils.registry import Registry
from utils.schema import ConfigError

HALT_LOSS_WEIGHT = 0.5  # upstream: lm_loss + 0.5 · (q_halt_loss + q_continue_loss)

# Optional entries of a model's outputs dict read by the loss head.
KL_OUTPUT = "kl_per_sample"  # float32 [B]: each row's KL divergence (variational encoders)
DIAGNOSTICS_OUTPUT = "diagnostics"  # dict[str, Tensor]: detached metric sums, passed through
ALL_STEPS_PREFIX = "all_steps"  # ETRM's metric family: every row with labels, at every step


# ----------------------------------------------------------------------------------------------
# Per-token losses
# ----------------------------------------------------------------------------------------------
class TokenLossFunction(Protocol):
    """``(logits [..., V], labels [...], ignore_index, valid_mask [...] | None) -> loss [...]``.

    The loss is unreduced, zero wherever the mask is False, and never indexes with a masked label.
    """

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        ignore_index: int = IGNORE_LABEL_ID,
        valid_mask: Tensor | None = None,
    ) -> Tensor: ...


LOSS_FUNCTIONS: Registry[TokenLossFunction] = Registry("loss function")


def _stablemax_s(x: Tensor, epsilon: float = 1e-30) -> Tensor:
    """s(x) = x + 1 for x ≥ 0 and 1 / (1 − x + ε) for x < 0, elementwise."""
    # Each branch is evaluated only on its own half-line: the values are upstream's
    # where(x < 0, 1/(1 − x + ε), x + 1), but the discarded branch can no longer have an infinite
    # derivative (at x = 1 in float32) that where's backward would turn into NaN (0 · inf).
    negative = 1 / (1 - x.clamp(max=0) + epsilon)
    positive = x.clamp(min=0) + 1
    return torch.where(x < 0, negative, positive)


def log_stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """log(s(x) / Σ s(x)) along ``dim``, in the dtype of ``x`` (shape unchanged).

    Stablemax (Prieto et al., "Grokking at the edge of numerical stability") grows linearly
    instead of exponentially, so large logits neither overflow nor saturate.
    """
    s_x = _stablemax_s(x)
    return torch.log(s_x / torch.sum(s_x, dim=dim, keepdim=True))


def _valid_and_safe_labels(
    labels: Tensor, ignore_index: int, valid_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The mask (``labels != ignore_index`` by default) and int64 labels with 0 where masked."""
    if valid_mask is None:
        valid_mask = labels != ignore_index
    return valid_mask, torch.where(valid_mask, labels, 0).to(torch.long)


@LOSS_FUNCTIONS.register("stablemax_cross_entropy")
def stablemax_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_LABEL_ID,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Per-token −log stablemax(logits)[label]: logits [..., V], labels [...] → loss [...].

    Computed in float64 (float32 on MPS, which has no float64), as upstream; positions where
    ``valid_mask`` (default ``labels != ignore_index``) is False are exactly 0 and their labels
    are never used as an index.
    """
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    logprobs = log_stablemax(logits.to(dtype), dim=-1)
    valid_mask, safe_labels = _valid_and_safe_labels(labels, ignore_index, valid_mask)
    label_logprobs = torch.gather(logprobs, dim=-1, index=safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid_mask, -label_logprobs, 0)


@LOSS_FUNCTIONS.register("softmax_cross_entropy")
def softmax_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_LABEL_ID,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Per-token softmax cross-entropy in float32: logits [..., V], labels [...] → loss [...].

    Masked positions (``valid_mask`` False, default ``labels != ignore_index``) are exactly 0.
    Upstream's version took no ``valid_mask`` and raised a TypeError when selected.
    """
    valid_mask, safe_labels = _valid_and_safe_labels(labels, ignore_index, valid_mask)
    loss = F.cross_entropy(
        logits.to(torch.float32).reshape(-1, logits.shape[-1]),
        safe_labels.reshape(-1),
        reduction="none",
    ).view(labels.shape)
    return torch.where(valid_mask, loss, 0)


# ----------------------------------------------------------------------------------------------
# Structured output and its reductions
# ----------------------------------------------------------------------------------------------
@dataclass
class LossOutput:
    """One supervision step's losses, unreduced (B = local batch, S = sequence length).

    * ``token_loss`` [B, S]: per-token cross-entropy (float64 for stablemax), 0 at ignored
      tokens, with grad; covers every slot, halted or not (deep supervision).
    * ``loss_divisor`` [B] int64: max(number of labelled tokens, 1).
    * ``q_halt_loss`` [B]: BCE-with-logits of ``q_halt_logits`` against "every labelled token
      is correct", with grad, unweighted.
    * ``q_continue_loss`` [B] or None: BCE-with-logits of ``q_continue_logits`` against the
      model's bootstrapped ``target_q_continue``; None when the model gives no target.
    * ``metrics``: detached scalar sums over halted slots with labels (``count``, ``accuracy``,
      ``exact_accuracy``, ``q_halt_accuracy`` with halting, ``steps``) and the summed losses
      (``lm_loss``, ``q_halt_loss``, ``q_continue_loss`` when present, ``cycle{i}_lm_loss`` for
      each internal loss). Divide by ``count`` (metrics) or by the global batch (losses) after
      summing over processes.
    * ``outputs``: detached model outputs named in ``return_keys`` plus ``preds`` [B, S]; a
      list output (``cycle_logits``) is stacked along dim 1 ([B, H + 1, S, V]).
    * ``row_metrics``: the per-slot values [B] behind ``metrics`` (``has_labels``,
      ``accuracy``, ``exact_accuracy``, ``q_halt_accuracy`` with halting, ``steps``),
      detached; evaluation uses them to score each slot at the step where it halts.
    * ``all_halted``: bool scalar tensor, every slot halted at this step.
    * ``new_carry``: the model's carry after the step.
    * ``internal_token_loss``: for models with per-H-cycle logits (``cycle_logits``, T + 1
      entries with entry 0 zeros), T tensors [B, S] with grad, differential across cycles:
      ``loss_fn(logits_{i+1} − logits_i.detach())``, 0 at ignored tokens, **not** divided by
      ``loss_divisor`` (the JD fork's scale); entry i reaches only cycle i + 1's computation.
      Not part of ``total()``. None for other models.
    * ``has_halting``: False when the halting losses are constant zeros (no Q head to train),
      so objectives can leave them out.
    * ``kl_loss`` [B] float32 or None: a variational encoder's per-row KL divergence, with grad;
      ``total()`` adds ``kl_weight · Σ_b kl_loss_b``, reduced like the LM and halting terms
      (ETRM averaged it over the batch before the loop divided by the batch again).
    """

    token_loss: Tensor
    loss_divisor: Tensor
    q_halt_loss: Tensor
    q_continue_loss: Tensor | None
    metrics: dict[str, Tensor]
    outputs: dict[str, Tensor]
    all_halted: Tensor
    new_carry: Any
    row_metrics: dict[str, Tensor] = field(default_factory=dict)
    internal_token_loss: list[Tensor] | None = None
    has_halting: bool = True
    kl_loss: Tensor | None = None
    kl_weight: float = 0.0

    @property
    def normalized_token_loss(self) -> Tensor:
        """[B, S]: ``token_loss / loss_divisor`` (each sequence's tokens sum to its mean loss)."""
        return self.token_loss / self.loss_divisor.unsqueeze(-1)

    @property
    def lm_loss_per_sample(self) -> Tensor:
        """[B]: mean token loss of each sequence (0 for a sequence without labels)."""
        return self.normalized_token_loss.sum(-1)

    @property
    def halt_loss_per_sample(self) -> Tensor:
        """[B]: ``0.5 · (q_halt_loss + q_continue_loss)``, the halting part of ``total()``."""
        halt_B = self.q_halt_loss
        if self.q_continue_loss is not None:
            halt_B = halt_B + self.q_continue_loss
        return HALT_LOSS_WEIGHT * halt_B

    def total(self) -> Tensor:
        """Upstream's scalar: Σ_b lm_loss_per_sample + 0.5 · (Σ_b q_halt + Σ_b q_continue),
        plus ``kl_weight · Σ_b kl_loss`` when the model has a KL term.

        Summed over the local batch, not divided by anything: the training loop divides by the
        global batch size once. ``internal_token_loss`` is not included (the JD fork's ``sum``
        mode ignores it too); Jacobian-descent objectives use it.
        """
        halt = self.q_halt_loss.sum()
        if self.q_continue_loss is not None:
            halt = halt + self.q_continue_loss.sum()
        total = self.normalized_token_loss.sum() + HALT_LOSS_WEIGHT * halt
        if self.kl_loss is not None:
            total = total + self.kl_weight * self.kl_loss.sum()
        return total


# ----------------------------------------------------------------------------------------------
# Loss head
# ----------------------------------------------------------------------------------------------
class CarryView(Protocol):
    """What the loss head reads from the model's carry after a step (the model's ``ACTCarry``,
    ``models.recursive_reasoning.common``, satisfies it)."""

    halted: Tensor  # bool [B]
    steps: Tensor  # int32 [B]
    current_data: dict[str, Tensor]  # the data each slot used; "labels" int [B, S]


LOSS_HEADS: Registry[type[nn.Module]] = Registry("loss head")


def sum_row_metrics(row_metrics: dict[str, Tensor], halted: Tensor) -> dict[str, Tensor]:
    """Upstream's metric sums over slots that halted and have labels (``count`` of them);
    ``q_halt_accuracy`` only when the rows have it (heads with halting)."""
    valid_B = halted & row_metrics["has_labels"]
    metrics = {
        "count": valid_B.sum(),
        "accuracy": torch.where(valid_B, row_metrics["accuracy"], 0).sum(),
        "exact_accuracy": (valid_B & row_metrics["exact_accuracy"]).sum(),
        "steps": torch.where(valid_B, row_metrics["steps"], 0).sum(),
    }
    if "q_halt_accuracy" in row_metrics:
        metrics["q_halt_accuracy"] = (valid_B & row_metrics["q_halt_accuracy"]).sum()
    return metrics


def all_steps_metrics(row_metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """ETRM's training metric sums, over every row with labels at this step whether it halted
    or not: ``all_steps/count``, ``/accuracy``, ``/exact_accuracy`` and, with halting,
    ``/q_halt_accuracy``. Divide by ``all_steps/count`` after summing over processes."""
    every_row = torch.ones_like(row_metrics["has_labels"])
    sums = sum_row_metrics(row_metrics, every_row)
    keys = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy")
    return {f"{ALL_STEPS_PREFIX}/{k}": sums[k] for k in keys if k in sums}


def _detach_output(value: Tensor | list[Tensor]) -> Tensor:
    """A detached model output; a per-cycle list [H + 1] × [B, ...] becomes [B, H + 1, ...]."""
    if isinstance(value, Tensor):
        return value.detach()
    return torch.stack([v.detach() for v in value], dim=1)


@LOSS_HEADS.register("ACTLossHead", aliases=LOSS_HEAD_ALIASES["ACTLossHead"])
class ACTLossHead(nn.Module):
    """Wraps an ACT model: one supervision step → ``LossOutput`` (upstream ``ACTLossHead``).

    The model is kept as attribute ``model`` so that state-dict keys read ``model.inner....``
    as upstream's. ``model(carry, batch)`` must return ``(new_carry, outputs)`` with
    ``outputs["logits"]`` [B, S, V], ``outputs["q_halt_logits"]`` and
    ``outputs["q_continue_logits"]`` [B], and optionally ``outputs["target_q_continue"]`` [B].
    Models with per-H-cycle logits (``outputs["cycle_logits"]``, ``arch=trmjd``) also get
    ``internal_token_loss``.

    ``differential_loss`` (the JD fork's flag, off by default): the LM loss is computed on
    ``logits − outputs["previous_logits"]``, the previous supervision step's detached final
    logits carried by the model (its init buffer for a slot that just started); predictions
    and metrics still use the logits themselves. A model without them raises ``ConfigError``.

    A model with a variational encoder outputs ``outputs["kl_per_sample"]`` [B]: it becomes
    ``LossOutput.kl_loss`` with weight ``kl_weight``, and the metrics ``kl_loss`` (Σ_b KL_b)
    and ``kl_loss_weighted`` (``kl_weight`` times it). ``outputs["diagnostics"]`` (detached
    metric sums) are added to the metrics as they are. ``all_steps_metrics`` adds
    ``all_steps_metrics(row_metrics)``.
    """

    has_halting: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        loss_type: str = "stablemax_cross_entropy",
        differential_loss: bool = False,
        kl_weight: float = 0.0,
        all_steps_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_type = LOSS_FUNCTIONS.canonical(loss_type)
        self.loss_fn = LOSS_FUNCTIONS.get(self.loss_type)
        self.differential_loss = differential_loss
        self.kl_weight = kl_weight
        self.all_steps_metrics = all_steps_metrics

    def initial_carry(self, *args: Any, **kwargs: Any) -> Any:
        """The model's initial carry (every slot halted, so the first step loads the batch)."""
        return self.model.initial_carry(*args, **kwargs)

    def _cycle_logits(self, outputs: dict[str, Any]) -> list[Tensor] | None:
        return outputs.get("cycle_logits")

    def _previous_logits(self, outputs: dict[str, Any]) -> Tensor:
        if "previous_logits" not in outputs:
            raise ConfigError(
                f"differential_loss=True needs a model that carries its previous step's logits "
                f"(carry['output_logits'], e.g. arch=trmjd); {type(self.model).__name__} does "
                f"not: set arch.loss.differential_loss=False"
            )
        return outputs["previous_logits"]

    def _halting_losses(
        self, outputs: dict[str, Any], seq_is_correct_B: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """q_halt_loss [B] and q_continue_loss [B] | None (see ``LossOutput``)."""
        q_halt_B = outputs["q_halt_logits"]
        q_halt_loss_B = F.binary_cross_entropy_with_logits(
            q_halt_B, seq_is_correct_B.to(q_halt_B.dtype), reduction="none"
        )
        q_continue_loss_B = None
        if "target_q_continue" in outputs:
            q_continue_loss_B = F.binary_cross_entropy_with_logits(
                outputs["q_continue_logits"], outputs["target_q_continue"], reduction="none"
            )
        return q_halt_loss_B, q_continue_loss_B

    def forward(
        self,
        return_keys: Sequence[str] = (),
        *,
        carry: Any,
        batch: dict[str, Tensor],
    ) -> LossOutput:
        """One supervision step on ``batch`` (inputs/labels [B, S], puzzle_identifiers [B]).

        Labels come from ``new_carry.current_data``: slots that did not halt at the previous
        step keep their old sample, and the batch's sample at that slot is not used.
        Keys of ``return_keys`` that the model does not output are skipped (the evaluation loop
        also asks for batch keys).
        """
        new_carry: CarryView
        new_carry, outputs = self.model(carry=carry, batch=batch)
        labels_BS = new_carry.current_data["labels"]
        logits_BSV = outputs["logits"]
        cycle_logits = self._cycle_logits(outputs)

        with torch.no_grad():
            preds_BS = torch.argmax(logits_BSV, dim=-1)
            mask_BS = labels_BS != IGNORE_LABEL_ID
            counts_B = mask_BS.sum(-1)
            divisor_B = counts_B.clamp_min(1)  # a sequence without labels would divide by 0
            is_correct_BS = mask_BS & (preds_BS == labels_BS)
            seq_is_correct_B = is_correct_BS.sum(-1) == counts_B

            row_metrics = {
                "has_labels": counts_B > 0,
                "accuracy": (is_correct_BS.to(torch.float32) / divisor_B.unsqueeze(-1)).sum(-1),
                "exact_accuracy": seq_is_correct_B,
                "steps": new_carry.steps,
            }
            if self.has_halting:
                q_halt_B = outputs["q_halt_logits"]
                row_metrics["q_halt_accuracy"] = (q_halt_B >= 0) == seq_is_correct_B
            metrics = sum_row_metrics(row_metrics, new_carry.halted)
            if self.all_steps_metrics:
                metrics.update(all_steps_metrics(row_metrics))
            metrics.update(outputs.get(DIAGNOSTICS_OUTPUT, {}))

        lm_input_BSV = logits_BSV
        if self.differential_loss:
            lm_input_BSV = logits_BSV - self._previous_logits(outputs)
        token_loss_BS = self.loss_fn(
            lm_input_BSV, labels_BS, ignore_index=IGNORE_LABEL_ID, valid_mask=mask_BS
        )
        q_halt_loss_B, q_continue_loss_B = self._halting_losses(outputs, seq_is_correct_B)
        internal = None
        if cycle_logits is not None:
            # Differential across H-cycles: cycle i + 1 is scored on what it adds to cycle i.
            internal = [
                self.loss_fn(
                    cycle_logits[i + 1] - cycle_logits[i].detach(),
                    labels_BS,
                    ignore_index=IGNORE_LABEL_ID,
                    valid_mask=mask_BS,
                )
                for i in range(len(cycle_logits) - 1)
            ]

        kl_B = outputs.get(KL_OUTPUT)
        detached_outputs = {
            k: _detach_output(outputs[k])
            for k in return_keys
            if k in outputs and k != DIAGNOSTICS_OUTPUT
        }
        detached_outputs["preds"] = preds_BS
        result = LossOutput(
            token_loss=token_loss_BS,
            loss_divisor=divisor_B,
            q_halt_loss=q_halt_loss_B,
            q_continue_loss=q_continue_loss_B,
            metrics=metrics,
            outputs=detached_outputs,
            all_halted=new_carry.halted.all(),
            new_carry=new_carry,
            row_metrics=row_metrics,
            internal_token_loss=internal,
            has_halting=self.has_halting,
            kl_loss=kl_B,
            kl_weight=self.kl_weight,
        )
        with torch.no_grad():
            metrics["lm_loss"] = result.normalized_token_loss.sum()
            metrics["q_halt_loss"] = q_halt_loss_B.sum()
            if q_continue_loss_B is not None:
                metrics["q_continue_loss"] = q_continue_loss_B.sum()
            if kl_B is not None:
                metrics["kl_loss"] = kl_B.sum()
                metrics["kl_loss_weighted"] = self.kl_weight * metrics["kl_loss"]
            for i, loss_BS in enumerate(internal or []):
                metrics[f"cycle{i}_lm_loss"] = loss_BS.sum()
        return result


@LOSS_HEADS.register("NoACTLossHead", aliases=LOSS_HEAD_ALIASES["NoACTLossHead"])
class NoACTLossHead(ACTLossHead):
    """The JD fork's head for models without halting (``arch=trmjd`` with ``no_act``).

    As ``ACTLossHead`` (final logits = the last per-cycle logits), except that nothing is
    learnt about halting: ``q_halt_loss`` is zeros [B] without grad, ``q_continue_loss`` None,
    no ``q_halt_accuracy`` metric, ``has_halting`` False. The model must output
    ``cycle_logits`` (``ConfigError`` otherwise), so ``internal_token_loss`` is always filled.
    """

    has_halting: ClassVar[bool] = False

    def _cycle_logits(self, outputs: dict[str, Any]) -> list[Tensor]:
        if "cycle_logits" not in outputs:
            raise ConfigError(
                f"NoACTLossHead needs a model with per-H-cycle logits (outputs['cycle_logits'], "
                f"e.g. arch=trmjd); {type(self.model).__name__} has none: use ACTLossHead"
            )
        return outputs["cycle_logits"]

    def _halting_losses(
        self, outputs: dict[str, Any], seq_is_correct_B: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        return torch.zeros(seq_is_correct_B.shape, device=seq_is_correct_B.device), None
