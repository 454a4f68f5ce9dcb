"""Test-time latent search: a row's conditioning optimised on its own demonstrations.

LPN's test-time latent optimisation (Macfarlane & Bonnet, "Searching Latent Program Spaces",
``generate_output`` / ``_get_gradient_ascent_context``) for the recursive models: the weights
stay frozen, and a search variable that conditions the decoder is moved to maximise the
likelihood of the row's demonstration outputs given their inputs. The two attempts submitted
for the query are its predictions under the two best distinct points of the search.

One evaluation row is one query (``inputs`` [B, S]) with its demo pairs (``demo_inputs``,
``demo_labels`` int [B, K, S], ``demo_mask`` bool [B, K]), as the few-shot evaluation loader
yields them. Demo labels keep their raw tokens; ``TTOConfig.demo_pad_label`` (PAD 0) and -100
are not scored.

The search variable (``TTOConfig.variable``) and how it reaches the frozen model, without any
change to the model's code:

* ETRM ``context``: the context [T, D] itself. A forward hook on the encoder replaces its
  ``EncoderOutput.context``.
* ETRM ``latent``: the low-dimensional vector the encoder projects to the context (the input of
  its ``decode_proj`` or ``output_proj``: the posterior mean of the variational encoders, the
  mean demo vector of ``lpn`` and ``lpn_standard``). A forward pre-hook on that projection
  replaces its input. Encoders without such a projection refuse it.
* ETRM ``offset``: a low-rank offset ``U·V`` (U [T, r] starts N(0, 1/r), V [r, D] starts at 0,
  so the offset starts at 0) added to the context, through the encoder hook.
* TRM (a puzzle embedding, no encoder): a fresh puzzle-embedding row [ndim] per row, through a
  forward hook on the embedding module; only ``variable=context`` applies. It starts at the mean
  of the table's rows, upstream's rule for a puzzle the table does not know
  (``utils.checkpoint``'s resize to the mean): on a strict split the evaluation puzzles' rows
  were never trained. ``loo`` means nothing there (no demo enters the variable except through
  the search) and is ignored; ``init=each_demo`` and the other variables are refused.

Decisions (each one is a rule of this module):

* Demo scoring: each (row, candidate, valid demo) is one decoder row, run from a fresh carry
  for ``recursion_steps`` ACT steps (default ``halt_max_steps``, as evaluation runs) with
  halting switched off, so a slot never restarts (with ``halt_at_eval`` too: a fixed step
  keeps the objective the same function of the variable throughout). The loss is the head's
  own token loss (stablemax or softmax CE) of the last step's logits on the demo output,
  averaged over its labelled tokens (``lm_loss`` per row, TRM's unit).
* Demo log-likelihood unit: the mean over a candidate's valid demos of each demo's mean
  per-token log-probability (nats per token; minus the mean ``lm_loss``). The objective is its
  negative summed over rows and candidates, so each variable gets its own gradient only.
* Gradient path: the model's own. The carry is detached between ACT steps and the first
  ``H_cycles − 1`` cycles run without grad, so the gradient reaches the variable through the
  last ACT step's last cycle. The earlier steps therefore run under ``no_grad`` (same values,
  less memory), and the cached evaluation context is dropped from the carry before each step
  so that the encoder (and the hook) runs at every step and the last step sees the variable.
* Leave-one-out: candidate c is built from a demo set S_c (every valid demo for ``mean`` and
  ``perturbed``, the c-th valid demo alone for ``each_demo``); its search state moves it by a
  displacement d_c (0 at the start of ``mean`` and ``each_demo``, the perturbation for
  ``perturbed``, the offset U·V for ``offset``). Demo i is scored from
  ``encoder(S_c \\ {i}) + d_c`` (contexts or latents), so no context the encoder built with
  demo i ever predicts demo i; the query is predicted from ``encoder(S_c) + d_c``. A row with one
  demo scores it from the encoder's empty-set output. Without ``loo`` every demo is scored from
  ``encoder(S_c) + d_c``.
* Candidates: ``mean`` 1; ``each_demo`` one per valid demo (C = the batch's most); ``perturbed``
  the mean and ``num_perturbed`` draws ``mean + perturb_sigma · rms(mean) · ε``.
* Optimiser: Adam (b1 0.9, b2 0.9 as LPN's config, bias-corrected) or SGD, elementwise; the
  global-norm clip is applied per (row, candidate), so neither rows nor candidates interact;
  ``cosine`` decays the rate from ``lr`` towards 0 over the steps.
* ``random_search``: at every step each candidate draws ``num_perturbed`` points around its
  current point (``perturb_sigma · rms(start)`` per element; V alone for ``offset``) and moves
  to the best of them when it beats the current point's likelihood.
* Attempts: every (candidate, step) point is ranked by demo log-likelihood; the first attempt is
  the best, the second the best point whose query conditioning differs from the first's (an
  exactly equal tensor is the same latent). Ties go to the earlier step, then the lower
  candidate. With a single distinct point the first attempt is repeated. The query is predicted
  under each with the evaluation rollout (``training.rollout``, halting as evaluation halts).
* Randomness: each row draws from its own generator, seeded by ``seed`` and a hash of the row's
  query and demos, so a row's search does not depend on the other rows of its batch.
* Rows without any demo (padding) are not searched: their predictions are the plain ones and
  their likelihoods NaN.
* Cost: ``flops`` counts (FlopCounterMode, the matmul-class operations) the start's encodings,
  one scoring step (times ``steps``: every step does the same work; a random-search step is
  ``num_perturbed`` scorings), the final scoring (random search: the start's) and the query
  rollouts. The counting mode runs some operations through other kernels (silu's backward is
  decomposed), so it is never on while the search computes: each counted part is run once more
  on copies, its result discarded, no state updated and no random number drawn, and the search's
  results are bit-identical with and without ``count_flops``. ``seconds`` is the wall time of
  the call less those counting passes. ``chunk_rows`` bounds the decoder rows per forward;
  gradients accumulate over chunks exactly.
* The weights are never changed: every parameter's ``requires_grad`` is switched off for the
  search and, with every module's train/eval mode, restored afterwards; a compiled or DDP
  wrapper is bypassed (the hooks need the eager module).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dataset.common import IGNORE_LABEL_ID
from models.ema import unwrap_module
from models.encoders.base import DemoEncoder
from models.losses import LossOutput
from models.recursive_reasoning.act import ACTCarry
from training.rollout import keep_at_first_halt, rollout
from utils.schema import ConfigError, StrictModel

Batch = dict[str, torch.Tensor]
CONTEXT_KEY = "context"  # ETRM's carry key for a cached evaluation context
DEMO_KEYS = ("demo_inputs", "demo_labels", "demo_mask")
LATENT_PROJECTIONS = ("decode_proj", "output_proj")  # encoder attributes: latent → context


class TTOConfig(StrictModel):
    """Test-time latent search (``tto.*``); ``steps=0`` leaves evaluation untouched."""

    steps: int = Field(0, ge=0, description="search steps per row; 0 = off")
    lr: float = Field(0.1, gt=0, description="learning rate of the search (LPN: 0.1)")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam (LPN) or plain sgd")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay")
    adam_beta2: float = Field(0.9, ge=0, lt=1, description="Adam's second-moment decay (LPN 0.9)")
    adam_eps: float = Field(1e-8, gt=0, description="Adam's denominator epsilon")
    clip_norm: float | None = Field(
        1.0, gt=0, description="global-norm clip of each (row, candidate) gradient; None = off"
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule over the steps"
    )
    method: Literal["gradient", "random_search"] = Field(
        "gradient", description="gradient ascent, or random search around the current point"
    )
    variable: Literal["context", "latent", "offset"] = Field(
        "context",
        description="what is searched: the context [T, D] (TRM: a puzzle-embedding row), the "
        "encoder's latent before its context projection, or a low-rank offset to the context",
    )
    init: Literal["mean", "each_demo", "perturbed"] = Field(
        "mean",
        description="start candidates: the encoder's output over all demos, one per single "
        "demo, or the mean and num_perturbed random perturbations of it",
    )
    num_perturbed: int = Field(
        4,
        ge=1,
        description="perturbed candidates (init=perturbed) / samples per random-search step",
    )
    perturb_sigma: float = Field(
        0.1, gt=0, description="perturbation standard deviation relative to the start's RMS"
    )
    offset_rank: int = Field(4, ge=1, description="variable=offset: rank r of U[T, r]·V[r, D]")
    loo: bool = Field(True, description="leave-one-out: demo i is never scored from itself")
    recursion_steps: int | None = Field(
        None, ge=1, description="ACT steps per demo rollout; None = halt_max_steps"
    )
    demo_pad_label: int = Field(
        0, description="demo label token not scored (the dataset's ignore_label_id; PAD 0)"
    )
    chunk_rows: int | None = Field(
        None, ge=1, description="decoder rows per forward (memory bound); None = all at once"
    )
    count_flops: bool = Field(
        True, description="measure the search's FLOPs (FlopCounterMode, on separate passes)"
    )
    seed: int = Field(0, description="seed of the perturbations and of the offset's U")

    @property
    def enabled(self) -> bool:
        """Whether the search runs at all."""
        return self.steps > 0


@dataclass(frozen=True)
class SearchOutput:
    """One batch's search (B rows, A attempts, C candidates, S tokens).

    * ``preds`` int64 [B, A, S]: the query's predictions under the A best distinct points, best
      first (A = 2, or 1 with one candidate and no step; a row with one distinct point repeats
      it); rows not searched hold their plain predictions.
    * ``q_halt_logits`` float32 [B, A]: the query's q_halt at its halting step under each.
    * ``demo_loglik`` float32 [B, A]: those points' demo log-likelihoods (mean over valid demos
      of the mean per-token log-probability, nats per token).
    * ``loglik_start`` float32 [B]: the best starting candidate's demo log-likelihood.
    * ``loglik_trajectory`` float32 [B, C, steps + 1]: every candidate at every step (0 = the
      start); NaN for candidates a row does not have.
    * ``best_is_start`` bool [B]: the first attempt is a starting point.
    * ``searched`` bool [B]: rows with at least one demo; the others' likelihoods are NaN.
    * ``seconds``: wall time of the search (FLOP counting excluded); ``flops``: its FLOPs (None
      when not counted).
    """

    preds: torch.Tensor
    q_halt_logits: torch.Tensor
    demo_loglik: torch.Tensor
    loglik_start: torch.Tensor
    loglik_trajectory: torch.Tensor
    best_is_start: torch.Tensor
    searched: torch.Tensor
    seconds: float
    flops: float | None


# ----------------------------------------------------------------------------------------------
# Model access
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(head: nn.Module) -> Iterator[None]:
    """Every parameter without grad and every module in eval mode; both restored after."""
    flags = [(p, p.requires_grad) for p in head.parameters()]
    modes = [(m, m.training) for m in head.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        head.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _demo_encoder(head: nn.Module) -> DemoEncoder | None:
    encoders = [m for m in head.modules() if isinstance(m, DemoEncoder)]
    if len(encoders) > 1:
        raise ConfigError(
            f"test-time search expects one demonstration encoder, found {len(encoders)}"
        )
    return encoders[0] if encoders else None


def _latent_projection(encoder: DemoEncoder) -> nn.Module:
    for name in LATENT_PROJECTIONS:
        module = getattr(encoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ConfigError(
        f"tto.variable=latent needs an encoder that projects a latent to its context "
        f"({'/'.join(LATENT_PROJECTIONS)}); {type(encoder).__name__} has none: use "
        "tto.variable=context or offset"
    )


class _Injector:
    """Replaces the conditioning the model computes with ``value`` (rows of the next forward).

    ``kind``: ``context`` (forward hook on the encoder: ``EncoderOutput.context``), ``latent``
    (forward pre-hook on the encoder's latent projection: its input) or ``embedding`` (forward
    hook on TRM's puzzle embedding: its output [B, ndim]).
    """

    def __init__(self, kind: str, module: nn.Module) -> None:
        self.kind = kind
        self.value: torch.Tensor | None = None
        if kind == "latent":
            self.handle = module.register_forward_pre_hook(self._pre_hook)
        else:
            self.handle = module.register_forward_hook(self._hook)

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.value is None:
            return None
        return (self.value.to(args[0].dtype), *args[1:])

    def _hook(self, module: nn.Module, args: tuple, output: object) -> object:
        if self.value is None:
            return None
        if self.kind == "context":
            return replace(output, context=self.value.to(output.context.dtype))
        return self.value.to(output.dtype)

    def remove(self) -> None:
        self.handle.remove()


def _encode(
    encoder: DemoEncoder,
    projection: nn.Module | None,
    demo_inputs: torch.Tensor,
    demo_labels: torch.Tensor,
    demo_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [N, T, D], latent [N, L] or None) in float32 for demo sets of N rows."""
    captured: list[torch.Tensor] = []
    handle = None
    if projection is not None:
        handle = projection.register_forward_pre_hook(
            lambda module, args: captured.append(args[0].detach())
        )
    try:
        with torch.no_grad():
            out = encoder(demo_inputs, demo_labels, demo_mask)
    finally:
        if handle is not None:
            handle.remove()
    latent = captured[-1].float() if captured else None
    return out.context.detach().float(), latent


# ----------------------------------------------------------------------------------------------
# The problem: candidates, demo rows and their bases
# ----------------------------------------------------------------------------------------------
@dataclass
class _Problem:
    """Everything fixed during one search.

    ``start`` [B, C, *X]: each candidate's value built from its demo set (X = the variable's
    shape: [T, D], [L] or [ndim]); ``base`` [N, *X]: each demo row's leave-one-out value; demo
    rows r are (row ``row_b[r]``, candidate ``row_c[r]``, demo slot ``row_k[r]``);
    ``weight`` [N]: 1 / (the row's number of valid demos); ``cand_valid`` [B, C];
    ``plain`` [B, *X]: what the model computes for the query itself; ``scale`` [B, C]: the RMS
    of the start (the unit of the perturbations).
    """

    start: torch.Tensor
    base: torch.Tensor
    row_b: torch.Tensor
    row_c: torch.Tensor
    row_k: torch.Tensor
    weight: torch.Tensor
    cand_valid: torch.Tensor
    plain: torch.Tensor
    scale: torch.Tensor
    demo_batch: Batch
    searched: torch.Tensor


def _row_generators(batch: Batch, seed: int) -> list[torch.Generator]:
    """One CPU generator per row, seeded by ``seed`` and a hash of the row's data."""
    keys = ("inputs", *DEMO_KEYS)
    arrays = [batch[k].detach().cpu().numpy() for k in keys if k in batch]
    gens = []
    for b in range(batch["inputs"].shape[0]):
        h = hashlib.blake2b(str(seed).encode(), digest_size=8)
        for a in arrays:
            h.update(np.ascontiguousarray(a[b]).tobytes())
        gens.append(torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1))
    return gens


def _randn(
    gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """[B, *shape] standard normal, row b from generator b."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def _rms(x: torch.Tensor, dims: int) -> torch.Tensor:
    """RMS over the last ``dims`` dimensions, floored at a tiny positive value."""
    flat = x.flatten(-dims) if dims > 1 else x
    return flat.square().mean(-1).sqrt().clamp_min(1e-12)


def _demo_rows_batch(batch: Batch, row_b: torch.Tensor, row_k: torch.Tensor, pad: int) -> Batch:
    """The decoder batch of the demo rows: demo k of row b as (inputs, labels), every other
    field of row b, and no demos of its own (the injected conditioning replaces them)."""
    demo_inputs, demo_labels = batch["demo_inputs"], batch["demo_labels"]
    labels = demo_labels[row_b, row_k].to(torch.int32)
    labels = torch.where(labels == pad, IGNORE_LABEL_ID, labels)
    N, S = labels.shape
    out: Batch = {}
    for key, value in batch.items():
        if key == "inputs":
            out[key] = demo_inputs[row_b, row_k].to(value.dtype)
        elif key == "labels":
            out[key] = labels.to(value.dtype)
        elif key in ("demo_inputs", "demo_labels"):
            out[key] = torch.zeros((N, 1, S), dtype=value.dtype, device=value.device)
        elif key == "demo_mask":
            out[key] = torch.zeros((N, 1), dtype=value.dtype, device=value.device)
        else:
            out[key] = value[row_b]
    return out


def _build_problem(head: nn.Module, batch: Batch, config: TTOConfig) -> tuple[_Problem, _Injector]:
    for key in ("inputs", "labels", *DEMO_KEYS):
        if key not in batch:
            raise ConfigError(
                f"test-time search reads each row's demonstrations, but the batch has no "
                f"'{key}': evaluate with the few-shot evaluation sampler (few_shot_eval)"
            )
    mask = batch["demo_mask"].to(torch.bool)
    B, K = mask.shape
    device = mask.device
    counts = mask.sum(1)
    demo_inputs, demo_labels = batch["demo_inputs"], batch["demo_labels"]
    encoder = _demo_encoder(head)

    # cand_mask [B, C0, K]: each candidate's demo set; starts [B, C0, *X]: its value.
    if encoder is None:
        if config.variable != "context" or config.init == "each_demo":
            raise ConfigError(
                f"tto.variable={config.variable} tto.init={config.init}: a puzzle-embedding model "
                "searches a fresh embedding row only; use tto.variable=context with tto.init=mean "
                "or perturbed"
            )
        puzzle_emb = getattr(getattr(head, "model", head), "puzzle_emb", None)
        if not isinstance(puzzle_emb, nn.Module) or not hasattr(puzzle_emb, "weights"):
            raise ConfigError(
                "test-time search needs a demonstration encoder or a puzzle embedding; this "
                "model has neither (arch.puzzle_emb_ndim=0)"
            )
        kind = "embedding"
        injector = _Injector(kind, puzzle_emb)
        table = puzzle_emb.weights.detach().float()
        plain = table[batch["puzzle_identifiers"].long()]
        cand_mask = mask.unsqueeze(1)
        starts = table.mean(0).expand(B, 1, -1)
        table_rms = float(table.square().mean().sqrt())
        scale = torch.full((B, 1), table_rms if table_rms > 0 else 1.0, device=device)

        def encode(rows: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
            raise AssertionError("a puzzle-embedding model has no encoder")

    else:
        if encoder.is_recurrent:
            raise ConfigError(
                f"test-time search needs an encoder that is deterministic at evaluation; "
                f"{type(encoder).__name__} carries a state across ACT steps"
            )
        projection = _latent_projection(encoder) if config.variable == "latent" else None
        kind = "latent" if config.variable == "latent" else "context"
        injector = _Injector(kind, projection if projection is not None else encoder)

        def encode(rows: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
            """The encoder's value for demo sets ``sets`` [N, K] of rows ``rows`` [N]."""
            context, latent = _encode(
                encoder, projection, demo_inputs[rows], demo_labels[rows], sets
            )
            return latent if latent is not None else context

        plain = encode(torch.arange(B, device=device), mask)
        if config.init == "each_demo":
            C0 = max(int(counts.max()), 1)
            rank = torch.cumsum(mask.long(), 1) - 1  # each valid slot's rank in its row
            cand_mask = (rank[:, None, :] == torch.arange(C0, device=device)[:, None]) & mask[
                :, None, :
            ]
            rows = torch.arange(B, device=device).repeat_interleave(C0)
            flat = encode(rows, cand_mask.reshape(B * C0, K))
            starts = flat.view(B, C0, *flat.shape[1:])
        else:
            cand_mask = mask.unsqueeze(1)
            starts = plain.unsqueeze(1)
        scale = _rms(starts, starts.dim() - 2)

    if config.init == "perturbed":
        C = 1 + config.num_perturbed
        cand_mask = cand_mask.expand(B, C, K)
        starts = starts.expand(B, C, *starts.shape[2:])
        scale = scale.expand(B, C)
    cand_valid = cand_mask.any(-1)

    # Demo rows: every (row, valid candidate, valid demo).
    row_b, row_c, row_k = (cand_valid[:, :, None] & mask[:, None, :]).nonzero().unbind(1)
    if encoder is not None and config.loo:
        others = torch.arange(K, device=device)[None, :] != row_k[:, None]
        base = encode(row_b, cand_mask[row_b, row_c] & others)
    else:
        base = starts[row_b, row_c]
    problem = _Problem(
        start=starts.float().contiguous(),
        base=base.float().contiguous(),
        row_b=row_b,
        row_c=row_c,
        row_k=row_k,
        weight=1.0 / counts[row_b].clamp_min(1).double(),
        cand_valid=cand_valid,
        plain=plain.float(),
        scale=scale.float().contiguous(),
        demo_batch=_demo_rows_batch(batch, row_b, row_k, config.demo_pad_label),
        searched=counts > 0,
    )
    return problem, injector


# ----------------------------------------------------------------------------------------------
# The search state: what is optimised, and the values it gives
# ----------------------------------------------------------------------------------------------
@dataclass
class _State:
    """The searched tensors [B, C, ...]: ``value`` (context/latent/embedding search), or the
    offset factors ``u`` [B, C, T, r] and ``v`` [B, C, r, D]; ``anchor`` [B, C, *X] is what
    the displacement is measured from (the unperturbed candidate)."""

    tensors: list[torch.Tensor]
    offset: bool
    anchor: torch.Tensor

    def displacement(self) -> torch.Tensor:
        if self.offset:
            u, v = self.tensors
            return u @ v
        return self.tensors[0] - self.anchor

    def query_values(self) -> torch.Tensor:
        """[B, C, *X]: the query's conditioning under each candidate."""
        return self.anchor + self.displacement()

    def demo_values(self, problem: _Problem, rows: slice) -> torch.Tensor:
        """[n, *X]: demo rows ``rows``' conditioning (their leave-one-out bases, moved)."""
        moved = self.displacement()[problem.row_b[rows], problem.row_c[rows]]
        return problem.base[rows] + moved


def _initial_state(problem: _Problem, config: TTOConfig, gens: list[torch.Generator]) -> _State:
    start = problem.start.float()
    B, C = start.shape[:2]
    device = start.device
    noise_scale = config.perturb_sigma * problem.scale  # [B, C]
    if config.variable == "offset":
        T, D = start.shape[-2:]
        r = config.offset_rank
        u = _randn(gens, (C, T, r), device) / math.sqrt(r)
        v = torch.zeros(B, C, r, D, device=device)
        if config.init == "perturbed":
            # Offset entries then have std perturb_sigma · rms(start), as for the context.
            drawn = _randn(gens, (C, r, D), device) * noise_scale[:, :, None, None]
            v = torch.cat((v[:, :1], drawn[:, 1:]), 1)
        return _State([u, v], True, start)
    value = start.clone()
    if config.init == "perturbed":
        extra = value.dim() - 2
        drawn = _randn(gens, tuple(value.shape[1:]), device)
        drawn = drawn * noise_scale.view(B, C, *([1] * extra))
        value = value + torch.cat((torch.zeros_like(drawn[:, :1]), drawn[:, 1:]), 1)
    return _State([value], False, start)


# ----------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------
def _without_cached_context(carry: ACTCarry) -> ACTCarry:
    data = {k: v for k, v in carry.current_data.items() if k != CONTEXT_KEY}
    return replace(carry, current_data=data)


def _demo_losses(
    head: nn.Module, injector: _Injector, batch: Batch, values: torch.Tensor, steps: int
) -> torch.Tensor:
    """Each demo row's mean token loss [n] (float64) after ``steps`` ACT steps on ``batch``
    under ``values`` [n, *X]; the graph reaches ``values`` through the last step."""
    carry = head.initial_carry(batch)
    out: LossOutput | None = None
    try:
        for t in range(steps):
            last = t == steps - 1
            injector.value = values if last else values.detach()
            with torch.enable_grad() if last else torch.no_grad():
                out = head(carry=_without_cached_context(carry), batch=batch)
            # Halting off: a slot never restarts, whatever recursion_steps is.
            carry = replace(out.new_carry, halted=torch.zeros_like(out.new_carry.halted))
    finally:
        injector.value = None
    assert out is not None
    return out.lm_loss_per_sample.double()


def _chunks(n: int, size: int | None) -> list[slice]:
    size = n if size is None else size
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))] or [slice(0, 0)]


def _score(
    head: nn.Module,
    injector: _Injector,
    problem: _Problem,
    state: _State,
    steps: int,
    grad: bool,
    chunk_rows: int | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Demo log-likelihoods [B, C] float64 of ``state`` and, with ``grad``, the gradients of
    minus their sum over valid candidates with respect to its tensors (chunks of demo rows
    accumulate: the rows are independent, so the sum is exact)."""
    tensors = [x.detach().requires_grad_(grad) for x in state.tensors]
    probe = _State(tensors, state.offset, state.anchor)
    B, C = problem.cand_valid.shape
    flat = problem.row_b * C + problem.row_c
    ll = torch.zeros(B * C, dtype=torch.float64, device=problem.start.device)
    grads = [torch.zeros_like(x) for x in tensors] if grad else []
    for rows in _chunks(int(problem.row_b.numel()), chunk_rows):
        if rows.stop == rows.start:
            break
        batch = {k: v[rows] for k, v in problem.demo_batch.items()}
        losses = _demo_losses(head, injector, batch, probe.demo_values(problem, rows), steps)
        part = torch.zeros_like(ll).index_add(0, flat[rows], -losses * problem.weight[rows])
        if grad:
            objective = -(part.view(B, C) * problem.cand_valid).sum()
            got = torch.autograd.grad(objective, tensors, allow_unused=True)
            for acc, g in zip(grads, got, strict=True):
                if g is not None:
                    acc.add_(g)
        ll = ll + part.detach()
    return ll.view(B, C), grads


def _predict(
    head: nn.Module,
    injector: _Injector,
    batch: Batch,
    values: torch.Tensor,
    chunk_rows: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query's predictions int64 [B, A, S] and q_halt [B, A] under ``values`` [B, A, *X],
    each row scored at the step where it first halts (evaluation's rule)."""
    B, A = values.shape[:2]
    rows = torch.arange(B, device=values.device).repeat_interleave(A)
    flat = values.flatten(0, 1)
    all_preds, all_q = [], []
    for part in _chunks(B * A, chunk_rows):
        q_batch = {k: v[rows[part]] for k, v in batch.items()}
        injector.value = flat[part]
        kept: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for step in rollout(head, q_batch, ["q_halt_logits"]):
                    outputs = step.out.outputs
                    values = {k: outputs[k] for k in ("preds", "q_halt_logits")}
                    keep_at_first_halt(kept, values, step.newly_halted)
        finally:
            injector.value = None
        all_preds.append(kept["preds"])
        all_q.append(kept["q_halt_logits"])
    preds, q_halt = torch.cat(all_preds), torch.cat(all_q)
    return preds.long().view(B, A, -1), q_halt.float().view(B, A)


# ----------------------------------------------------------------------------------------------
# Top-2 distinct points
# ----------------------------------------------------------------------------------------------
class _TopTwo:
    """The best and the second-best distinct points of each row (module doc: ties go to the
    earlier step, then the lower candidate)."""

    def __init__(self, like: torch.Tensor) -> None:
        B = like.shape[0]
        device = like.device
        self.values = torch.zeros((B, 2, *like.shape[2:]), device=device)
        self.ll = torch.full((B, 2), -math.inf, dtype=torch.float64, device=device)
        self.step = torch.zeros((B, 2), dtype=torch.long, device=device)

    def update(self, values: torch.Tensor, ll: torch.Tensor, valid: torch.Tensor, t: int) -> None:
        """values [B, C, *X], ll [B, C], valid [B, C] at step ``t``."""
        ll = torch.where(valid, ll, -math.inf)
        extra = values.dim() - 2
        for c in range(values.shape[1]):
            val, lc = values[:, c].float(), ll[:, c]
            same_best = (val == self.values[:, 0]).flatten(1).all(1) & (self.ll[:, 0] > -math.inf)
            better_best = (lc > self.ll[:, 0]) & ~same_best
            better_second = ~better_best & ~same_best & (lc > self.ll[:, 1])
            shape = (-1, *([1] * extra))
            new_second_val = torch.where(better_best.view(shape), self.values[:, 0], val)
            move_second = better_best | better_second
            self.values[:, 1] = torch.where(
                move_second.view(shape), new_second_val, self.values[:, 1]
            )
            self.ll[:, 1] = torch.where(
                move_second, torch.where(better_best, self.ll[:, 0], lc), self.ll[:, 1]
            )
            self.step[:, 1] = torch.where(
                move_second, torch.where(better_best, self.step[:, 0], t), self.step[:, 1]
            )
            self.values[:, 0] = torch.where(better_best.view(shape), val, self.values[:, 0])
            self.ll[:, 0] = torch.where(better_best, lc, self.ll[:, 0])
            self.step[:, 0] = torch.where(better_best, t, self.step[:, 0])

    def attempts(self, A: int) -> tuple[torch.Tensor, torch.Tensor]:
        """values [B, A, *X] and log-likelihoods [B, A]; a missing second repeats the first."""
        has_second = self.ll[:, 1] > -math.inf
        extra = self.values.dim() - 2
        second = torch.where(
            has_second.view(-1, *([1] * extra)), self.values[:, 1], self.values[:, 0]
        )
        second_ll = torch.where(has_second, self.ll[:, 1], self.ll[:, 0])
        values = torch.stack((self.values[:, 0], second), 1)[:, :A]
        return values, torch.stack((self.ll[:, 0], second_ll), 1)[:, :A]


# ----------------------------------------------------------------------------------------------
# Optimisers
# ----------------------------------------------------------------------------------------------
def _clip_per_candidate(grads: list[torch.Tensor], clip: float | None) -> list[torch.Tensor]:
    if clip is None:
        return grads
    sq = sum(g.flatten(2).square().sum(-1) for g in grads)  # [B, C]
    factor = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return [g * factor.view(*factor.shape, *([1] * (g.dim() - 2))) for g in grads]


def _lr(config: TTOConfig, t: int) -> float:
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * t / config.steps))
    return config.lr


class _Optimizer:
    """Adam or SGD on the state's tensors, elementwise (so every candidate is its own)."""

    def __init__(self, config: TTOConfig, tensors: list[torch.Tensor]) -> None:
        self.config = config
        self.m = [torch.zeros_like(x) for x in tensors]
        self.v = [torch.zeros_like(x) for x in tensors]

    def step(self, tensors: list[torch.Tensor], grads: list[torch.Tensor], t: int) -> None:
        c = self.config
        lr = _lr(c, t)
        for i, (x, g) in enumerate(zip(tensors, grads, strict=True)):
            if c.optimizer == "sgd":
                x.sub_(lr * g)
                continue
            self.m[i].mul_(c.adam_beta1).add_(g, alpha=1 - c.adam_beta1)
            self.v[i].mul_(c.adam_beta2).addcmul_(g, g, value=1 - c.adam_beta2)
            m_hat = self.m[i] / (1 - c.adam_beta1 ** (t + 1))
            v_hat = self.v[i] / (1 - c.adam_beta2 ** (t + 1))
            x.sub_(lr * m_hat / (v_hat.sqrt() + c.adam_eps))


# ----------------------------------------------------------------------------------------------
# FLOP metering
# ----------------------------------------------------------------------------------------------
class _Meter:
    """FLOPs counted on separate, discarded passes of the search's representative parts.

    The counting mode changes what runs under it (it decomposes the operations it has no
    formula for, such as silu's backward, into other kernels that round differently), so no pass
    whose result the search keeps ever runs under it. A measured pass reads copies of its inputs,
    updates nothing and consumes no random numbers; ``seconds`` is the time the measuring took.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.flops = 0.0
        self.seconds = 0.0

    def measure(self, times: float, device: torch.device, work: Callable[[], object]) -> None:
        """Add ``times`` × the FLOPs of one call of ``work`` (its result is discarded)."""
        if not self.enabled or times == 0:
            return
        started = time.perf_counter()
        accelerators = [] if device.type == "cpu" else [_device_index(device)]
        mode = FlopCounterMode(display=False)
        with torch.random.fork_rng(accelerators, device_type=device.type), mode:
            work()
        self.flops += times * float(mode.get_total_flops())
        self.seconds += time.perf_counter() - started


def _device_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.get_device_module(device.type).current_device()


def _copied(batch: Batch) -> Batch:
    return {k: v.clone() for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------
def search(head: nn.Module, batch: Batch, config: TTOConfig) -> SearchOutput:
    """Search each row's conditioning on its demonstrations through the frozen ``head``.

    ``head``: the loss head evaluation holds (``TrainState.model``); ``batch``: one evaluation
    batch, ``inputs``/``labels`` [B, S] and ``demo_inputs``/``demo_labels`` int [B, K, S],
    ``demo_mask`` bool [B, K] besides the model's other fields. May be called inside
    ``torch.inference_mode()``. Returns ``SearchOutput`` (shapes there); the weights, their
    ``requires_grad`` flags and every module's mode are as before.
    """
    started = time.perf_counter()
    model = unwrap_module(head)
    meter = _Meter(config.count_flops)
    with torch.inference_mode(False), torch.enable_grad(), _frozen(model):
        out = _search(model, _copied(batch), config, meter)
    return replace(out, seconds=time.perf_counter() - started - meter.seconds)


def _search(head: nn.Module, batch: Batch, config: TTOConfig, meter: _Meter) -> SearchOutput:
    act = getattr(head, "model", head)
    steps = config.recursion_steps or int(act.config.halt_max_steps)
    device = batch["inputs"].device

    def build_and_discard() -> None:
        _build_problem(head, _copied(batch), config)[1].remove()

    meter.measure(1.0, device, build_and_discard)
    problem, injector = _build_problem(head, batch, config)
    try:
        gens = _row_generators(batch, config.seed)
        state = _initial_state(problem, config, gens)
        B, C = problem.cand_valid.shape
        trajectory = torch.full((B, C, config.steps + 1), math.nan, dtype=torch.float64)
        trajectory = trajectory.to(problem.start.device)
        top = _TopTwo(problem.start)
        optimizer = _Optimizer(config, state.tensors)

        def evaluate(current: _State, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
            return _score(head, injector, problem, current, steps, grad, config.chunk_rows)

        def evaluate_copy(grad: bool) -> Callable[[], object]:
            copy = _State([x.clone() for x in state.tensors], state.offset, state.anchor.clone())
            return lambda: evaluate(copy, grad)

        # A scoring's work depends on the shapes only: one of each kind stands for all. Gradient
        # ascent scores with grad at every step and once more without at the end; random search
        # scores its start, then num_perturbed draws at every step.
        gradient = config.method == "gradient"
        meter.measure(1.0, device, evaluate_copy(False))
        if gradient:
            meter.measure(float(config.steps), device, evaluate_copy(True))
        else:
            meter.measure(float(config.steps * config.num_perturbed), device, evaluate_copy(False))

        ll: torch.Tensor | None = None
        grads: list[torch.Tensor] = []
        for t in range(config.steps + 1):
            last = t == config.steps
            if ll is None:
                ll, grads = evaluate(state, gradient and not last)
            trajectory[:, :, t] = torch.where(problem.cand_valid, ll, math.nan)
            top.update(state.query_values(), ll, problem.cand_valid, t)
            if last:
                break
            if gradient:
                with torch.no_grad():
                    optimizer.step(state.tensors, _clip_per_candidate(grads, config.clip_norm), t)
                ll = None
            else:
                state, ll = _random_step(state, ll, evaluate, problem, config, gens)

        A = 1 if C == 1 and config.steps == 0 else 2
        values, att_ll = top.attempts(A)
        searched = problem.searched
        plain = problem.plain.float().unsqueeze(1).expand_as(values)
        extra = values.dim() - 2
        values = torch.where(searched.view(-1, 1, *([1] * extra)), values, plain)
        # The query rollouts halt on the model's own signal: measured on these very values.
        query_values = values.clone()
        meter.measure(
            1.0,
            device,
            lambda: _predict(head, injector, _copied(batch), query_values, config.chunk_rows),
        )
        preds, q_halt = _predict(head, injector, batch, values, config.chunk_rows)
    finally:
        injector.remove()
    nan = torch.tensor(math.nan, dtype=torch.float64, device=att_ll.device)
    start_ll = trajectory[:, :, 0].nan_to_num(-math.inf).max(1).values
    return SearchOutput(
        preds=preds,
        q_halt_logits=q_halt,
        demo_loglik=torch.where(searched[:, None], att_ll, nan).float(),
        loglik_start=torch.where(searched, start_ll, nan).float(),
        loglik_trajectory=trajectory.float(),
        best_is_start=(top.step[:, 0] == 0) & searched,
        searched=searched,
        seconds=0.0,
        flops=meter.flops if config.count_flops else None,
    )


def _random_step(
    state: _State,
    ll: torch.Tensor,
    evaluate: Callable[[_State, bool], tuple[torch.Tensor, list[torch.Tensor]]],
    problem: _Problem,
    config: TTOConfig,
    gens: list[torch.Generator],
) -> tuple[_State, torch.Tensor]:
    """One random-search step: ``num_perturbed`` draws around each candidate's current point;
    a candidate moves to its best draw when that beats its current likelihood."""
    target = 1 if state.offset else 0
    base = state.tensors[target]
    B, C = base.shape[:2]
    extra = base.dim() - 2
    sigma = (config.perturb_sigma * problem.scale).view(B, C, *([1] * extra))
    best_ll, best = ll, base
    for _ in range(config.num_perturbed):
        draw = base + sigma * _randn(gens, tuple(base.shape[1:]), base.device)
        tensors = list(state.tensors)
        tensors[target] = draw
        cand_ll, _ = evaluate(_State(tensors, state.offset, state.anchor), False)
        better = cand_ll > best_ll
        best = torch.where(better.view(B, C, *([1] * extra)), draw, best)
        best_ll = torch.where(better, cand_ll, best_ll)
    tensors = list(state.tensors)
    tensors[target] = best
    return _State(tensors, state.offset, state.anchor), best_ll
