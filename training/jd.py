"""Jacobian descent: losses split into objectives, aggregated with a TorchJD weighting.

Three independent pieces. The JD fork (mattbuot/TinyRecursiveModelsJD) tied them together: one
``AggregationStrategy`` enum chose the objective vector (``utils/torchjd_utils.py``,
``aggregate_losses``), and ``pretrain.py``'s ``train_batch`` ran a plain backward for one
objective and otherwise TorchJD's autojac ``backward`` with a module-level ``UPGrad()``. Here
each piece is chosen on its own:

* **Objectives.** A declarative ``ObjectiveSpec`` says which axes of the unreduced losses stay
  separate objectives — supervision step (s), H-cycle (c), sample (b), pixel (p) — where the
  halting loss goes (``in``: added to the objectives of its sample, spread evenly over the other
  kept axes; ``spread``: the batch's summed halting loss spread evenly over every token
  objective of its step, the fork's ``iwrm_pixelwise_q_halt_in``, whose objectives then belong
  to no one sample; ``out``: one objective per sample; ``separate``: one extra objective;
  ``drop``),
  and an optional random grouping into k objectives (the same partition on every rank). Every
  objective is a sum over samples, so objectives are held as per-sample contributions
  ``[B, m]``; their column sums are the objectives and their total is the gradient-descent loss.
* **Gramian providers.** With one objective there is no Gramian: a plain backward (the
  gradient-descent baseline, also over stacked steps). Otherwise, chosen by ``method``:
  ``per_sample`` when every objective belongs to one sample (IWRM, also stacked or grouped):
  one ordinary backward per objective *of a sample* yields B rows at once, because the layers
  keep per-sample weight gradients apart (``models.per_sample``), so IWRM costs what gradient
  descent costs; ``rows`` (one ``autograd.grad`` per objective: exact for any spec and cheap
  when objectives live in separate graphs, e.g. stacked supervision steps, each differentiated
  as soon as its forward is done); ``autogram`` (TorchJD's ``Engine``: one instrumented
  backward plus one weighted backward, for models whose parameters the per-sample layers do not
  own). ``gramian: heads`` is partial Jacobian descent: the rows of the output heads' parameters
  only (a backward that stops at the heads), then one weighted backward through the model.
  ``rows`` and ``per_sample`` hold the dense Jacobian m × n, so past ``max_objectives``
  (default 512) they refuse with its size in memory and the fix (``groups=k``, or a higher
  limit on a big device).
* **The puzzle embedding.** Its batch rows (``local_weights`` [B, D]) get each objective's
  gradient too. By default they stay out of the Gramian and follow the weights the weights'
  Gramian gave; ``include_puzzle_embedding`` (the fork, whose autojac differentiated every
  leaf) adds their columns to it. A stacked step's rows are kept apart from the other steps'
  (``EmbeddingRows``): an ACT slot that halts mid-stack reloads another puzzle, and each
  puzzle gets the gradient of the steps that looked it up (the fork summed every step into the
  last ids).
* **Weightings.** Every TorchJD weighting maps the Gramian G = J Jᵀ to weights w; aggregators that
  need the Jacobian itself (ConFIG, GradDrop, TrimmedMean, NashMTL) use a provider that
  materialises J (``rows``, ``per_sample``). The update is ``m · Jᵀ w / D`` (D: the examples of
  the optimizer step, global batch × micro-batches) so that Mean weighting gives exactly the
  gradient-descent gradient (UPGrad without conflicts then equals it too).
* **Ranks.** Per-sample objectives are each rank's own: aggregated locally, the updates summed
  by the ordinary gradient reduction. Objectives every rank shares (no sample axis) are by
  default aggregated on the global Jacobian (J summed over ranks, the same update everywhere);
  ``ranks: local`` is the fork's per-rank aggregation of them.

By default the objectives are not pre-scaled by 1/D before the Gramian. The fork did
(``scale: global_batch`` reproduces it: the weighting sees G/D² and the update is its
(J/D)ᵀw), which pushes trace(G) under TorchJD's normalisation threshold and silently turns
UPGrad into the mean. ``jd/degenerate`` logs that the weighting this run used fell back,
``jd/fork_would_fall_back`` (every run) that the fork's would have (``fork_would_fall_back``).

Kept as one module past 400 lines on purpose: the four Gramian providers (rows, heads,
per_sample, autogram) share ``Layout``, ``JacobianRows`` and the weighting, and read best side by
side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models import per_sample
from training.objectives import (
    AGGREGATOR_CLASSES,
    AXES,
    AggregatorConfig,
    Axis,
    ObjectiveSpec,
    partial_jd_problem,
)
from utils.schema import ConfigError

NORM_EPS = 1e-4  # TorchJD's QuadprogProjector threshold on trace(G)


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Sizes of the atom axes and of the kept axes; objectives are numbered row-major over the
    kept axes in the order supervision, cycle, sample, pixel, then halting objectives."""

    spec: ObjectiveSpec
    S: int  # supervision steps in this optimizer step
    C: int  # loss families per step: 1, or the final loss + H internal losses, or H internal
    B: int
    P: int
    has_halt: bool

    def kept(self, axis: Axis) -> int:
        size = {"supervision": self.S, "cycle": self.C, "sample": self.B, "pixel": self.P}[axis]
        return size if axis in self.spec.keep else 1

    @property
    def m_tokens(self) -> int:
        return math.prod(self.kept(a) for a in AXES)

    @property
    def m_halt(self) -> int:
        if not self.has_halt or self.spec.halt in ("in", "spread", "drop"):
            return 0
        return 1 if self.spec.halt == "separate" else self.kept("supervision") * self.B

    @property
    def m(self) -> int:
        return self.m_tokens + self.m_halt

    def token_index(self, s: int, device: torch.device | None) -> Tensor:
        """[B, C', P'] objective index of each (sample, family, pixel) atom of step ``s``."""
        _, Ck, Bk, Pk = (self.kept(a) for a in AXES)
        s_idx = s if "supervision" in self.spec.keep else 0
        c = torch.arange(Ck, device=device).view(1, Ck, 1)
        b = (
            torch.arange(self.B, device=device)
            if Bk > 1
            else torch.zeros(self.B, dtype=torch.long, device=device)
        ).view(-1, 1, 1)
        p = torch.arange(Pk, device=device).view(1, 1, Pk)
        return ((s_idx * Ck + c) * Bk + b) * Pk + p

    def halt_index(self, s: int, device: torch.device | None) -> Tensor:
        """[B] objective index of each sample's halting objective at step ``s`` (halt: out)."""
        s_idx = s if "supervision" in self.spec.keep else 0
        return self.m_tokens + s_idx * self.B + torch.arange(self.B, device=device)

    def owned(self, s: int, device: torch.device | None) -> Tensor | None:
        """[B, g]: the objectives of step ``s`` that belong to each sample (its token
        objectives, then its halting objective), when every objective belongs to one sample:
        the sample axis is kept and the halting loss is neither one shared objective nor spread
        over every sample's objectives. Else None."""
        shared_halt = self.has_halt and self.spec.halt in ("separate", "spread")
        if "sample" not in self.spec.keep or shared_halt:
            return None
        index = self.token_index(s, device).reshape(self.B, -1)
        if self.m_halt:
            index = torch.cat([index, self.halt_index(s, device)[:, None]], dim=1)
        return index

    def halt_targets(self, s: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """[B, m_tokens] weights spreading a sample's halting loss over its token objectives."""
        index = self.token_index(s, device).reshape(self.B, -1)
        spread = torch.zeros(self.B, self.m_tokens, device=device, dtype=dtype)
        spread.scatter_(1, index, 1.0)
        if self.spec.halt == "spread":
            # Every token objective of the step, whichever sample it belongs to.
            spread = spread.amax(0, keepdim=True).expand_as(spread)
        return spread / spread.sum(1, keepdim=True)


def step_contributions(
    layout: Layout,
    s: int,
    token_loss_BP: Tensor,
    halt_loss_B: Tensor | None,
    internal_BP: Sequence[Tensor] | None,
) -> Tensor:
    """Per-sample contributions [B, m] of supervision step ``s`` to every objective.

    ``token_loss_BP``: the per-token loss divided by each sequence's label count; ``halt_loss_B``:
    0.5·(BCE of the halting heads); ``internal_BP``: the H per-cycle losses (trmjd).
    """
    spec = layout.spec
    families = []
    if spec.internal != "only":
        families.append(token_loss_BP / layout.S)
    if spec.internal != "none":
        if internal_BP is None:
            raise ConfigError(f"objective '{spec.name}' needs per-cycle losses: use arch=trmjd")
        families.extend(spec.intermediate_loss_weight * t / layout.S for t in internal_BP)
    x = torch.stack(families, dim=1)  # [B, C, P]
    if "cycle" not in spec.keep:
        x = x.sum(1, keepdim=True)
    if "pixel" not in spec.keep:
        x = x.sum(2, keepdim=True)
    index = layout.token_index(s, x.device).expand(layout.B, x.shape[1], x.shape[2])
    out = torch.zeros(layout.B, layout.m, dtype=x.dtype, device=x.device)
    out = out.scatter_add(1, index.reshape(layout.B, -1), x.reshape(layout.B, -1))
    if halt_loss_B is None or spec.halt == "drop":
        return out
    halt = halt_loss_B.to(out.dtype)
    if spec.halt in ("in", "spread"):
        spread = layout.halt_targets(s, out.device, out.dtype)
        return out + torch.nn.functional.pad(halt[:, None] * spread, (0, layout.m_halt))
    extra = torch.zeros_like(out)
    if spec.halt == "separate":
        extra[:, layout.m_tokens] = 1.0
    else:  # out: one objective per sample (and per step when steps are kept)
        rows = torch.arange(layout.B, device=out.device)
        extra[rows, layout.halt_index(s, out.device)] = 1.0
    return out + halt[:, None] * extra


def grouping_matrix(
    m: int, k: int | None, seed: int, step: int, device: torch.device | None
) -> Tensor | None:
    """[m, k] 0/1 matrix putting the m objectives into k random groups of (nearly) equal size.

    Seeded by (seed, step) only, so every rank draws the same partition; a new one each step.
    """
    if k is None or k >= m:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    perm = torch.randperm(m, generator=g)
    group = torch.empty(m, dtype=torch.long)
    group[perm] = torch.arange(m) % k
    return torch.nn.functional.one_hot(group, k).to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Weightings
# ----------------------------------------------------------------------------------------------
def build_aggregator(config: AggregatorConfig, m: int) -> Any:
    """The TorchJD weighting or aggregator named by ``config`` (``m`` objectives)."""
    from torchjd import aggregation

    options = dict(config.options)
    if config.name == "constant" and "weights" in options:
        options["weights"] = torch.as_tensor(options["weights"], dtype=torch.float32)
    if config.name == "nash_mtl":
        options.setdefault("n_tasks", m)
    if config.name in ("upgrad", "dualproj"):
        options["projector"] = dual_cone_projector(options.get("projector", "screened"))
    cls = getattr(aggregation, AGGREGATOR_CLASSES[config.name][0])
    try:
        return cls(**options)
    except ImportError as e:
        raise ConfigError(
            f"aggregator '{config.name}' needs an optional TorchJD extra ({e}); "
            "pip install 'torchjd[full]'"
        ) from None
    except TypeError as e:
        raise ConfigError(f"aggregator '{config.name}': bad options {options} ({e})") from None


def dual_cone_projector(name: Any) -> Any:
    """UPGrad's and DualProj's projector by name: ``screened`` (``ScreenedProjector``, the
    default) or ``quadprog`` (TorchJD's ``QuadprogProjector``: every QP solved)."""
    from torchjd.linalg import QuadprogProjector

    if not isinstance(name, str):
        return name
    if name == "screened":
        return ScreenedProjector()
    if name == "quadprog":
        return QuadprogProjector()
    raise ConfigError(f"aggregator options.projector: '{name}'; choose screened or quadprog")


class ScreenedProjector:
    """TorchJD's quadprog dual-cone projection (``torchjd.linalg.QuadprogProjector``, same
    ``norm_eps``/``reg_eps`` and solver), skipping the QPs whose solution is their start.

    For each preference row u of ``U`` [k, m] the projection's weights solve
    min_v vᵀG̃v s.t. v ≥ u, with G̃ = G/trace(G) + reg_eps·I (G̃ = reg_eps·I when
    trace(G) < norm_eps). Its KKT conditions, 2G̃v = λ ≥ 0 with λ ⊙ (v − u) = 0, hold at v = u
    exactly when G̃u ≥ 0, so those rows need no solver: for UPGrad's u = eᵢ/m that is every
    objective whose gradient conflicts with no other (column i of G non-negative). The others
    go to quadprog, one QP each as in TorchJD. Without conflicts a 512-objective weighting then
    costs one matrix product instead of 512 QPs (``benchmarks.jd_overhead --weighting-only``).
    Returns W [k, m] on G's device and dtype.
    """

    def __init__(self, *, norm_eps: float = NORM_EPS, reg_eps: float = 1e-4) -> None:
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        import numpy as np
        from qpsolvers import solve_qp

        trace = G.diagonal().sum()
        normed = torch.zeros_like(G) if float(trace) < self.norm_eps else G / trace
        m = G.shape[0]
        G_np = (normed + self.reg_eps * torch.eye(m, dtype=G.dtype, device=G.device)).detach()
        G_np = G_np.cpu().numpy().astype(np.float64)
        U_np = U.detach().cpu().numpy().astype(np.float64).reshape(-1, m)
        W = U_np.copy()
        for r in np.nonzero((U_np @ G_np < 0).any(axis=1))[0]:
            w = solve_qp(G_np, np.zeros(m), -np.eye(m), -U_np[r], solver="quadprog")
            if w is None:
                raise ValueError("Failed to solve the quadratic programming problem.")
            W[r] = w
        return torch.as_tensor(W.reshape(U.shape), device=G.device, dtype=G.dtype)

    def __repr__(self) -> str:
        return f"ScreenedProjector(norm_eps={self.norm_eps}, reg_eps={self.reg_eps})"


# ----------------------------------------------------------------------------------------------
# Metrics from G and w
# ----------------------------------------------------------------------------------------------
def gramian_metrics(G: Tensor, w: Tensor, tol: float = 1e-6) -> dict[str, float]:
    """Conflict and agreement measures of the update Jᵀw against the mean gradient, from G only."""
    G = G.double()
    w = w.double()
    m = G.shape[0]
    ones = torch.full((m,), 1.0 / m, dtype=torch.float64, device=G.device)
    Gw, G1 = G @ w, G @ ones
    upd_sq, mean_sq = float(w @ Gw), float(ones @ G1)
    diag = G.diagonal().clamp_min(1e-30)
    cos_pairs = G / torch.sqrt(diag[:, None] * diag[None, :])
    off = ~torch.eye(m, dtype=torch.bool, device=G.device)
    wn = w.clamp_min(0) / w.clamp_min(0).sum().clamp_min(1e-30)
    entropy = float(-(wn * torch.log(wn.clamp_min(1e-30))).sum())
    out = {
        "num_objectives": float(m),
        "gramian_trace": float(G.trace()),
        "degenerate": float(G.trace() < NORM_EPS),
        "cos_to_mean": float(w @ G1) / math.sqrt(max(upd_sq * mean_sq, 1e-60)),
        "norm_ratio_to_mean": math.sqrt(max(upd_sq, 0.0) / max(mean_sq, 1e-60)),
        "mean_increases": float((-tol * G.trace() / m > G1).sum()),
        "update_conflicts": float((Gw < -tol * G.trace() / m).sum()),
        "weight_min": float(w.min()),
        "weight_max": float(w.max()),
        "weight_entropy": entropy / math.log(m) if m > 1 else 0.0,
    }
    if m > 1:
        out["conflict_rate"] = float((G[off] < 0).double().mean())
        out["min_pairwise_cos"] = float(cos_pairs[off].min())
    return out


# ----------------------------------------------------------------------------------------------
# Gramian providers
# ----------------------------------------------------------------------------------------------
@dataclass
class JDResult:
    """What one Jacobian-descent step did (metrics under ``jd/``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    reduced_across_ranks: bool = False  # True: .grad is already the global update


@dataclass
class EmbeddingRows:
    """The puzzle embedding's batch rows and the identifiers each supervision step looked up.

    ``weights``: the ``local_weights`` leaf [B, D] of a ``CastedSparseEmbedding``; ``ids``: its
    ``local_ids`` buffer [B]. Between stacked steps an ACT slot that halts reloads another
    puzzle, so one optimizer step's rows belong to different puzzles at different steps. The
    step generator appends ``ids.clone()`` to ``seen`` after each forward; the providers keep
    each step's row gradients apart, and ``JacobianDescent.step`` writes them step by step,
    calling ``keep()`` (which sets the current ids and row gradients aside for the sparse
    optimizer, ``training.optimizers.keep_micro_batch_gradients``) before each later step's.
    """

    weights: Tensor
    ids: Tensor
    keep: Callable[[], None]
    seen: list[Tensor] = field(default_factory=list)


@dataclass
class _Gramian:
    """A provider's result: G [m, m]; the dense Jacobian J [m, n] when it was materialised (for
    Jacobian aggregators); ``apply(w, update)`` adds the gradient of Σ_i w_i·objective_i of
    the dense parameters, with the aggregator's own dense ``update`` in place of Jᵀw when there
    is one, to ``.grad`` and returns the embedding rows' share, one flat [B·d] tensor per
    supervision step (empty when a weighted backward wrote it). The caller has already scaled
    w and the update."""

    G: Tensor
    J: Tensor | None
    apply: Callable[[Tensor, Tensor | None], list[Tensor]]
    reduced_across_ranks: bool = False


def _flat_grads(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _assign_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad + g
        offset += n


def _batch_rows(grads: Sequence[Tensor | None], extra: Sequence[Tensor]) -> Tensor:
    """[B, d]: the gradients of the batch-row tensors ``extra`` (each [B, ...]) side by side."""
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(x)).reshape(x.shape[0], -1).float()
            for g, x in zip(grads, extra, strict=True)
        ],
        dim=1,
    )


def embedding_gramian(X: Sequence[Tensor], seen: Sequence[Tensor] | None) -> Tensor:
    """[m, m]: the Gramian of the puzzle-embedding columns.

    ``X[s]`` [m, B, d] holds the objectives' gradients on the batch rows at supervision step
    s; ``seen[s]`` [B] the puzzle ids those rows held (None: the same ids at every step). A
    slot that keeps its puzzle across steps differentiates one parameter, so its steps' columns
    are summed; after a reload they are another puzzle's, a column of their own.
    """
    m, B = X[0].shape[:2]
    merged = torch.zeros(len(X), m, B, X[0].shape[2], dtype=X[0].dtype, device=X[0].device)
    slots = torch.arange(B, device=X[0].device)
    for s, X_s in enumerate(X):
        if seen is None:
            first = torch.zeros(B, dtype=torch.long, device=X_s.device)
        else:
            earlier = torch.stack([seen[t].to(X_s.device) for t in range(s + 1)])  # [s+1, B]
            # The first step at which this slot looked up the same puzzle.
            first = (earlier == earlier[-1]).int().argmax(0)
        merged[first, :, slots] += X_s.permute(1, 0, 2)
    flat = merged.permute(1, 0, 2, 3).reshape(m, -1)
    return flat @ flat.T


def _embedding_steps(w: Tensor, X: Sequence[Tensor]) -> list[Tensor]:
    """Σ_i w_i·X[s][i] flattened, for each step s: the weighted gradient of each step's rows."""
    return [torch.einsum("i,ibd->bd", w.to(X_s.dtype), X_s).reshape(-1) for X_s in X]


class JacobianRows:
    """Accumulates the Jacobian [m, n] of the objectives, one step's contributions at a time.

    ``add(contrib)`` differentiates every objective that step touched right away, so a step's
    graph is freed before the next step runs (stacked supervision steps cost one step's
    activations, not S) unless ``keep_graph``. ``J`` holds the columns of ``params``; ``X``
    one [m, B, d] block per step for ``extra`` (the puzzle embedding's batch rows, [B, ...]
    each), kept per step because a slot may look up another puzzle at the next one.
    """

    def __init__(self, params: Sequence[Tensor], extra: Sequence[Tensor], m: int) -> None:
        self.params = list(params)
        self.extra = list(extra)
        self.m = m
        n = sum(p.numel() for p in self.params)
        self.J = torch.zeros(m, n, dtype=torch.float32, device=self.params[0].device)
        self.X: list[Tensor] = []

    def add(self, contrib_Bm: Tensor, keep_graph: bool = False) -> None:
        objectives = contrib_Bm.sum(0)
        # Objectives this step does not touch have exactly zero contributions (and gradient).
        touched = (contrib_Bm.detach() != 0).any(0).nonzero().flatten().tolist()
        X = None
        if self.extra:
            d = sum(x[0].numel() for x in self.extra)
            X = self.J.new_zeros(self.m, self.extra[0].shape[0], d)
            self.X.append(X)
        inputs = self.params + self.extra
        for n, i in enumerate(touched):
            grads = torch.autograd.grad(
                objectives[i],
                inputs,
                retain_graph=keep_graph or n < len(touched) - 1,
                allow_unused=True,
            )
            self.J[i] += _flat_grads(grads[: len(self.params)], self.params).float()
            if X is not None:
                X[i] = _batch_rows(grads[len(self.params) :], self.extra)


def weights_from(
    G: Tensor, aggregator: Any, kind: str, J: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """(weights [m], direct update [n] or None) for a Gramian or a Jacobian aggregator."""
    if kind == "gramian":
        return aggregator(G.to(torch.float32)).to(G.dtype), None
    if J is None:
        raise ConfigError(
            "this aggregator needs the Jacobian: use objective method 'rows' or 'per_sample'"
        )
    update = aggregator(J)
    # Least-squares weights of the update in the row space, for the metrics only.
    w = torch.linalg.lstsq(J.T.double(), update.double().unsqueeze(1)).solution.squeeze(1)
    return w.to(G.dtype), update


def fork_would_fall_back(G: Tensor, divisor: float) -> bool:
    """Whether the research fork's UPGrad would have returned the plain mean on this Gramian.

    The fork differentiated every objective divided by D = ``divisor`` (global batch ×
    micro-batches), so its UPGrad saw G/D² for our unscaled G [m, m]. TorchJD's
    ``QuadprogProjector`` (UPGrad's default; norm_eps = 1e-4 in 0.7 and 0.18 alike) divides G
    by its trace unless trace < norm_eps, strictly; then the normalised Gramian is 0, the
    regularised QP is min vᵀ(reg_eps·I)v subject to v ≥ u, whose solution is u itself, and
    the weights are the preference vector (1/m each): the mean. So: trace(G)/D² < 1e-4.
    G is the Gramian this run aggregates: for objectives every rank shares under
    ``ranks: global`` the global one, where the fork saw each rank's own (``ranks: local``).
    """
    return float(G.double().trace()) / float(divisor) ** 2 < NORM_EPS


def head_parameters(model: nn.Module) -> list[Tensor]:
    """The trainable parameters of the output heads (modules named ``lm_head`` or ``q_head``)."""
    return [
        p
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("lm_head", "q_head")
        for p in module.parameters()
        if p.requires_grad
    ]


def too_many_objectives(spec: ObjectiveSpec, m: int, n: int) -> str | None:
    """Why ``m`` ungrouped objectives over ``n`` parameters exceed ``spec.max_objectives``,
    or None when they fit."""
    if m <= spec.max_objectives:
        return None
    gib = m * n * 4 / 2**30
    return (
        f"objective '{spec.name}' has {m} objectives here, above objective.max_objectives="
        f"{spec.max_objectives}: their dense Jacobian holds m × n floats ({m} × "
        f"{n / 1e6:.1f}M parameters × 4 B = {gib:.1f} GiB) and each objective costs a backward; "
        "group them with objective.groups=k (the fork's +grad_n_groups=k), or raise "
        "objective.max_objectives on a device with that memory"
    )


class JacobianDescent:
    """One run's Jacobian-descent machinery: spec, aggregator and (lazily) the autogram engine.

    ``step`` turns one optimizer step's per-step contributions into ``.grad``. ``model`` is the
    module whose parameters are trained (the loss head).
    """

    def __init__(
        self,
        spec: ObjectiveSpec,
        aggregator: AggregatorConfig,
        model: nn.Module,
        seed: int,
    ) -> None:
        self.spec = spec
        self.aggregator_config = aggregator
        self.model = model
        self.seed = seed
        self._engine: Any = None
        uncollected = list(per_sample.uncollected_parameters(model))
        self.per_sample_ready = not uncollected
        if spec.method == "per_sample" and uncollected:
            raise ConfigError(
                f"objective.method per_sample: parameters {uncollected[:3]} are not owned by a "
                "CastedLinear or CastedEmbedding, so they get no per-sample gradient; use "
                "method auto, rows or autogram"
            )
        problem = partial_jd_problem(spec, aggregator)
        if problem is not None:
            raise ConfigError(problem)
        if spec.include_puzzle_embedding and aggregator.kind != "gramian":
            raise ConfigError(
                f"objective.include_puzzle_embedding: aggregator '{aggregator.name}' needs the "
                "Jacobian itself, which holds the weights' columns only; use a Gramian "
                "aggregator (upgrad, mean, mgda, ...) or include_puzzle_embedding=False"
            )
        self.heads = head_parameters(model) if spec.gramian == "heads" else []
        if spec.gramian == "heads" and not self.heads:
            raise ConfigError("objective.gramian heads: the model has no lm_head or q_head")

    def method(self, layout: Layout) -> str:
        """The cheapest exact provider for this spec (unless the spec names one).

        ``per_sample`` whenever every objective belongs to one sample (IWRM and its stacked
        forms): one backward per objective of a sample, as cheap as gradient descent for IWRM.
        ``rows`` otherwise: one backward per objective. ``autogram`` (TorchJD's engine) is the
        per-sample fallback for models with parameters outside the collecting layers.
        """
        if self.spec.gramian == "heads":
            return "heads"
        if self.spec.method != "auto":
            return self.spec.method
        owned = layout.owned(0, None) is not None
        if owned and self.per_sample_ready and layout.m <= self.spec.max_objectives:
            return "per_sample"
        gramian = self.aggregator_config.kind == "gramian"
        single = layout.S == 1 and self.spec.groups is None
        if owned and gramian and single and not self.spec.include_puzzle_embedding:
            return "autogram"
        return "rows"

    def engine(self) -> Any:
        if self._engine is None:
            from torchjd.autogram import Engine

            modules = [
                m for m in self.model.modules() if any(p.requires_grad for p in m.parameters(False))
            ]
            # Created once: the engine hooks the modules for the rest of the run.
            self._engine = Engine(*modules, batch_dim=0)
        return self._engine

    def step(
        self,
        *,
        steps: Iterable[Tensor],
        layout: Layout,
        params: Sequence[Tensor],
        extra_params: Sequence[Tensor],
        global_batch_size: int,
        step_index: int,
        all_reduce: Callable[[Tensor], Tensor],
        embedding: EmbeddingRows | None = None,
    ) -> JDResult:
        """Aggregate and write ``.grad``. ``steps`` yields each supervision step's per-sample
        contributions [B, m] (lazily: the providers differentiate each before the next).

        ``global_batch_size`` is D, the examples of the optimizer step (global batch ×
        micro-batches). ``extra_params``: batch-row tensors [B, ...] (the puzzle embedding's
        rows), or ``embedding`` to write each stacked step's rows with the ids it looked up.
        """
        t0 = time.perf_counter()
        spec = self.spec
        method = self.method(layout)
        extra = [embedding.weights] if embedding is not None else list(extra_params)
        seen = embedding.seen if embedding is not None else None
        grouping = grouping_matrix(layout.m, spec.groups, self.seed, step_index, None)
        m = layout.m if grouping is None else grouping.shape[1]
        aggregator, kind = build_aggregator(self.aggregator_config, m), self.aggregator_config.kind
        # Objectives every rank shares (no sample axis) are aggregated on the global Jacobian,
        # unless ranks: local (the fork: each rank its own, the updates summed by the ordinary
        # gradient reduction).
        shared = "sample" not in spec.keep and spec.ranks == "global"
        include = spec.include_puzzle_embedding
        if method == "rows":
            gram = _rows(steps, layout, params, extra, grouping, shared, all_reduce, include, seen)
        elif method == "per_sample":
            gram = _per_sample(steps, layout, params, extra, grouping, include, seen)
        elif method == "heads":
            gram = _heads(steps, layout, self.heads, grouping, shared, all_reduce)
        elif method == "autogram":
            if kind != "gramian":
                raise ConfigError(f"aggregator '{self.aggregator_config.name}' needs method rows")
            gram = _autogram(steps, layout, self.engine(), grouping)
        else:
            raise ConfigError(f"unknown Jacobian method '{method}'")
        t1 = time.perf_counter()
        D = float(global_batch_size)
        if spec.scale == "global_batch":
            # The fork's: the weighting sees the rows g_i/D, and the update is its (J/D)ᵀw.
            G_seen, J_seen = gram.G / D**2, None if gram.J is None else gram.J / D
            w_factor, update_factor = 1.0 / D, 1.0
        else:
            # Unscaled rows; m·Jᵀw/D makes Mean weighting the gradient-descent gradient.
            G_seen, J_seen = gram.G, gram.J
            w_factor = update_factor = m / D
        w, update = weights_from(G_seen, aggregator, kind, J_seen)
        t2 = time.perf_counter()
        rows = gram.apply(
            w_factor * w.to(torch.float32), None if update is None else update_factor * update
        )
        if rows and embedding is not None:
            _write_rows_by_step(embedding, rows)
        elif rows:
            _assign_flat(extra, torch.stack(rows).sum(0))
        t3 = time.perf_counter()
        # The metrics are those of the Gramian the weighting saw (jd/degenerate: it fell back).
        metrics = {f"jd/{k}": v for k, v in gramian_metrics(G_seen, w).items()}
        metrics["jd/fork_would_fall_back"] = float(fork_would_fall_back(gram.G, D))
        timings = {"gramian": t1 - t0, "weighting": t2 - t1, "backward": t3 - t2}
        metrics.update({f"jd/seconds_{k}": v for k, v in timings.items()})
        return JDResult(metrics=metrics, reduced_across_ranks=gram.reduced_across_ranks)


def _write_rows_by_step(embedding: EmbeddingRows, rows: Sequence[Tensor]) -> None:
    """Each step's row gradients on the ids that step looked up: the earlier steps' set aside
    by ``keep`` (as micro-batches are), the last one's left in ``.grad`` with its ids."""
    if len(embedding.seen) != len(rows):
        raise RuntimeError(
            f"EmbeddingRows.seen holds {len(embedding.seen)} steps' ids for {len(rows)} steps"
        )
    for s, (ids, flat) in enumerate(zip(embedding.seen, rows, strict=True)):
        if s:
            embedding.keep()
        embedding.ids.copy_(ids)
        _assign_flat([embedding.weights], flat)


def _grouped(c_Bm: Tensor, grouping: Tensor | None) -> Tensor:
    return c_Bm if grouping is None else c_Bm @ grouping.to(device=c_Bm.device, dtype=c_Bm.dtype)


def _rows(
    steps: Iterable[Tensor],
    layout: Layout,
    params: Sequence[Tensor],
    extra: Sequence[Tensor],
    grouping: Tensor | None,
    shared: bool,
    all_reduce: Callable[[Tensor], Tensor],
    include: bool = False,
    seen: Sequence[Tensor] | None = None,
) -> _Gramian:
    """One ``autograd.grad`` per objective, each step's as soon as it has run. With
    ``include`` the embedding rows' columns join the Gramian (``embedding_gramian``)."""
    m = layout.m if grouping is None else grouping.shape[1]
    problem = too_many_objectives(layout.spec, m, sum(p.numel() for p in params))
    if problem is not None:
        raise ConfigError(problem)
    rows = JacobianRows(params, extra, m)
    for c in steps:
        rows.add(_grouped(c, grouping))
    J_dense = rows.J
    if shared:
        # Sum the objectives' gradients over ranks, so that every rank aggregates the same
        # global Jacobian and applies the same update.
        all_reduce(J_dense)
    G = J_dense @ J_dense.T
    if include and rows.X:
        G_emb = embedding_gramian(rows.X, seen)
        if shared:
            # Each rank's rows are other puzzles' columns: the global Gramian adds their blocks.
            all_reduce(G_emb)
        G = G + G_emb

    def apply(w: Tensor, update: Tensor | None) -> list[Tensor]:
        _assign_flat(rows.params, update if update is not None else J_dense.T @ w)
        return _embedding_steps(w, rows.X)

    return _Gramian(G, J_dense, apply, reduced_across_ranks=shared)


def _heads(
    steps: Iterable[Tensor],
    layout: Layout,
    heads: Sequence[Tensor],
    grouping: Tensor | None,
    shared: bool,
    all_reduce: Callable[[Tensor], Tensor],
) -> _Gramian:
    """Partial Jacobian descent: rows of the heads' parameters only (each backward stops at the
    heads), then one weighted backward through the whole model. Shared objectives reduce their
    head rows across ranks, so every rank computes the same weights; the weighted gradient is
    then reduced as in gradient descent."""
    (c,) = list(steps)  # one supervision step (the spec forbids stacked ones)
    c = _grouped(c, grouping)
    rows = JacobianRows(heads, [], c.shape[1])
    rows.add(c, keep_graph=True)
    J = rows.J
    if shared:
        all_reduce(J)

    def apply(w: Tensor, update: Tensor | None) -> list[Tensor]:
        assert update is None  # Gramian weightings only (checked at construction)
        (c.sum(0) * w.to(c.dtype)).sum().backward()
        return []

    return _Gramian(J @ J.T, None, apply)


def _per_sample(
    steps: Iterable[Tensor],
    layout: Layout,
    params: Sequence[Tensor],
    extra: Sequence[Tensor],
    grouping: Tensor | None,
    include: bool = False,
    seen: Sequence[Tensor] | None = None,
) -> _Gramian:
    """Objectives that each belong to one sample (``Layout.owned``): every backward yields the
    rows of B objectives at once (``models.per_sample``), so IWRM costs one backward.

    The per-sample rows J_fine [m_fine, n] are grouped algebraically (J = Aᵀ J_fine). The
    puzzle-embedding batch rows (``extra``: tensors [B, ...] whose row b only sample b uses)
    give each objective a gradient on its owner's row, kept per step as E_s [m_fine, row
    size]; they follow the weights as in the other providers, and with ``include`` join the
    Gramian (Aᵀ G_emb,fine A).
    """
    B, m_fine = layout.B, layout.m
    device = params[0].device
    problem = too_many_objectives(layout.spec, m_fine, sum(p.numel() for p in params))
    if problem is not None:
        raise ConfigError(problem)
    J_fine = torch.zeros(m_fine, sum(p.numel() for p in params), device=device)
    row_sizes = [x[0].numel() for x in extra]
    E_steps: list[Tensor] = []
    owner = torch.zeros(m_fine, dtype=torch.long, device=device)
    samples = torch.arange(B, device=device)
    # Gradients already there (accumulation) are set aside: every .grad seen below must come
    # from these backwards, and a parameter that an op used outside the collector shows up.
    stashed = [(p, p.grad) for p in [*params, *extra]]
    for p, _ in stashed:
        p.grad = None
    sink = per_sample.PerSampleGradients(params, B)
    with sink:  # the forwards run while the step generator is iterated
        for s, c in enumerate(steps):
            owned = layout.owned(s, device)
            assert owned is not None  # JacobianDescent.method checks it
            own_c = c.gather(1, owned.to(c.device))  # [B, g]: column r, one objective per sample
            E = torch.zeros(m_fine, sum(row_sizes), device=device)
            if extra:
                E_steps.append(E)
            for r in range(own_c.shape[1]):
                owner[owned[:, r]] = samples
                if not own_c.requires_grad:
                    continue
                sink.zero_()
                own_c[:, r].sum().backward(retain_graph=r < own_c.shape[1] - 1)
                J_fine.index_add_(0, owned[:, r], sink.flat())
                if extra:
                    E.index_add_(0, owned[:, r], _batch_rows([x.grad for x in extra], extra))
                    for x in extra:
                        x.grad = None
    leaked = [tuple(p.shape) for p in params if p.grad is not None]
    for p, g in stashed:
        p.grad = g
    if leaked:
        raise ConfigError(
            f"objective.method per_sample: parameters of shapes {leaked[:3]} got a summed "
            "gradient (an op used them outside CastedLinear/CastedEmbedding); use method rows"
        )
    A = None if grouping is None else grouping.to(device=device, dtype=J_fine.dtype)
    J = J_fine if A is None else A.T @ J_fine
    G = J @ J.T
    if include and E_steps:
        X = []
        for E in E_steps:
            X_s = E.new_zeros(m_fine, B, E.shape[1])
            X_s[torch.arange(m_fine, device=device), owner] = E
            X.append(X_s)
        G_emb = embedding_gramian(X, seen)
        G = G + (G_emb if A is None else A.T @ G_emb @ A)

    def apply(w: Tensor, update: Tensor | None) -> list[Tensor]:
        w_fine = w if A is None else A @ w
        _assign_flat(params, update if update is not None else J_fine.T @ w_fine)
        # Each objective's embedding-row gradient lands on its owner's row, weighted.
        return [
            torch.zeros(B, E.shape[1], device=device)
            .index_add_(0, owner, w_fine[:, None] * E)
            .reshape(-1)
            for E in E_steps
        ]

    return _Gramian(G, J, apply)


def _autogram(
    steps: Iterable[Tensor], layout: Layout, engine: Any, grouping: Tensor | None
) -> _Gramian:
    """TorchJD's autogram engine: the Gramian of per-sample outputs in one instrumented
    backward (hooks installed before the forward), then one weighted backward."""
    (c,) = list(steps)
    c = _grouped(c, grouping)
    output, back = _per_sample_output(c, layout, grouped=grouping is not None)
    G = back(engine.compute_gramian(output))

    def apply(w: Tensor, update: Tensor | None) -> list[Tensor]:
        assert update is None  # Gramian weightings only (checked by the caller)
        c.backward(w.to(c.dtype).expand_as(c))
        return []

    return _Gramian(G, None, apply)


def _per_sample_output(
    c_Bm: Tensor, layout: Layout, grouped: bool
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The tensor whose Gramian autogram computes, and the map from its Gramian to G [m, m].

    When every objective belongs to one sample (sample axis kept, no halting objective shared,
    no grouping), the output is the [B] or [B, g] arrangement of the objectives themselves.
    Otherwise every sample may contribute to every objective: the output is [B, m] and
    G = Σ_{b, b'} G_fine[(b, ·), (b', ·)].
    """
    B, m = c_Bm.shape
    owned = None if grouped else layout.owned(0, c_Bm.device)
    if owned is not None:
        output = c_Bm.gather(1, owned)
        order = owned.reshape(-1)

        def back(G_fine: Tensor) -> Tensor:
            G = torch.zeros(m, m, dtype=G_fine.dtype, device=G_fine.device)
            G[order[:, None], order[None, :]] = G_fine
            return G

        return (output.squeeze(1) if output.shape[1] == 1 else output), back

    def contract(G_fine: Tensor) -> Tensor:
        return G_fine.view(B, m, B, m).sum(dim=(0, 2))

    return c_Bm, contract
