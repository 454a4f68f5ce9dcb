"""Config schemas of Jacobian-descent training: ``objective=<mode>`` and ``aggregator=<name>``.

Plain pydantic (no torch import), so that configuration stays fast; ``training.jd`` does the
work. See that module's docstring for what the fields mean.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from utils.schema import StrictModel

Axis = Literal["supervision", "cycle", "sample", "pixel"]
AXES: tuple[Axis, ...] = ("supervision", "cycle", "sample", "pixel")


class ObjectiveSpec(StrictModel):
    """How the unreduced losses become objectives (``config/objective/<name>.yaml``).

    ``keep``: axes that index objectives (all others are summed). ``supervisions: stacked`` runs
    ``halt_max_steps`` supervision steps on the same batch inside one optimizer step (each
    step's token losses divided by their number, as the fork). ``internal``: the per-H-cycle
    losses of ``arch=trmjd`` (weighted by ``intermediate_loss_weight``) join the final loss
    (``with_final``) or replace it (``only``). ``method`` picks how the Gramian is computed
    (``auto``: the cheapest exact way, see ``training.jd``). ``gramian``: ``full`` forms it from
    the gradients of every weight (Jacobian descent); ``heads`` from those of the output heads
    ``lm_head``/``q_head`` only (partial Jacobian descent: the weights resolve conflicts seen in
    the heads, each objective costs a backward through the heads alone, and the update is one
    full weighted backward). ``scale``, ``ranks`` and ``include_puzzle_embedding`` choose between
    this project's Jacobian descent (the defaults) and the research fork's (``training.jd``);
    ``max_objectives`` bounds the objectives whose dense Jacobian is held.
    """

    name: str = Field(
        "sum", description="the spec's name (config/objective/<name>.yaml), used in messages"
    )
    keep: list[Axis] = Field(
        default_factory=list,
        description="axes that index objectives (supervision, cycle, sample, pixel); the rest "
        "are summed",
    )
    halt: Literal["in", "spread", "out", "separate", "drop"] = Field(
        "in",
        description="halting loss: in (spread evenly over its sample's objectives), spread (the "
        "batch's summed halting loss spread evenly over every token objective of its step, the "
        "fork's iwrm_pixelwise_q_halt_in), out (one objective per sample), separate (one "
        "objective), drop (not trained)",
    )
    groups: int | None = Field(None, ge=1, description="random grouping into k objectives")
    supervisions: Literal["one", "stacked"] = Field(
        "one",
        description="one supervision step per optimizer step, or halt_max_steps steps stacked "
        "on the same batch",
    )
    internal: Literal["none", "with_final", "only"] = Field(
        "none",
        description="per-H-cycle losses (arch=trmjd): none, added to the final loss "
        "(with_final), or instead of it (only)",
    )
    intermediate_loss_weight: float = Field(
        1e-4, ge=0, description="factor on each per-H-cycle loss (default: the fork's)"
    )
    carry_perturbation_rate: float = Field(
        1e-3, ge=0, description="std of the noise on the latents between stacked steps (the fork's)"
    )
    method: Literal["auto", "rows", "per_sample", "autogram"] = Field(
        "auto",
        description="how the Gramian is computed: auto (the cheapest exact way), rows, "
        "per_sample, autogram",
    )
    gramian: Literal["full", "heads"] = Field(
        "full",
        description="full: from every weight's gradients; heads: from lm_head/q_head only "
        "(partial Jacobian descent)",
    )
    scale: Literal["none", "global_batch"] = Field(
        "none",
        description="none: the weighting sees the unscaled objectives and the update is "
        "m·Jᵀw/D; global_batch (the fork's): every objective is divided by D = global batch × "
        "micro-batches before the weighting and the update is its Jᵀw",
    )
    ranks: Literal["global", "local"] = Field(
        "global",
        description="objectives every rank shares (no sample axis): global aggregates the "
        "Jacobian summed over ranks; local (the fork's) aggregates each rank's own and sums the "
        "updates",
    )
    include_puzzle_embedding: bool = Field(
        False,
        description="the puzzle-embedding batch rows' gradients join the Gramian (the fork's); "
        "False: they only follow the weights of the weights' Gramian",
    )
    max_objectives: int = Field(
        512,
        ge=1,
        description="most objectives differentiated and held as a dense Jacobian m × n floats; "
        "raise it on a big GPU, or group them (groups=k)",
    )

    @property
    def is_gradient_descent(self) -> bool:
        """The plain summed loss of one supervision step (``objective=sum``): upstream's path."""
        return (
            not self.keep
            and self.halt == "in"
            and self.groups is None
            and self.supervisions == "one"
            and self.internal == "none"
        )

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSpec:
        if len(set(self.keep)) != len(self.keep):
            raise ValueError(f"keep lists an axis twice: {self.keep}")
        if "cycle" in self.keep and self.internal == "none":
            raise ValueError("keeping the 'cycle' axis needs internal: with_final or only")
        if "supervision" in self.keep and self.supervisions != "stacked":
            raise ValueError("keeping the 'supervision' axis needs supervisions: stacked")
        if self.internal == "only" and self.halt in ("out", "separate"):
            raise ValueError("internal: only keeps no final-loss objective for the halting loss")
        if self.method == "per_sample" and (
            "sample" not in self.keep or self.halt in ("separate", "spread")
        ):
            raise ValueError(
                "method: per_sample needs objectives that each belong to one sample (keep the "
                "'sample' axis, halt not 'separate' or 'spread'); use method: auto"
            )
        if self.include_puzzle_embedding and (self.gramian == "heads" or self.method == "autogram"):
            raise ValueError(
                "include_puzzle_embedding: the puzzle-embedding rows join the Gramian only with "
                "method rows, per_sample or auto and gramian: full (heads and autogram form it "
                "without them)"
            )
        if self.method == "autogram" and self.supervisions == "stacked":
            raise ValueError(
                "method: autogram differentiates one supervision step; use method: auto with "
                "stacked supervisions"
            )
        if self.gramian == "heads":
            if self.supervisions == "stacked":
                raise ValueError(
                    "gramian: heads needs supervisions: one (its weighted backward needs every "
                    "step's graph at once); use gramian: full with stacked supervisions"
                )
            if self.method not in ("auto", "rows"):
                raise ValueError(
                    f"gramian: heads differentiates the heads one objective at a time; set "
                    f"method: auto (not '{self.method}')"
                )
        return self


# The fork's 16 modes (``+grad_aggregation=<mode>``), as specs.
MODES: dict[str, dict[str, Any]] = {
    "sum": {},
    "lm_loss_vs_q_halt_loss": {"halt": "separate"},
    "iwrm_with_q_halt_in": {"keep": ["sample"]},
    "iwrm_with_q_halt_out": {"keep": ["sample"], "halt": "out"},
    "pixelwise_q_halt_in": {"keep": ["pixel"]},
    "pixelwise_q_halt_out": {"keep": ["pixel"], "halt": "out"},
    # The fork adds the batch's summed halting loss / (B·P) to every one of the B·P objectives.
    "iwrm_pixelwise_q_halt_in": {"keep": ["sample", "pixel"], "halt": "spread"},
    "iwrm_pixelwise_q_halt_out": {"keep": ["sample", "pixel"], "halt": "out"},
    "stack_internal_losses": {"keep": ["cycle"], "internal": "with_final"},
    "stack_internal_losses_only": {"keep": ["cycle"], "internal": "only"},
    "stack_internal_and_sum": {"internal": "with_final"},
    "stack_supervisions": {"keep": ["supervision"], "supervisions": "stacked", "halt": "drop"},
    "stack_supervisions_and_sum": {"supervisions": "stacked", "halt": "drop"},
    "stack_supervisions_and_iwrm": {
        "keep": ["supervision", "sample"],
        "supervisions": "stacked",
        "halt": "drop",
    },
    "stack_supervisions_and_pixelwise": {
        "keep": ["supervision", "pixel"],
        "supervisions": "stacked",
        "halt": "drop",
    },
    "stack_supervisions_and_iwrm_pixelwise": {
        "keep": ["supervision", "sample", "pixel"],
        "supervisions": "stacked",
        "halt": "drop",
    },
}


# Modes of this project beside the fork's (``objective=<name>`` only, no fork knob).
OWN_MODES: dict[str, dict[str, Any]] = {
    # Each sample's halting loss spread over that sample's P objectives (so every objective
    # belongs to one sample and per-sample Gramians apply).
    "iwrm_pixelwise_own_q_halt_in": {"keep": ["sample", "pixel"]},
}
_ALL_MODES = {**MODES, **OWN_MODES}


def mode_fits(name: str, *, has_cycle_losses: bool, has_halting: bool) -> bool:
    """Whether the mode ``name`` applies to an architecture with these capabilities."""
    spec = _ALL_MODES[name]
    if spec.get("internal", "none") != "none" and not has_cycle_losses:
        return False
    return not (spec.get("halt") in ("out", "separate") and not has_halting)


def mode_spec(name: str, **overrides: Any) -> ObjectiveSpec:
    """The spec of one of the fork's modes (or of ``OWN_MODES``) by name."""
    if name not in _ALL_MODES:
        raise ValueError(f"unknown objective mode '{name}'; choose one of: {', '.join(_ALL_MODES)}")
    return ObjectiveSpec.model_validate({"name": name, **_ALL_MODES[name], **overrides})


# TorchJD aggregators by our name: (class in torchjd.aggregation, kind). Gramian weightings map
# G = J Jᵀ to weights; Jacobian aggregators need J itself (objective method "rows").
AGGREGATOR_CLASSES: dict[str, tuple[str, Literal["gramian", "jacobian"]]] = {
    "upgrad": ("UPGradWeighting", "gramian"),
    "mean": ("MeanWeighting", "gramian"),
    "sum": ("SumWeighting", "gramian"),
    "mgda": ("MGDAWeighting", "gramian"),
    "dualproj": ("DualProjWeighting", "gramian"),
    "pcgrad": ("PCGradWeighting", "gramian"),
    "imtl_g": ("IMTLGWeighting", "gramian"),
    "aligned_mtl": ("AlignedMTLWeighting", "gramian"),
    "cagrad": ("CAGradWeighting", "gramian"),
    "krum": ("KrumWeighting", "gramian"),
    "random": ("RandomWeighting", "gramian"),
    "constant": ("ConstantWeighting", "gramian"),
    "pcd": ("PCDWeighting", "gramian"),
    "fairgrad": ("FairGradWeighting", "gramian"),
    "gradvac": ("GradVacWeighting", "gramian"),
    "config": ("ConFIG", "jacobian"),
    "graddrop": ("GradDrop", "jacobian"),
    "trimmed_mean": ("TrimmedMean", "jacobian"),
    "nash_mtl": ("NashMTL", "jacobian"),
}
_AGGREGATOR_ALIASES = {
    alias.lower(): name
    for name, (cls, _) in AGGREGATOR_CLASSES.items()
    for alias in (cls, cls.removesuffix("Weighting"))
}


class AggregatorConfig(StrictModel):
    """``aggregator=<name>``: a TorchJD aggregator and its constructor's options."""

    name: str = Field(
        "upgrad",
        description="TorchJD aggregator (config/aggregator/<name>.yaml; its class name is an "
        "alias)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the TorchJD class's constructor"
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if isinstance(data, dict) and "name" in data:
            name = str(data["name"])
            key = name if name in AGGREGATOR_CLASSES else _AGGREGATOR_ALIASES.get(name.lower())
            if key is None:
                raise ValueError(
                    f"unknown aggregator '{name}'; choose one of: {', '.join(AGGREGATOR_CLASSES)}"
                )
            data = {**data, "name": key}
        return data

    @property
    def kind(self) -> Literal["gramian", "jacobian"]:
        return AGGREGATOR_CLASSES[self.name][1]


def partial_jd_problem(spec: ObjectiveSpec, aggregator: AggregatorConfig) -> str | None:
    """Why ``gramian: heads`` cannot run with this aggregator, or None when it can."""
    if spec.gramian != "heads" or aggregator.kind == "gramian":
        return None
    return (
        f"objective.gramian: heads forms the weights from the heads' Gramian, but aggregator "
        f"'{aggregator.name}' needs the full Jacobian; use objective.gramian=full or a Gramian "
        "aggregator (upgrad, mean, mgda, dualproj, ...)"
    )


# Command-line knobs of the research fork, folded into ``objective`` by ``fold_fork_knobs``.
FORK_KNOBS = (
    "grad_aggregation",
    "grad_n_groups",
    "intermediate_loss_weight",
    "carry_perturbation_rate",
)


def fold_fork_knobs(data: dict[str, Any]) -> dict[str, Any]:
    """``+grad_aggregation=<mode>`` (and its companions) → the same ``objective`` as
    ``objective=<mode>`` with the matching fields."""
    knobs = {k: data.pop(k) for k in FORK_KNOBS if k in data}
    if not knobs:
        return data
    objective = dict(data.get("objective") or {})
    if "grad_aggregation" in knobs:
        mode = str(knobs.pop("grad_aggregation"))
        if mode not in MODES:
            raise ValueError(
                f"unknown grad_aggregation '{mode}'; choose one of: {', '.join(MODES)}"
            )
        objective = {"name": mode, **MODES[mode]}
    if "grad_n_groups" in knobs:
        objective["groups"] = knobs.pop("grad_n_groups")
    objective.update(knobs)
    return {**data, "objective": objective}
