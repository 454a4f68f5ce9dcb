"""Jacobian descent: losses split into objectives, aggregated with a TorchJD weighting.

Three independent pieces. The JD fork (mattbuot/TinyRecursiveModelsJD) tied them together: one
``AggregationStrategy`` enum chose the objective vector (``utils/torchjd_utils.py``,
``aggregate_losses``), and ``pretrain.py``'s ``train_batch`` ran a plain backward for one
objective and otherwise TorchJD's autojac ``backward`` with a module-level ``UPGrad()``. Here
each piece is chosen on its own:

* **Objectives.** A declarative ``ObjectiveSpec`` says which axes of the unreduced losses stay
  separate objectives — supervision step (s), H-cycle (c), sample (b), pixel (p) — where the
  halting loss goes (``in``: added to the objectives of its sample, spread evenly over the other
  kept axes; ``out``: one objective per sample; ``separate``: one extra objective; ``drop``),
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
* **Weightings.** Every TorchJD weighting maps the Gramian G = J Jᵀ to weights w; aggregators that
  need the Jacobian itself (ConFIG, GradDrop, TrimmedMean, NashMTL) use a provider that
  materialises J (``rows``, ``per_sample``). The update is ``m · Jᵀ w / global_batch`` so that
  Mean weighting gives exactly the gradient-descent gradient (UPGrad without conflicts then
  equals it too).

The objectives are never pre-scaled by 1/batch before the Gramian (the fork did, which pushed
trace(G) under TorchJD's normalisation threshold, silently turning UPGrad into the mean); the
degeneracy is detected and logged as ``jd/degenerate``.

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
MAX_ROWS = 512  # objectives the rows provider differentiates one by one (each ≈ one backward)


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
        if not self.has_halt or self.spec.halt in ("in", "drop"):
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
        the sample axis is kept and the halting loss is not one shared objective. Else None."""
        if "sample" not in self.spec.keep or (self.m_halt and self.spec.halt == "separate"):
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
    if spec.halt == "in":
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
class _Gramian:
    """A provider's result: G [m, m]; the dense Jacobian J [m, n] when it was materialised (for
    Jacobian aggregators); ``apply(w, update)`` adds the gradient of Σ_i w_i·objective_i, with
    the aggregator's own dense ``update`` in place of Jᵀw when there is one, to ``.grad``. The
    caller has already scaled w and the update."""

    G: Tensor
    J: Tensor | None
    apply: Callable[[Tensor, Tensor | None], None]
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


class JacobianRows:
    """Accumulates the Jacobian [m, n] of the objectives, one step's contributions at a time.

    ``add(contrib)`` differentiates every objective that step touched right away, so a step's
    graph is freed before the next step runs (stacked supervision steps cost one step's
    activations, not S) unless ``keep_graph``. Columns ``[:n_dense]`` belong to ``params`` (they
    form the Gramian); the rest to ``extra`` (the batch rows of the puzzle embedding, which only
    follow the weights).
    """

    def __init__(self, params: Sequence[Tensor], extra: Sequence[Tensor], m: int) -> None:
        self.params = list(params) + list(extra)
        self.n_dense = sum(p.numel() for p in params)
        n = sum(p.numel() for p in self.params)
        self.J = torch.zeros(m, n, dtype=torch.float32, device=self.params[0].device)

    def add(self, contrib_Bm: Tensor, keep_graph: bool = False) -> None:
        objectives = contrib_Bm.sum(0)
        # Objectives this step does not touch have exactly zero contributions (and gradient).
        touched = (contrib_Bm.detach() != 0).any(0).nonzero().flatten().tolist()
        for n, i in enumerate(touched):
            grads = torch.autograd.grad(
                objectives[i],
                self.params,
                retain_graph=keep_graph or n < len(touched) - 1,
                allow_unused=True,
            )
            self.J[i] += _flat_grads(grads, self.params).float()


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


def head_parameters(model: nn.Module) -> list[Tensor]:
    """The trainable parameters of the output heads (modules named ``lm_head`` or ``q_head``)."""
    return [
        p
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("lm_head", "q_head")
        for p in module.parameters()
        if p.requires_grad
    ]


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
        if owned and self.per_sample_ready and layout.m <= MAX_ROWS:
            return "per_sample"
        gramian = self.aggregator_config.kind == "gramian"
        if owned and gramian and layout.S == 1 and self.spec.groups is None:
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
    ) -> JDResult:
        """Aggregate and write ``.grad``. ``steps`` yields each supervision step's per-sample
        contributions [B, m] (lazily: the providers differentiate each before the next)."""
        t0 = time.perf_counter()
        method = self.method(layout)
        grouping = grouping_matrix(layout.m, self.spec.groups, self.seed, step_index, None)
        m = layout.m if grouping is None else grouping.shape[1]
        aggregator, kind = build_aggregator(self.aggregator_config, m), self.aggregator_config.kind
        # Objectives every rank shares (no sample axis) are aggregated on the global Jacobian.
        shared = "sample" not in self.spec.keep
        if method == "rows":
            gram = _rows(steps, layout, params, extra_params, grouping, shared, all_reduce)
        elif method == "per_sample":
            gram = _per_sample(steps, layout, params, extra_params, grouping)
        elif method == "heads":
            gram = _heads(steps, layout, self.heads, grouping, shared, all_reduce)
        elif method == "autogram":
            if kind != "gramian":
                raise ConfigError(f"aggregator '{self.aggregator_config.name}' needs method rows")
            gram = _autogram(steps, layout, self.engine(), grouping)
        else:
            raise ConfigError(f"unknown Jacobian method '{method}'")
        t1 = time.perf_counter()
        w, update = weights_from(gram.G, aggregator, kind, gram.J)
        t2 = time.perf_counter()
        scale = m / global_batch_size  # Mean weighting == gradient descent on the summed loss
        gram.apply(scale * w.to(torch.float32), None if update is None else scale * update)
        t3 = time.perf_counter()
        metrics = {f"jd/{k}": v for k, v in gramian_metrics(gram.G, w).items()}
        timings = {"gramian": t1 - t0, "weighting": t2 - t1, "backward": t3 - t2}
        metrics.update({f"jd/seconds_{k}": v for k, v in timings.items()})
        return JDResult(metrics=metrics, reduced_across_ranks=gram.reduced_across_ranks)


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
) -> _Gramian:
    """One ``autograd.grad`` per objective, each step's as soon as it has run."""
    m = layout.m if grouping is None else grouping.shape[1]
    if m > MAX_ROWS:
        raise ConfigError(
            f"objective '{layout.spec.name}' has {m} objectives here, too many to "
            f"differentiate one by one (at most {MAX_ROWS}); group them with "
            "objective.groups=k (the fork's +grad_n_groups=k)"
        )
    rows = JacobianRows(params, extra, m)
    for c in steps:
        rows.add(_grouped(c, grouping))
    # Contiguous copies: collectives need them, and the column blocks are strided views.
    J_dense = rows.J[:, : rows.n_dense].contiguous()
    J_extra = rows.J[:, rows.n_dense :].contiguous()
    if shared:
        # Sum the objectives' gradients over ranks, so that every rank aggregates the same
        # global Jacobian and applies the same update.
        all_reduce(J_dense)

    def apply(w: Tensor, update: Tensor | None) -> None:
        dense = update if update is not None else J_dense.T @ w
        _assign_flat(rows.params, torch.cat([dense, J_extra.T @ w]))

    return _Gramian(J_dense @ J_dense.T, J_dense, apply, reduced_across_ranks=shared)


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

    def apply(w: Tensor, update: Tensor | None) -> None:
        assert update is None  # Gramian weightings only (checked at construction)
        (c.sum(0) * w.to(c.dtype)).sum().backward()

    return _Gramian(J @ J.T, None, apply)


def _per_sample(
    steps: Iterable[Tensor],
    layout: Layout,
    params: Sequence[Tensor],
    extra: Sequence[Tensor],
    grouping: Tensor | None,
) -> _Gramian:
    """Objectives that each belong to one sample (``Layout.owned``): every backward yields the
    rows of B objectives at once (``models.per_sample``), so IWRM costs one backward.

    The per-sample rows J_fine [m_fine, n] are grouped algebraically (J = Aᵀ J_fine). The
    puzzle-embedding batch rows (``extra``: tensors [B, ...] whose row b only sample b uses)
    give each objective a gradient on its owner's row, kept as E [m_fine, row size]; they
    follow the weights as in the other providers.
    """
    B, m_fine = layout.B, layout.m
    device = params[0].device
    if m_fine > MAX_ROWS:
        raise ConfigError(
            f"objective '{layout.spec.name}' has {m_fine} per-sample objectives here, too "
            f"many to hold (at most {MAX_ROWS}); use method rows with objective.groups=k"
        )
    J_fine = torch.zeros(m_fine, sum(p.numel() for p in params), device=device)
    row_sizes = [x[0].numel() for x in extra]
    E = torch.zeros(m_fine, sum(row_sizes), device=device)
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
            for r in range(own_c.shape[1]):
                owner[owned[:, r]] = samples
                if not own_c.requires_grad:
                    continue
                sink.zero_()
                own_c[:, r].sum().backward(retain_graph=r < own_c.shape[1] - 1)
                J_fine.index_add_(0, owned[:, r], sink.flat())
                if extra:
                    rows = [
                        x.grad.reshape(B, -1) if x.grad is not None else x.new_zeros(B, size)
                        for x, size in zip(extra, row_sizes, strict=True)
                    ]
                    E.index_add_(0, owned[:, r], torch.cat(rows, dim=1).float())
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

    def apply(w: Tensor, update: Tensor | None) -> None:
        w_fine = w if A is None else A @ w
        dense = update if update is not None else J_fine.T @ w_fine
        # Each objective's embedding-row gradient lands on its owner's row, weighted.
        rows = torch.zeros(B, E.shape[1], device=device).index_add_(0, owner, w_fine[:, None] * E)
        per_tensor = [r.reshape(-1) for r in rows.split(row_sizes, dim=1)]
        _assign_flat([*params, *extra], torch.cat([dense, *per_tensor]))

    return _Gramian(J @ J.T, J, apply)


def _autogram(
    steps: Iterable[Tensor], layout: Layout, engine: Any, grouping: Tensor | None
) -> _Gramian:
    """TorchJD's autogram engine: the Gramian of per-sample outputs in one instrumented
    backward (hooks installed before the forward), then one weighted backward."""
    (c,) = list(steps)
    c = _grouped(c, grouping)
    output, back = _per_sample_output(c, layout, grouped=grouping is not None)
    G = back(engine.compute_gramian(output))

    def apply(w: Tensor, update: Tensor | None) -> None:
        assert update is None  # Gramian weightings only (checked by the caller)
        c.backward(w.to(c.dtype).expand_as(c))

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
