"""Prediction panels of ARC rows and per-step curves, through every logger."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.common import DataError
from evaluators.prediction_images import (
    EOS_COLOUR,
    LINE_COLOUR,
    PAD_COLOUR,
    PredictionSample,
    StepExactCurve,
    log_predictions,
    log_step_curve,
    panel_image,
    prediction_panels,
    select_rows,
)
from utils.logging import (
    CURVE_PLOT_BOX,
    CURVE_SIZE,
    JsonlLogger,
    MultiLogger,
    NullLogger,
    RunLogger,
    WandbLogger,
    build_logger,
)

# The ARC palette as published, independent of the module's table.
HEX = ["000000", "0074D9", "FF4136", "2ECC40", "FFDC00", "AAAAAA", "F012BE", "FF851B", "7FDBFF",
       "870C25"]  # fmt: skip
WHITE = (255, 255, 255)


def rgb(colour: int) -> tuple[int, int, int]:
    h = HEX[colour]
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def canvas(grid: list[list[int]], eos: bool = True, fill: int = 0) -> np.ndarray:
    """900 tokens: ``grid``'s colours (c + 2) at the top-left, EOS along its right and bottom
    edge, ``fill`` elsewhere."""
    out = np.full((30, 30), fill, dtype=np.int64)
    g = np.asarray(grid)
    r, c = g.shape
    out[:r, :c] = g + 2
    if eos:
        out[: r + 1, c] = 1
        out[r, : c + 1] = 1
    return out.reshape(900)


INPUT = [[1, 2, 3], [4, 5, 0]]  # 2×3
TARGET = [[6, 7], [8, 9], [0, 1]]  # 3×2
PRED = [[6, 7], [8, 9], [0, 2]]  # 3×2, last cell wrong


def arc_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Four rows: real, blank (id 0), real, real, no two panels alike (W&B stores equal images
    once); labels use -100 where the loader ignores."""
    inputs = np.stack([canvas(INPUT)] * 4)
    labels = np.stack([np.where(canvas(TARGET) == 0, -100, canvas(TARGET))] * 4)
    preds = np.stack([canvas(PRED, eos=False), canvas(TARGET), canvas(TARGET), canvas(PRED)])
    batch = {
        "inputs": torch.tensor(inputs, dtype=torch.int32),
        "labels": torch.tensor(labels, dtype=torch.int32),
        "puzzle_identifiers": torch.tensor([17, 0, 4, 9], dtype=torch.int32),
    }
    return batch, {"preds": torch.tensor(preds, dtype=torch.int64)}


def cell_px(image: np.ndarray, row: int, col: int, x0: int = 0) -> tuple[int, int, int]:
    """The centre pixel of cell (row, col) of a grid drawn at column ``x0`` (8 px cells, 1 px
    lines: cell i spans pixels 1 + 9i .. 8 + 9i)."""
    y, x = 1 + 9 * row + 4, x0 + 1 + 9 * col + 4
    return tuple(int(v) for v in image[y, x])  # type: ignore[return-value]


def test_cropped_panel_pixels() -> None:
    target = np.where(canvas(TARGET) == 0, -100, canvas(TARGET))
    panel = panel_image(canvas(INPUT), target, canvas(PRED, eos=False), crop_to_content=True)
    # Grids of 2×3 (28×19 px), 3×2 (19×28 px) and 3×2, 16 px apart, top-aligned.
    assert panel.shape == (28, 28 + 16 + 19 + 16 + 19, 3) and panel.dtype == np.uint8
    for r, row in enumerate(INPUT):
        for c, colour in enumerate(row):
            assert cell_px(panel, r, c) == rgb(colour)
    for x0, grid in ((44, TARGET), (79, PRED)):
        for r, row in enumerate(grid):
            for c, colour in enumerate(row):
                assert cell_px(panel, r, c, x0) == rgb(colour), (x0, r, c)
    # Lines around and between cells; the gaps and the space under the short input are blank.
    assert tuple(panel[0, 0]) == LINE_COLOUR and tuple(panel[9, 4]) == LINE_COLOUR
    assert tuple(panel[4, 9]) == LINE_COLOUR and tuple(panel[18, 27]) == LINE_COLOUR
    assert tuple(panel[4, 35]) == WHITE and tuple(panel[24, 4]) == WHITE
    assert tuple(panel[27, 44]) == LINE_COLOUR


def test_full_canvas_panel_draws_pad_and_eos() -> None:
    target = np.where(canvas(TARGET) == 0, -100, canvas(TARGET))
    panel = panel_image(canvas(INPUT), target, canvas(PRED, eos=False), crop_to_content=False)
    side = 30 * 8 + 31
    assert panel.shape == (side, 3 * side + 2 * 16, 3)
    assert len({PAD_COLOUR, EOS_COLOUR, LINE_COLOUR, WHITE, *map(rgb, range(10))}) == 14
    assert cell_px(panel, 1, 2) == rgb(0)
    assert cell_px(panel, 0, 3) == EOS_COLOUR and cell_px(panel, 2, 1) == EOS_COLOUR
    assert cell_px(panel, 29, 29) == PAD_COLOUR and cell_px(panel, 3, 0) == PAD_COLOUR
    x_target, x_pred = side + 16, 2 * (side + 16)
    assert cell_px(panel, 2, 1, x_target) == rgb(1)
    assert cell_px(panel, 3, 0, x_target) == EOS_COLOUR  # EOS is a label, -100 is PAD
    assert cell_px(panel, 10, 10, x_target) == PAD_COLOUR
    assert cell_px(panel, 2, 1, x_pred) == rgb(2) and cell_px(panel, 0, 2, x_pred) == PAD_COLOUR


def test_crop_is_the_evaluators() -> None:
    # A colour cell away from the origin is not content: the evaluator's crop is empty, drawn
    # as one PAD cell; the input keeps only the rectangle at the origin.
    stray = np.zeros(900, dtype=np.int64)
    stray[5 * 30 + 5] = 4
    panel = panel_image(canvas(INPUT), canvas(TARGET), stray, crop_to_content=True)
    assert panel.shape == (28, 28 + 16 + 19 + 16 + 10, 3)
    assert cell_px(panel, 0, 0, 79) == PAD_COLOUR


def test_select_rows_skips_blank_and_caps() -> None:
    ids = torch.tensor([0, 3, 0, 5, 7, 9])
    batch = {"puzzle_identifiers": ids, "inputs": torch.zeros(6, 900)}
    assert select_rows(batch, {}, 2).tolist() == [1, 3]
    assert select_rows(batch, {}, 10).tolist() == [1, 3, 4, 5]
    assert select_rows(batch, {}, 0).tolist() == []
    assert select_rows({"puzzle_identifiers": torch.zeros(4)}, {}, 3).tolist() == []
    assert select_rows({"inputs": np.zeros((3, 900))}, {}, 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="max_samples"):
        select_rows(batch, {}, -1)


def test_captions_and_shape_errors() -> None:
    batch, outputs = arc_batch()
    panels, captions = prediction_panels(batch, outputs, np.array([0, 2, 3]), True)
    # 6 colour cells and 6 EOS labels (4 down the right edge, 3 along the bottom, the corner
    # counted once); row 0 gets 5 colours right and no EOS, row 3 the EOS too.
    assert captions == [
        "puzzle 17, row 0: wrong, 5/12 cells",
        "puzzle 4, row 2: exact",
        "puzzle 9, row 3: wrong, 11/12 cells",
    ]
    assert len(panels) == 3
    with pytest.raises(DataError, match="ARC"):
        prediction_panels({**batch, "inputs": torch.zeros(4, 81)}, outputs, np.array([0]), True)
    with pytest.raises(KeyError, match="labels"):
        prediction_panels({"inputs": batch["inputs"]}, outputs, np.array([0]), True)


class Recorder:
    """A logger that keeps what it is sent."""

    def __init__(self) -> None:
        self.images: list[tuple[str, list[np.ndarray], list[str], int]] = []
        self.curves: list[tuple[str, list[float], dict[str, list[float]], int, str]] = []

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, object]) -> None: ...

    def log_images(
        self, key: str, images: Sequence[np.ndarray], captions: Sequence[str], step: int
    ) -> None:
        self.images.append((key, list(images), list(captions), step))

    def log_curve(
        self,
        key: str,
        xs: Sequence[float],
        ys: Mapping[str, Sequence[float]],
        step: int,
        x_name: str,
    ) -> None:
        self.curves.append((key, list(xs), {k: list(v) for k, v in ys.items()}, step, x_name))

    def finish(self) -> None: ...


def test_multi_logger_fans_out_and_sample_caps() -> None:
    a, b = Recorder(), Recorder()
    logger = MultiLogger([NullLogger(), a, b])
    for candidate in (logger, NullLogger(), a):
        assert isinstance(candidate, RunLogger)
    batch, outputs = arc_batch()
    assert log_predictions(logger, "train/predictions", batch, outputs, 3, max_samples=2) == 2
    sample = PredictionSample(max_samples=4)
    for _ in range(3):
        sample.add(batch, outputs)  # 3 real rows per batch: 3, then 1, then none
    assert sample.log(logger, "eval/predictions", 5) == 4
    log_step_curve(logger, "eval/exact_by_step", [0.25, 0.5], 5, more={"pass@1": [0.5, 0.75]})
    for rec in (a, b):
        assert [(k, len(imgs), step) for k, imgs, _, step in rec.images] == [
            ("train/predictions", 2, 3),
            ("eval/predictions", 4, 5),
        ]
        assert rec.images[1][2][-1] == "puzzle 17, row 0: wrong, 5/12 cells"
        assert rec.curves == [
            (
                "eval/exact_by_step",
                [1.0, 2.0],
                {"exact": [0.25, 0.5], "pass@1": [0.5, 0.75]},
                5,
                "ACT step",
            )
        ]
    blank = {**batch, "puzzle_identifiers": torch.zeros(4, dtype=torch.int32)}
    assert log_predictions(a, "k", blank, outputs, 9) == 0 and len(a.images) == 2


def test_jsonl_logger_writes_pngs_and_curves(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    batch, outputs = arc_batch()
    assert log_predictions(logger, "eval/predictions", batch, outputs, 7, max_samples=2) == 2
    log_step_curve(logger, "eval/exact_by_step", [1.0, 1.0, 1.0], 7, more={"low": [0.0] * 3})
    logger.log({"x": 1.0}, step=7)
    logger.finish()

    expected, captions = prediction_panels(batch, outputs, np.array([0, 2]), True)
    folder = run_dir / "predictions"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "curves",
        "metrics.jsonl",
        "predictions",
    ]
    for i, panel in enumerate(expected):
        decoded = np.asarray(Image.open(folder / f"eval_predictions_step7_{i}.png"))
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, panel)
    index = json.loads((folder / "eval_predictions_step7.json").read_text())
    assert index["images"] == [
        {"file": "eval_predictions_step7_0.png", "caption": captions[0]},
        {"file": "eval_predictions_step7_1.png", "caption": captions[1]},
    ]

    curve = json.loads((run_dir / "curves" / "eval_exact_by_step_step7.json").read_text())
    assert curve == {
        "key": "eval/exact_by_step",
        "step": 7,
        "x_name": "ACT step",
        "xs": [1.0, 2.0, 3.0],
        "ys": {"exact": [1.0, 1.0, 1.0], "low": [0.0, 0.0, 0.0]},
    }
    plot = np.asarray(Image.open(run_dir / "curves" / "eval_exact_by_step_step7.png"))
    assert plot.shape == (CURVE_SIZE[1], CURVE_SIZE[0], 3)
    left, top, right, bottom = CURVE_PLOT_BOX
    middle = (left + right) // 2
    # Accuracy 1 on the plot's top edge in the first series colour, 0 on its bottom edge in
    # the second; the middle of the plot is empty.
    assert tuple(plot[top, middle]) == rgb(1) and tuple(plot[bottom, middle]) == rgb(2)
    assert tuple(plot[(top + bottom) // 2 + 3, middle]) == WHITE


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """W&B offline with no credentials, every home/cache folder in tmp_path, torn down after."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    import wandb

    wandb.teardown()


def test_wandb_offline_keeps_images_and_tables(wandb_offline: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    logger = build_logger(
        "wandb", project="P", run_name="M a-b", config={}, run_dir=run_dir, is_main=True
    )
    assert isinstance(logger, MultiLogger)
    assert [type(inner) for inner in logger.loggers] == [JsonlLogger, WandbLogger]
    batch, outputs = arc_batch()
    logger.log({"train/lm_loss": 1.0}, step=1)
    assert log_predictions(logger, "eval/predictions", batch, outputs, 2, crop=False) == 3
    log_step_curve(logger, "eval/exact_by_step", [0.25, 0.5, 0.75], 2)
    logger.finish()

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    pngs = sorted((media / "images").rglob("*.png"))
    assert len(pngs) == 3
    expected, _ = prediction_panels(batch, outputs, np.array([0, 2, 3]), False)
    decoded = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    for panel in expected:
        assert any(np.array_equal(panel, d) for d in decoded)
    (data,) = (media / "table").rglob("exact_by_step_data_*.table.json")
    table = json.loads(data.read_text())
    assert table["columns"] == ["ACT step", "exact"]
    assert table["data"] == [[1.0, 0.25], [2.0, 0.5], [3.0, 0.75]]
    (chart,) = (media / "table").rglob("exact_by_step_table_*.table.json")
    assert json.loads(chart.read_text())["data"] == [
        [1.0, "exact", 0.25],
        [2.0, "exact", 0.5],
        [3.0, "exact", 0.75],
    ]
    # The JSON-lines side of the same run keeps its PNGs next to metrics.jsonl.
    assert len(list((run_dir / "predictions").glob("eval_predictions_step2_*.png"))) == 3


def test_step_exact_curve_freezes_halted_answers() -> None:
    curve = StepExactCurve(steps=4)
    # Batch 1, 3 rows over 4 steps; row 2 has no labels, row 1 halts at step 2.
    T, F = True, False
    exact = [[F, T, T], [T, F, T], [T, T, T], [F, T, T]]
    halted = [[F, F, F], [F, T, F], [F, F, F], [T, F, T]]
    for e, h in zip(exact, halted, strict=True):
        curve.update(torch.tensor(e), torch.tensor([True, True, False]), torch.tensor(h))
    curve.end_batch()
    # Batch 2, 1 row whose rollout stops after 2 steps (halting at evaluation).
    curve.update(torch.tensor([False]), torch.tensor([True]), torch.tensor([False]))
    curve.update(torch.tensor([True]), torch.tensor([True]), torch.tensor([True]))
    curve.end_batch()
    sums = curve.sums()
    assert sorted(sums) == ["count", "exact_001", "exact_002", "exact_003", "exact_004"]
    # Step by step: row 0 F T T F, row 1 T F (frozen F), batch-2 row F T (kept T).
    assert {k: int(v) for k, v in sums.items()} == {
        "count": 3, "exact_001": 1, "exact_002": 2, "exact_003": 2, "exact_004": 1,
    }  # fmt: skip
    reduced = {k: 2.0 * float(v) for k, v in sums.items()}  # two ranks alike
    assert curve.curve(reduced) == [1 / 3, 2 / 3, 2 / 3, 1 / 3]
    assert StepExactCurve(2).curve(StepExactCurve(2).sums()) == [0.0, 0.0]
    for _ in range(4):
        curve.update(torch.tensor([True]), torch.tensor([True]), torch.tensor([False]))
    with pytest.raises(ValueError, match="more than 4"):
        curve.update(torch.tensor([True]), torch.tensor([True]), torch.tensor([False]))


def test_training_run_logs_prediction_views(arc_data: Path, tmp_path: Path) -> None:
    from training.config import load_pretrain_config
    from training.loop import run_training
    from utils.config import compose
    from utils.distributed import DistInfo

    run_dir = tmp_path / "run"
    overrides = [
        "+experiment=tiny_cpu", "logger=none", "data_workers=0", "global_batch_size=8",
        "arch=trm", "arch.hidden_size=32", "arch.H_cycles=2", "arch.L_cycles=1",
        "arch.halt_max_steps=3", "evaluators=[]", "max_steps=3", f"data_paths=[{arc_data}]",
        "log_predictions_every=2", "log_predictions_max_samples=3", "log_predictions_crop=False",
    ]  # fmt: skip
    config = load_pretrain_config(compose(overrides=overrides))
    logger = build_logger("none", project="p", run_name="r", config={}, run_dir=run_dir,
                          is_main=True)  # fmt: skip
    outcome = run_training(config, DistInfo(), logger=logger)
    logger.finish()
    folder = run_dir / "predictions"
    assert sorted(p.name for p in folder.glob("train_*.png")) == [
        f"train_predictions_step2_{i}.png" for i in range(3)
    ]
    evals = sorted(folder.glob("eval_predictions_step3_*.png"))
    assert len(evals) == 3
    assert np.asarray(Image.open(evals[0])).shape == (271, 3 * 271 + 32, 3)
    curve = json.loads((run_dir / "curves" / "eval_exact_by_step_step3.json").read_text())
    assert curve["xs"] == [1.0, 2.0, 3.0]
    assert curve["ys"]["exact"][-1] == outcome.eval_metrics["all/exact_accuracy"]
