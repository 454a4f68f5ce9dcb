"""The trace viewer: one self-contained HTML page that browses a ``trm-trace/v1`` trace folder.

``python -m tracing.viewer traces/ -o viewer.html`` validates the folder (``index.json``, its
shards, every line) and writes a page that works from ``file://`` with no server and no network:
all script and style are inline, and the data rides along as ``<script type="application/json">``
chunks, one per record, which the page parses only when that record is shown (``fetch`` is
refused for ``file://`` pages).

Grids repeat heavily across ACT steps, H-cycles and L probes, so each record is packed with its
own grid table: every distinct grid once, either as its compact string or as the cells that
differ from an earlier grid of the same shape, and every step refers to grids by position.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dataset.common import DataError, run_cli
from utils.atomic import write_text_atomically

INDEX_SCHEMA = "trm-trace-index/v1"
RECORD_SCHEMA = "trm-trace/v1"
_REMEDY = "write the trace again (evaluate.py trace.enabled=True trace.out=...)"
_GRID_RE = re.compile(r"[0-9]+(\|[0-9]+)*")
# Per-step numbers the page shows; stored columnwise so each key is written once per record.
_STEP_FLOATS = ("q_halt", "q_continue", "halt_prob", "h_cos_dist", "l_cos_dist")
_STEP_FLOATS += ("dz_rel_h", "dz_rel_l", "token_acc")
_STEP_OTHERS = ("would_halt", "cells_changed", "exact")
_SUMMARY_KEYS = ("first_halt_step", "first_correct_step", "final_exact", "solved_then_lost")


@dataclass(frozen=True)
class Trace:
    """A validated trace folder: ``index`` is ``index.json`` as parsed, ``records[i]`` the shard
    line of index record ``i`` (``records[i]["id"] == i``)."""

    folder: Path
    index: dict[str, Any]
    records: list[dict[str, Any]]


def _fail(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}; {_REMEDY}")


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise _fail(where, f"missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; a flag where a count belongs is a malformed trace.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(where, f"field {key!r} is a bool, expected {kind}")
    if not isinstance(value, kind):
        raise _fail(where, f"field {key!r} is {type(value).__name__}, expected {kind}")
    return value


def check_grid(value: Any, where: str) -> None:
    """Raise ``DataError`` unless ``value`` is a compact grid: rows of digits of equal length
    joined by ``|`` (``"012|340"`` is 2×3), or ``""`` for an empty grid."""
    if not isinstance(value, str):
        raise _fail(where, f"grid is {type(value).__name__}, expected a string like '012|340'")
    if value == "":
        return
    if not _GRID_RE.fullmatch(value):
        raise _fail(where, f"grid {value[:40]!r} is not rows of digits joined by '|'")
    # Rows of equal width w put a "|" at every (w + 1)-th character and nowhere else.
    w = value.find("|") if "|" in value else len(value)
    pipes = value[w :: w + 1]
    if (len(value) + 1) % (w + 1) or not pipes.count("|") == len(pipes) == value.count("|"):
        raise _fail(where, f"grid {value[:40]!r} has rows of different lengths")


def _check_index(index: Any, where: str) -> None:
    if not isinstance(index, dict):
        raise _fail(where, "expected a JSON object")
    schema = index.get("schema")
    if schema != INDEX_SCHEMA:
        raise DataError(
            f"{where}: schema {schema!r} is not {INDEX_SCHEMA!r}, the version this viewer reads; "
            "use the viewer of the version that wrote the trace, or write the trace again"
        )
    for key in ("halt_max_steps", "H_cycles", "L_cycles"):
        if _require(index, key, int, where) < 1:
            raise _fail(where, f"{key} must be at least 1")
    _require(index, "run", dict, where)
    shards = _require(index, "shards", list, where)
    if not all(isinstance(s, str) and s and "/" not in s and "\\" not in s for s in shards):
        raise _fail(where, "'shards' must list file names inside the trace folder")
    _require(index, "perturbations", list, where)
    records = _require(index, "records", list, where)
    seen: dict[tuple[Any, ...], int] = {}
    for i, entry in enumerate(records):
        at = f"{where} records[{i}]"
        if not isinstance(entry, dict):
            raise _fail(at, "expected a JSON object")
        if _require(entry, "id", int, at) != i:
            raise _fail(at, f"id is {entry['id']}, expected its position {i}")
        if _require(entry, "shard", str, at) not in shards:
            raise _fail(at, f"shard {entry['shard']!r} is not listed in 'shards'")
        _require(entry, "line", int, at)
        for key in ("puzzle_id", "aug", "variant"):
            _require(entry, key, str, at)
        _require(entry, "test_index", int, at)
        key = (entry["puzzle_id"], entry["test_index"], entry["aug"], entry["variant"])
        if key in seen:
            raise _fail(at, f"repeats records[{seen[key]}] (same puzzle, test, aug and variant)")
        seen[key] = i
    if "per_step" in index and not isinstance(index["per_step"], dict | None):
        raise _fail(where, "'per_step' must be an object")


def _check_record(record: Any, where: str, halt_max_steps: int, H_cycles: int) -> None:
    if not isinstance(record, dict):
        raise _fail(where, "expected a JSON object")
    if record.get("schema") != RECORD_SCHEMA:
        raise _fail(where, f"schema {record.get('schema')!r} is not {RECORD_SCHEMA!r}")
    _require(record, "id", int, where)
    demos = _require(record, "demos", list, where)
    for k, pair in enumerate(demos):
        if not isinstance(pair, dict):
            raise _fail(where, f"demos[{k}] is not an object with 'input' and 'output'")
        check_grid(pair.get("input"), f"{where} demos[{k}].input")
        check_grid(pair.get("output"), f"{where} demos[{k}].output")
    check_grid(record.get("input"), f"{where} input")
    if record.get("target") is not None:
        check_grid(record["target"], f"{where} target")
    steps = _require(record, "steps", list, where)
    if len(steps) != halt_max_steps:
        raise _fail(where, f"{len(steps)} steps, index.json says halt_max_steps={halt_max_steps}")
    for t, step in enumerate(steps, start=1):
        at = f"{where} steps[{t - 1}]"
        if not isinstance(step, dict):
            raise _fail(at, "expected a JSON object")
        if _require(step, "act_step", int, at) != t:
            raise _fail(at, f"act_step is {step['act_step']}, expected {t}")
        check_grid(step.get("pred"), f"{at} pred")
        _require(step, "q_halt", int | float, at)
        cycles = _require(step, "h_cycles", list, at)
        if len(cycles) not in (0, H_cycles):
            raise _fail(at, f"{len(cycles)} h_cycles, index.json says H_cycles={H_cycles}")
        for h, cycle in enumerate(cycles):
            if not isinstance(cycle, dict):
                raise _fail(f"{at} h_cycles[{h}]", "expected a JSON object")
            check_grid(cycle.get("pred"), f"{at} h_cycles[{h}].pred")
            for k, probe in enumerate(cycle.get("l_probes") or []):
                check_grid(probe, f"{at} h_cycles[{h}].l_probes[{k}]")


def load_trace(folder: Path) -> Trace:
    """Read and validate a trace folder; raise ``DataError`` naming the file, line and fix.

    Checks ``index.json`` (present, JSON, the known schema version, its records consistent), that
    every listed shard exists, and that every shard line parses, has the record schema, matches
    the index entry that points at it, and holds ``halt_max_steps`` well-formed steps.
    """
    folder = Path(folder)
    index_path = folder / "index.json"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such trace folder; pass the folder that holds index.json")
    if not index_path.is_file():
        raise DataError(f"{index_path}: not found; pass a trace folder written with trace.out=...")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(str(index_path), f"not valid JSON ({e})") from None
    _check_index(index, str(index_path))
    H, H_cycles = index["halt_max_steps"], index["H_cycles"]
    wanted: dict[tuple[str, int], int] = {}
    for entry in index["records"]:
        wanted[(entry["shard"], entry["line"])] = entry["id"]
    records: list[dict[str, Any] | None] = [None] * len(index["records"])
    for shard in index["shards"]:
        path = folder / shard
        if not path.is_file():
            raise DataError(
                f"{path}: listed in {index_path} but missing; copy the whole trace folder"
            )
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                where = f"{path} line {line_no + 1}"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _fail(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
                _check_record(record, where, H, H_cycles)
                expected = wanted.get((shard, line_no))
                if expected is None:
                    raise _fail(where, "no index.json record points at this line")
                if record["id"] != expected:
                    raise _fail(where, f"id is {record['id']}, index.json says {expected}")
                entry = index["records"][expected]
                for key in ("puzzle_id", "test_index", "aug", "variant"):
                    if record.get(key) != entry[key]:
                        raise _fail(
                            where, f"{key} is {record.get(key)!r}, index.json says {entry[key]!r}"
                        )
                records[expected] = record
    for i, record in enumerate(records):
        if record is None:
            entry = index["records"][i]
            raise _fail(
                str(folder / entry["shard"]),
                f"index.json record {i} points at line {entry['line'] + 1}, which is absent",
            )
    return Trace(folder=folder, index=index, records=records)  # type: ignore[arg-type]


def _number(x: Any) -> float | int | None:
    """A finite JSON number with 5 significant digits, or None (JSON has no NaN or infinity)."""
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.5g}")


class _GridTable:
    """A record's distinct grids in first-seen order; a grid of the same shape as the last one
    stored is kept as ``[base, [cell, colour, ...]]`` when that is shorter than its string."""

    def __init__(self) -> None:
        self.entries: list[str | list[Any]] = []
        self._position: dict[str, int] = {}
        self._last_by_shape: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def add(self, grid: str) -> int:
        if grid in self._position:
            return self._position[grid]
        rows = grid.split("|") if grid else []
        shape = (len(rows), len(rows[0]) if rows else 0)
        cells = np.frombuffer(grid.replace("|", "").encode("ascii"), dtype=np.uint8) - ord("0")
        entry: str | list[Any] = grid
        base = self._last_by_shape.get(shape)
        if base is not None and cells.size:
            changed = np.flatnonzero(cells != base[1])
            # A change costs about six characters (cell, colour, two commas), a cell one.
            if changed.size * 6 + 8 < len(grid):
                entry = [base[0], np.stack([changed, cells[changed]], axis=1).ravel().tolist()]
        position = len(self.entries)
        self.entries.append(entry)
        self._position[grid] = position
        self._last_by_shape[shape] = (position, cells)
        return position


def pack_record(record: dict[str, Any]) -> dict[str, Any]:
    """The page's form of one shard record: ``g`` the grid table, grids elsewhere as positions in
    it, step fields as columns over ``halt_max_steps`` (``s``) and H-cycle decodes as ``hc[t][h]
    = [pred, [probes]]``. Summary fields live in the page's index, not here."""
    table = _GridTable()
    demos = [[table.add(p["input"]), table.add(p["output"])] for p in record["demos"]]
    packed_input = table.add(record["input"])
    target = None if record.get("target") is None else table.add(record["target"])
    steps = record["steps"]
    preds: list[int] = []
    cycles: list[list[list[Any]]] = []
    # Sub-steps in the order the model visits them, so each grid is stored against its neighbour.
    for step in steps:
        cycles.append([])
        for c in step["h_cycles"]:
            probes = [table.add(p) for p in c.get("l_probes") or []]
            cycles[-1].append([table.add(c["pred"]), probes])
        preds.append(table.add(step["pred"]))
    columns: dict[str, list[Any]] = {"pred": preds}
    for key in _STEP_FLOATS:
        columns[key] = [_number(s.get(key)) for s in steps]
    for key in _STEP_OTHERS:
        columns[key] = [s.get(key) for s in steps]
    return {
        "g": table.entries,
        "demos": demos,
        "input": packed_input,
        "target": target,
        "perturbation": record.get("perturbation"),
        "s": columns,
        "hc": cycles,
    }


def page_index(trace: Trace) -> dict[str, Any]:
    """The page's list data: run facts, per-step results and one item per (puzzle, test index,
    augmentation), in the order of their first record in ``index.json``.

    An item's ``variants`` maps each variant tag to its record id (clean first, then the
    perturbations in ``index.json``'s order) and ``summaries`` each tag to that record's summary;
    the item's own summary fields, which the filters read, are the clean record's, and
    ``recovered`` says whether any perturbed variant recovered (None without one).
    """
    index = trace.index
    rank = {p.get("tag"): i for i, p in enumerate(index["perturbations"])}
    items: dict[tuple[str, int, str], dict[str, Any]] = {}
    for entry in index["records"]:
        key = (entry["puzzle_id"], entry["test_index"], entry["aug"])
        item = items.setdefault(
            key,
            {"puzzle_id": key[0], "test_index": key[1], "aug": key[2], "variants": {}},
        )
        item["variants"][entry["variant"]] = entry["id"]
    # The writer's order (tasks in source order), not an alphabetical one.
    ordered = list(items.values())
    for item in ordered:
        item["variants"] = dict(
            sorted(
                item["variants"].items(),
                key=lambda kv: (kv[0] != "clean", rank.get(kv[0], len(rank))),
            )
        )
        item["summaries"] = {}
        for tag, rid in item["variants"].items():
            entry = index["records"][rid]
            item["summaries"][tag] = {k: entry.get(k) for k in (*_SUMMARY_KEYS, "recovered")}
        item.update(next(iter(item["summaries"].values())))
        flags = [v["recovered"] for t, v in item["summaries"].items() if t != "clean"]
        known = [bool(f) for f in flags if f is not None]
        item["recovered"] = any(known) if known else None
    return {
        "folder": trace.folder.name,
        "run": index["run"],
        "halt_max_steps": index["halt_max_steps"],
        "H_cycles": index["H_cycles"],
        "L_cycles": index["L_cycles"],
        "perturbations": index["perturbations"],
        "per_step": index.get("per_step"),
        "items": ordered,
    }


def _json_chunk(element_id: str, obj: Any) -> str:
    # "<" only occurs inside JSON strings, where \u003c reads back the same; no "</script>".
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>\n'


def _asset(name: str) -> str:
    return (resources.files("tracing") / "viewer_assets" / name).read_text(encoding="utf-8")


def render_html(trace: Trace) -> str:
    """The whole page as one string: template, inline style and script, and the data chunks
    ``trace-index`` (``page_index``) and ``rec-<id>`` (``pack_record``) for every record."""
    chunks = [_json_chunk("trace-index", page_index(trace))]
    chunks += [_json_chunk(f"rec-{r['id']}", pack_record(r)) for r in trace.records]
    title = f"TRM trace: {trace.folder.name}".replace("&", "&amp;").replace("<", "&lt;")
    page = _asset("viewer.html")
    for marker, text in (
        ("/*@STYLE@*/", _asset("viewer.css")),
        ("/*@SCRIPT@*/", _asset("viewer.js")),
        ("<!--@TITLE@-->", title),
        ("<!--@DATA@-->", "".join(chunks)),
    ):
        if marker not in page:
            raise RuntimeError(f"viewer.html lacks the marker {marker}")
        page = page.replace(marker, text, 1)
    return page


def write_viewer(folder: Path, out: Path, force: bool = False) -> Path:
    """Validate ``folder`` and write the page to ``out`` atomically; an existing ``out`` is kept
    (``DataError``) unless ``force``. Nothing is written when validation fails."""
    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"{out}: already exists; pass --force to replace it, or choose another -o")
    if out.exists() and not out.is_file():
        raise DataError(f"{out}: is not a file; choose another -o")
    trace = load_trace(Path(folder))
    write_text_atomically(out, render_html(trace))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tracing.viewer TRACE_DIR [-o viewer.html] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tracing.viewer",
        description="Write one self-contained HTML page (works from file://) browsing a trace.",
    )
    parser.add_argument("trace_dir", type=Path, help="folder holding index.json and its shards")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="the page (default TRACE_DIR/viewer.html)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    out = args.output if args.output is not None else args.trace_dir / "viewer.html"
    written = write_viewer(args.trace_dir, out, force=args.force)
    size_mb = written.stat().st_size / 2**20
    print(f"wrote {written} ({size_mb:.1f} MiB); open it in a browser, no server needed")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
