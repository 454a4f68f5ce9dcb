"""ARC rows as pictures: ``input | target | prediction`` panels and per-step accuracy curves,
sent to a run's logger (W&B images and charts, PNGs beside ``metrics.jsonl``).

The curve is exact accuracy as a function of the ACT step the answer is taken at, counted
during an evaluation's rollouts (``StepExactCurve``): a slot's answer at step t is its decode
at t while it runs, and its answer at its halting step after it halted, so the last point is
the evaluation's exact accuracy.

Rows are drawn as the model sees them: on the (augmented) 30×30 canvas, tokens PAD 0, EOS 1 and
colour c as c + 2 (``evaluators.arc``). With ``crop`` each grid is cut as the ARC evaluator
cuts it before scoring (``evaluators.arc.crop``: the largest colour rectangle at the origin), so
the prediction shown is the one that is voted on; otherwise the whole canvas is drawn, PAD and
EOS in two neutral greys. Labels ignored by the loss (-100, the loader's PAD) are drawn as PAD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dataset.common import DataError
from evaluators.arc import BLANK_IDENTIFIER_ID, CANVAS, COLOUR_OFFSET, EOS_ID, PAD_ID
from evaluators.arc import crop as crop_canvas
from utils.logging import RunLogger

# The standard ARC palette, colour 0..9.
ARC_PALETTE = np.array(
    [
        (0x00, 0x00, 0x00),
        (0x00, 0x74, 0xD9),
        (0xFF, 0x41, 0x36),
        (0x2E, 0xCC, 0x40),
        (0xFF, 0xDC, 0x00),
        (0xAA, 0xAA, 0xAA),
        (0xF0, 0x12, 0xBE),
        (0xFF, 0x85, 0x1B),
        (0x7F, 0xDB, 0xFF),
        (0x87, 0x0C, 0x25),
    ],
    dtype=np.uint8,
)
PAD_COLOUR = (0xE0, 0xE0, 0xE0)  # full-canvas mode: light grey, lighter than colour 5
EOS_COLOUR = (0x80, 0x80, 0x80)  # full-canvas mode: mid grey, darker than colour 5
LINE_COLOUR = (0x30, 0x30, 0x30)  # grid lines between cells
BACKGROUND = (0xFF, 0xFF, 0xFF)  # the gaps between grids and below shorter grids
CELL_PX = 8
LINE_PX = 1

# Token id → RGB; ids 0..11, anything else (the loss's ignore label) is drawn as PAD.
_NUM_TOKENS = COLOUR_OFFSET + len(ARC_PALETTE)
_TOKEN_RGB = np.zeros((_NUM_TOKENS, 3), dtype=np.uint8)
_TOKEN_RGB[PAD_ID], _TOKEN_RGB[EOS_ID] = PAD_COLOUR, EOS_COLOUR
_TOKEN_RGB[COLOUR_OFFSET:] = ARC_PALETTE
SEQ_LEN = CANVAS * CANVAS  # the tokens of one ARC row


def _numpy(value: Any) -> np.ndarray:
    """A tensor (any device) or array as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _tokens(grid: np.ndarray) -> np.ndarray:
    """Token ids with everything outside 0..11 replaced by PAD."""
    grid = np.asarray(grid).astype(np.int64)
    return np.where((grid >= 0) & (grid < _NUM_TOKENS), grid, PAD_ID)


def view_grid(tokens: np.ndarray, crop_to_content: bool) -> np.ndarray:
    """One row's token grid as drawn: int64 [rows, cols] of token ids.

    ``tokens``: 900 (or 30×30) token ids. With ``crop_to_content``, the evaluator's crop of the
    canvas (colour tokens only; [0, 0] when the origin holds no colour); otherwise the whole
    30×30 canvas, non-token values as PAD.
    """
    canvas = _tokens(np.asarray(tokens).reshape(CANVAS, CANVAS))
    if not crop_to_content:
        return canvas
    return crop_canvas(canvas).astype(np.int64) + COLOUR_OFFSET


def grid_image(grid: np.ndarray, cell_px: int = CELL_PX, line_px: int = LINE_PX) -> np.ndarray:
    """A token grid [rows, cols] as an RGB uint8 image
    [rows·cell_px + (rows+1)·line_px, cols·cell_px + (cols+1)·line_px, 3].

    Cell (i, j) fills pixels ``line_px + i·(cell_px+line_px)`` onwards for ``cell_px`` rows (the
    same for columns), in the ARC palette for colours, ``PAD_COLOUR``/``EOS_COLOUR`` for PAD/EOS;
    the lines between and around cells are ``LINE_COLOUR``. An empty grid is drawn as one PAD
    cell, so an unreadable prediction still shows as a box.
    """
    if cell_px < 1 or line_px < 0:
        raise ValueError(f"cell_px must be >= 1 and line_px >= 0, got {cell_px}, {line_px}")
    grid = _tokens(grid)
    if grid.ndim != 2:
        raise ValueError(f"grid must be [rows, cols], got shape {list(grid.shape)}")
    if grid.size == 0:
        grid = np.full((1, 1), PAD_ID, dtype=np.int64)

    def cell_of_pixel(n: int) -> np.ndarray:
        # Pixel → cell index along one axis, -1 on a grid line.
        pitch = cell_px + line_px
        pixel = np.arange(n * cell_px + (n + 1) * line_px)
        offset = (pixel - line_px) % pitch
        index = (pixel - line_px) // pitch
        return np.where((pixel >= line_px) & (offset < cell_px) & (index < n), index, -1)

    ys, xs = cell_of_pixel(grid.shape[0]), cell_of_pixel(grid.shape[1])
    image = _TOKEN_RGB[grid[np.maximum(ys, 0)][:, np.maximum(xs, 0)]]
    on_line = (ys[:, None] < 0) | (xs[None, :] < 0)
    image[on_line] = LINE_COLOUR
    return image


def panel_image(
    inputs: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    crop_to_content: bool,
    cell_px: int = CELL_PX,
    gap_px: int | None = None,
) -> np.ndarray:
    """One row's ``input | target | prediction`` as an RGB uint8 image.

    ``inputs``, ``labels``, ``preds``: 900 token ids each (see ``view_grid``). The three grid
    images (``grid_image``) sit side by side, top-aligned, ``gap_px`` (default 2·cell_px)
    apart on ``BACKGROUND``: width = the three widths + 2·gap_px, height = the tallest.
    """
    gap = 2 * cell_px if gap_px is None else gap_px
    if gap < 0:
        raise ValueError(f"gap_px must be >= 0, got {gap}")
    parts = [grid_image(view_grid(g, crop_to_content), cell_px) for g in (inputs, labels, preds)]
    height = max(p.shape[0] for p in parts)
    width = sum(p.shape[1] for p in parts) + gap * (len(parts) - 1)
    panel = np.empty((height, width, 3), dtype=np.uint8)
    panel[:] = BACKGROUND
    x = 0
    for part in parts:
        panel[: part.shape[0], x : x + part.shape[1]] = part
        x += part.shape[1] + gap
    return panel


def select_rows(
    batch: Mapping[str, Any], outputs: Mapping[str, Any], max_samples: int
) -> np.ndarray:
    """Indices (int64, ascending) of the first ``max_samples`` real rows of a batch.

    A row is real unless its ``puzzle_identifiers`` entry is the blank id 0 (the loader's
    padding); without that key every row is real. ``outputs`` wins over ``batch`` for a key in
    both, as in the evaluators.
    """
    if max_samples < 0:
        raise ValueError(f"log_predictions_max_samples must be >= 0, got {max_samples}")
    merged = {**batch, **outputs}
    if "puzzle_identifiers" in merged:
        ids = _numpy(merged["puzzle_identifiers"]).reshape(-1)
        rows = np.flatnonzero(ids != BLANK_IDENTIFIER_ID)
    else:
        rows = np.arange(len(merged["inputs"]))
    return rows[:max_samples].astype(np.int64)


def _rows_of(merged: Mapping[str, Any], key: str, rows: np.ndarray) -> np.ndarray:
    if key not in merged:
        raise KeyError(f"prediction images need {key!r} in the batch or the outputs")
    value = merged[key]
    index = rows.tolist()  # a list indexes tensors (on any device) and arrays alike
    picked = _numpy(value[index] if hasattr(value, "detach") else np.asarray(value)[index])
    if picked.ndim != 2 or picked.shape[1] != SEQ_LEN:
        raise DataError(
            f"prediction images: {key} must be [N, {SEQ_LEN}] (ARC's 30×30 canvas), got "
            f"{list(picked.shape)}; log_predictions_every applies to ARC data only"
        )
    return picked


def _caption(identifier: int | None, row: int, labels: np.ndarray, preds: np.ndarray) -> str:
    known = labels != -100
    right = int(((preds == labels) & known).sum())
    total = int(known.sum())
    verdict = "exact" if right == total else f"wrong, {right}/{total} cells"
    where = f"row {row}" if identifier is None else f"puzzle {identifier}, row {row}"
    return f"{where}: {verdict}"


def prediction_panels(
    batch: Mapping[str, Any],
    outputs: Mapping[str, Any],
    rows: np.ndarray,
    crop_to_content: bool,
) -> tuple[list[np.ndarray], list[str]]:
    """Panels (``panel_image``) and captions of ``rows`` of a batch.

    ``batch``/``outputs`` hold ``inputs``, ``labels`` and ``preds`` [B, 900] (tensors or
    arrays; ``outputs`` wins for a key in both) and optionally ``puzzle_identifiers`` [B]. A
    caption reads ``"puzzle 17, row 3: exact"`` or ``"...: wrong, 95/98 cells"``, counting the
    labelled cells (label ≠ -100) the prediction gets right.
    """
    merged = {**batch, **outputs}
    rows = np.asarray(rows, dtype=np.int64)
    inputs, labels, preds = (_rows_of(merged, k, rows) for k in ("inputs", "labels", "preds"))
    ids = None
    if "puzzle_identifiers" in merged:
        ids = _numpy(merged["puzzle_identifiers"]).reshape(-1)[rows]
    panels, captions = [], []
    for j, row in enumerate(rows):
        panels.append(panel_image(inputs[j], labels[j], preds[j], crop_to_content))
        identifier = None if ids is None else int(ids[j])
        captions.append(_caption(identifier, int(row), labels[j], preds[j]))
    return panels, captions


def log_predictions(
    logger: RunLogger,
    key: str,
    batch: Mapping[str, Any],
    outputs: Mapping[str, Any],
    step: int,
    max_samples: int = 32,
    crop: bool = True,
) -> int:
    """Log the first ``max_samples`` real rows of a batch (``select_rows``) as
    ``input | target | prediction`` panels under ``key`` at ``step``; returns how many.

    ``batch``: ``inputs``, ``labels`` [B, 900] and ``puzzle_identifiers`` [B]; ``outputs``:
    ``preds`` [B, 900] (the model's argmax tokens). Nothing is logged when no row is real.
    """
    sample = PredictionSample(max_samples, crop)
    sample.add(batch, outputs)
    return sample.log(logger, key, step)


class PredictionSample:
    """The first ``max_samples`` real rows over several batches (an evaluation's), logged at
    once: ``add`` each batch, then ``log``. Only the panels are kept, not the tensors."""

    def __init__(self, max_samples: int, crop: bool = True) -> None:
        if max_samples < 0:
            raise ValueError(f"log_predictions_max_samples must be >= 0, got {max_samples}")
        self.max_samples = max_samples
        self.crop = crop
        self.panels: list[np.ndarray] = []
        self.captions: list[str] = []

    def add(self, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Keep the batch's first real rows while fewer than ``max_samples`` are kept."""
        room = self.max_samples - len(self.panels)
        if room <= 0:
            return
        rows = select_rows(batch, outputs, room)
        if rows.size:
            panels, captions = prediction_panels(batch, outputs, rows, self.crop)
            self.panels += panels
            self.captions += captions

    def log(self, logger: RunLogger, key: str, step: int) -> int:
        """Send the kept panels under ``key`` at ``step`` (nothing when none); returns how many."""
        if self.panels:
            logger.log_images(key, self.panels, self.captions, step)
        return len(self.panels)


def log_step_curve(
    logger: RunLogger,
    key: str,
    exact_by_step: Sequence[float],
    step: int,
    more: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Log exact accuracy against the ACT step the answer is taken at, as a curve under
    ``key`` at training step ``step``.

    ``exact_by_step[t]``: the accuracy with the answer of ACT step t + 1 (x = 1..T, named
    ``"ACT step"``), series ``"exact"``; ``more`` adds series of the same length (e.g.
    ``pass@1`` by step from ``tracing.per_step.per_step_results``).
    """
    if not exact_by_step:
        raise ValueError("exact_by_step is empty: give one accuracy per ACT step")
    xs = [float(t) for t in range(1, len(exact_by_step) + 1)]
    logger.log_curve(key, xs, {"exact": exact_by_step, **(more or {})}, step, "ACT step")


class StepExactCurve:
    """Exact accuracy by ACT step over the batches of an evaluation, for ``log_step_curve``.

    Per batch, call ``update`` once per rollout step in order, with that step's per-row
    ``exact`` [B] bool (the loss head's ``row_metrics["exact_accuracy"]``), ``has_labels`` [B]
    bool and ``newly_halted`` [B] bool (``training.rollout.RolloutStep``), then ``end_batch``.
    A slot's answer is frozen once it halts (later steps of its slot belong to a restart), and
    a rollout shorter than ``steps`` (halting at evaluation) keeps its answers to the end.
    ``sums`` are counts to add over ranks (the same keys on every rank); ``curve`` turns the
    added counts into ``steps`` accuracies (0 when nothing was labelled).
    """

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        self._hits: torch.Tensor | None = None  # [steps] int64
        self._count: torch.Tensor | None = None
        self._answer: torch.Tensor | None = None  # [B] bool, this batch's current answers
        self._frozen: torch.Tensor | None = None
        self._labelled: torch.Tensor | None = None
        self._t = 0

    def update(
        self, exact: torch.Tensor, has_labels: torch.Tensor, newly_halted: torch.Tensor
    ) -> None:
        """Record one rollout step of the current batch."""
        if self._t >= self.steps:
            raise ValueError(f"a rollout ran more than {self.steps} ACT steps")
        exact, has_labels = exact.bool(), has_labels.bool()
        if self._hits is None or self._count is None:
            self._hits = torch.zeros(self.steps, dtype=torch.int64, device=exact.device)
            self._count = torch.zeros((), dtype=torch.int64, device=exact.device)
        if self._answer is None or self._frozen is None or self._labelled is None:
            self._answer, self._frozen = exact, torch.zeros_like(exact)
            self._labelled = has_labels
            self._count += has_labels.sum()
        self._answer = torch.where(self._frozen, self._answer, exact)
        self._hits[self._t] += (self._answer & self._labelled).sum()
        self._frozen = self._frozen | newly_halted.bool()
        self._t += 1

    def end_batch(self) -> None:
        """Close the current batch: its last answers count for the steps it did not run."""
        if self._answer is not None and self._labelled is not None and self._hits is not None:
            self._hits[self._t :] += (self._answer & self._labelled).sum()
        self._answer = self._frozen = self._labelled = None
        self._t = 0

    def sums(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``{"count": labelled rows, "exact_001": hits at step 1, ...}`` as int64 scalars."""
        if self._answer is not None:
            raise RuntimeError("StepExactCurve.sums before end_batch of the last batch")
        hits = self._hits if self._hits is not None else torch.zeros(self.steps, dtype=torch.int64)
        count = self._count if self._count is not None else torch.zeros((), dtype=torch.int64)
        out = {"count": count.to(device)}
        out.update({f"exact_{t + 1:03d}": hits[t].to(device) for t in range(self.steps)})
        return out

    def curve(self, reduced: Mapping[str, float]) -> list[float]:
        """``exact_by_step`` from ``sums`` added over ranks (e.g. ``sum_over_ranks``)."""
        count = float(reduced["count"])
        hits = [float(reduced[f"exact_{t + 1:03d}"]) for t in range(self.steps)]
        return [h / count if count > 0 else 0.0 for h in hits]
