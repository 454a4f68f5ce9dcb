"""The trace viewer: folder validation, the embedded data, and the page driven in headless Chromium.

The traces here are synthetic, written by ``write_synthetic_trace`` straight from the
``trm-trace/v1`` format, so the viewer is checked against the format and not against the code
that records real traces. The ``browser`` tests need Debian's ``chromium`` and
``chromium-driver`` (``.ci/run`` installs them; ``TRM_CHROMIUM`` and ``TRM_CHROMEDRIVER`` point
elsewhere) and Selenium; without them they fail with the install command, unless
``TRM_SKIP_BROWSER=1`` asks to skip them.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataset.common import DataError
from tracing import viewer

REPO = Path(__file__).resolve().parents[1]
PERTURB_TAG = "z_L@5"
PERTURB_STEP = 5


def _differ(a: Any, b: Any) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def _grid(cells: list[int], h: int, w: int) -> str:
    return "|".join("".join(str(c) for c in cells[r * w : (r + 1) * w]) for r in range(h))


def _canvas(h: int, w: int, rng: random.Random) -> list[int]:
    """An ARC-looking grid: a black canvas with one to three filled rectangles."""
    cells = [0] * (h * w)
    for _ in range(rng.randint(1, 3)):
        r0, c0 = rng.randrange(h), rng.randrange(w)
        r1, c1 = rng.randint(r0, h - 1), rng.randint(c0, w - 1)
        colour = rng.randint(1, 9)
        for r in range(r0, r1 + 1):
            cells[r * w + c0 : r * w + c1 + 1] = [colour] * (c1 - c0 + 1)
    return cells


def _recolour(cells: list[int]) -> list[int]:
    """The synthetic task's rule: every colour c > 0 becomes c % 9 + 1."""
    return [c % 9 + 1 if c else 0 for c in cells]


def _wrong_counts(kind: int, n: int, H: int, rng: random.Random) -> list[int]:
    """Cells wrong at each ACT step: solved from a step on (0, 3), never solved (1), or solved at
    steps 3-5 and lost afterwards (2)."""
    start = max(1, n // 3)
    if kind == 1:
        floor = rng.randint(1, max(1, n // 6))
        return [max(floor, round(start * (1 - t / 6))) for t in range(1, H + 1)]
    solve_at = {0: rng.randint(2, min(5, H)), 2: 3, 3: rng.randint(H // 2 + 1, H)}[kind]
    counts = [max(0, round(start * (1 - t / solve_at))) for t in range(1, H + 1)]
    if kind == 2:
        counts = [c if t <= 5 else min(n, t - 5) for t, c in enumerate(counts, start=1)]
    return counts


def _perturbed_counts(clean: list[int], kind: int, n: int) -> list[int]:
    """The perturbed run equals the clean one before ``PERTURB_STEP``; the noise adds wrong cells
    for three steps, after which the run is back on its clean course, except that a never-solved
    puzzle (kind 1) lands on the right answer."""
    out = list(clean)
    for t in range(PERTURB_STEP, len(clean) + 1):
        k = t - PERTURB_STEP
        if k < 3:
            out[t - 1] = min(n, clean[t - 1] + n // 3 + 1)
        elif kind == 1:
            out[t - 1] = 0
    return out


def _decode(target: list[int], perm: list[int], wrong: int) -> list[int]:
    """``target`` with the cells ``perm[:wrong]`` wrong: a shape keeps its input colour (the rule
    not yet applied), the background turns grey."""
    cells = list(target)
    for pos in perm[:wrong]:
        cells[pos] = (cells[pos] - 2) % 9 + 1 if cells[pos] else 5
    return cells


def _record(
    rid: int,
    pid: str,
    demos: list[dict[str, str]],
    inp: str,
    target: list[int],
    shape: tuple,
    counts: list[int],
    perm: list[int],
    H_cycles: int,
    L_cycles: int,
    probes: bool,
    variant: str,
    rng: random.Random,
) -> dict[str, Any]:
    h, w = shape
    n = h * w
    steps: list[dict[str, Any]] = []
    prev: list[int] | None = None
    prev_count = min(n, counts[0] + n // 4)
    sub = H_cycles * (L_cycles + 1)
    for t, count in enumerate(counts, start=1):
        pred = _decode(target, perm, count)
        # Sub-step j of the step walks the wrong-cell count from the previous step's to this one's.
        walk = [
            _grid(_decode(target, perm, round(prev_count + (count - prev_count) * j / sub)), h, w)
            for j in range(sub + 1)
        ]
        cycles = []
        for c in range(H_cycles):
            base = c * (L_cycles + 1)
            cycles.append(
                {
                    "pred": walk[base + L_cycles + 1],
                    "l_probes": [walk[base + j + 1] for j in range(L_cycles)] if probes else [],
                }
            )
        q_halt = (2.5 if count == 0 else -1.5 - count / n) + rng.uniform(-0.4, 0.4)
        steps.append(
            {
                "act_step": t,
                "pred": _grid(pred, h, w),
                "q_halt": q_halt,
                "q_continue": -q_halt + rng.uniform(-0.2, 0.2),
                "halt_prob": 1 / (1 + math.exp(-q_halt)),
                "would_halt": q_halt > 0,
                "h_cos_dist": None if t == 1 else 0.3 * math.exp(-t / 3) + rng.uniform(0, 0.01),
                "l_cos_dist": None if t == 1 else 0.4 * math.exp(-t / 4) + rng.uniform(0, 0.01),
                "dz_rel_h": None if t == 1 else 0.5 * math.exp(-t / 3),
                "dz_rel_l": None if t == 1 else 0.6 * math.exp(-t / 4),
                "cells_changed": None if prev is None else _differ(prev, pred),
                "token_acc": 1 - count / n,
                "exact": count == 0,
                "h_cycles": cycles,
            }
        )
        prev, prev_count = pred, count
    exact = [c == 0 for c in counts]
    halts = [s["would_halt"] for s in steps]
    first_correct = exact.index(True) + 1 if any(exact) else None
    return {
        "schema": "trm-trace/v1",
        "id": rid,
        "puzzle_id": pid,
        "test_index": 0,
        "aug": "identity",
        "demos": demos,
        "input": inp,
        "target": _grid(target, h, w),
        "variant": variant,
        "perturbation": None
        if variant == "clean"
        else {
            "tag": PERTURB_TAG,
            "step": PERTURB_STEP,
            "target": "z_L",
            "sigma_rel": 0.5,
            "seed": 0,
        },
        "steps": steps,
        "first_halt_step": halts.index(True) + 1 if any(halts) else None,
        "first_correct_step": first_correct,
        "final_exact": exact[-1],
        "solved_then_lost": first_correct is not None and not exact[-1],
    }


def write_synthetic_trace(
    folder: Path,
    n_puzzles: int,
    H: int = 16,
    H_cycles: int = 3,
    L_cycles: int = 6,
    probes: bool = True,
    perturb: bool = True,
    sizes: tuple[int, int] = (3, 8),
    shard_size: int = 50,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Write a ``trm-trace/v1`` folder of ``n_puzzles`` puzzles (ids ``p000``...) whose answers
    cycle through four kinds (solved early, never solved, solved then lost, solved late) and,
    with ``perturb``, a ``z_L@5`` variant of each; returns the shard records in id order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for p in range(n_puzzles):
        h, w = rng.randint(*sizes), rng.randint(*sizes)
        n = h * w
        source = _canvas(h, w, rng)
        target = _recolour(source)
        # Shapes go wrong first, as a model copying the input before it recolours would.
        shape = [i for i in range(n) if target[i]]
        background = [i for i in range(n) if not target[i]]
        perm = rng.sample(shape, len(shape)) + rng.sample(background, len(background))
        demos = []
        for _ in range(rng.randint(2, 3)):
            dh, dw = rng.randint(*sizes), rng.randint(*sizes)
            a = _canvas(dh, dw, rng)
            demos.append({"input": _grid(a, dh, dw), "output": _grid(_recolour(a), dh, dw)})
        inp = _grid(source, h, w)
        kind = p % 4
        counts = _wrong_counts(kind, n, H, rng)
        args = (demos, inp, target, (h, w))
        records.append(
            _record(
                len(records),
                f"p{p:03d}",
                *args,
                counts,
                perm,
                H_cycles,
                L_cycles,
                probes,
                "clean",
                rng,
            )
        )
        if perturb:
            records.append(
                _record(
                    len(records),
                    f"p{p:03d}",
                    *args,
                    _perturbed_counts(counts, kind, n),
                    perm,
                    H_cycles,
                    L_cycles,
                    probes,
                    PERTURB_TAG,
                    rng,
                )
            )
    clean_exact = {r["puzzle_id"]: r["final_exact"] for r in records if r["variant"] == "clean"}
    shards: list[str] = []
    entries = []
    for start in range(0, len(records), shard_size):
        name = f"shard_{len(shards):05d}.jsonl"
        shards.append(name)
        chunk = records[start : start + shard_size]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in chunk))
        for line, r in enumerate(chunk):
            entries.append(
                {
                    "id": r["id"],
                    "shard": name,
                    "line": line,
                    "puzzle_id": r["puzzle_id"],
                    "test_index": 0,
                    "aug": "identity",
                    "variant": r["variant"],
                    **{
                        k: r[k]
                        for k in (
                            "first_halt_step",
                            "first_correct_step",
                            "final_exact",
                            "solved_then_lost",
                        )
                    },
                    "recovered": None
                    if r["variant"] == "clean"
                    else bool(r["final_exact"] and not clean_exact[r["puzzle_id"]]),
                }
            )
    clean = [r for r in records if r["variant"] == "clean"]
    by_step = [sum(r["steps"][t]["exact"] for r in clean) / len(clean) for t in range(H)]
    index = {
        "schema": "trm-trace-index/v1",
        "run": {
            "checkpoint": "checkpoints/synthetic/step_100",
            "config_hash": "ab" * 32,
            "arch": "trm",
            "conditioner": "puzzle_embedding",
            "created": "2026-01-01T00:00:00Z",
        },
        "halt_max_steps": H,
        "H_cycles": H_cycles,
        "L_cycles": L_cycles,
        "shards": shards,
        "perturbations": [
            {"tag": PERTURB_TAG, "step": PERTURB_STEP, "target": "z_L", "sigma_rel": 0.5, "seed": 0}
        ]
        if perturb
        else [],
        "records": entries,
        "per_step": {
            "steps": list(range(1, H + 1)),
            "exact_by_step": by_step,
            "pass@1_by_step": by_step,
            "pass@2_by_step": by_step,
            "first_halt": {"exact": 0.5, "pass@1": 0.5, "pass@2": 0.5},
            "perturbations": {PERTURB_TAG: {"changed": 0.5, "recovered": 0.25, "lost": 0.0}}
            if perturb
            else {},
        },
    }
    (folder / "index.json").write_text(json.dumps(index))
    return records


# ---- validation (no browser) -------------------------------------------------------------------


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    folder = tmp_path / "traces"
    write_synthetic_trace(folder, 6, H=8, H_cycles=2, L_cycles=2, shard_size=5)
    return folder


def _edit_index(folder: Path, **changes: Any) -> None:
    index = json.loads((folder / "index.json").read_text())
    index.update(changes)
    (folder / "index.json").write_text(json.dumps(index))


def _edit_line(path: Path, line: int, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line] = new
    path.write_text("".join(lines))


def _error(folder: Path) -> str:
    with pytest.raises(DataError) as e:
        viewer.load_trace(folder)
    return str(e.value)


@pytest.mark.parametrize("grid", ["", "0", "01|23", "012|345|678", "0|1|2", "0123456789"])
def test_grid_accepted(grid: str) -> None:
    viewer.check_grid(grid, "x")


@pytest.mark.parametrize(
    "grid", ["01|2", "0|12", "01|23|4", "0||1", "|", "01|2|345", "0|123|4|5", "0a", " 0", [[0]]]
)
def test_grid_refused(grid: Any) -> None:
    with pytest.raises(DataError, match=r"^x: grid"):
        viewer.check_grid(grid, "x")


def test_valid_trace_loads_in_id_order(trace: Path) -> None:
    loaded = viewer.load_trace(trace)
    assert [r["id"] for r in loaded.records] == list(range(12))
    assert [r["variant"] for r in loaded.records[:2]] == ["clean", PERTURB_TAG]


def test_missing_index(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "index.json: not found" in _error(tmp_path / "empty")
    assert "no such trace folder" in _error(tmp_path / "absent")


def test_unknown_schema_version(trace: Path) -> None:
    _edit_index(trace, schema="trm-trace-index/v9")
    message = _error(trace)
    assert "index.json" in message and "'trm-trace-index/v9'" in message
    assert "trm-trace-index/v1" in message


def test_listed_shard_missing(trace: Path) -> None:
    (trace / "shard_00001.jsonl").unlink()
    message = _error(trace)
    assert "shard_00001.jsonl: listed in" in message and "missing" in message


def test_unparsable_line_names_file_and_line(trace: Path) -> None:
    _edit_line(trace / "shard_00001.jsonl", 2, '{"schema": "trm-trace/v1", "id": \n')
    message = _error(trace)
    assert "shard_00001.jsonl line 3: not valid JSON" in message
    assert "write the trace again" in message


def test_record_checks(trace: Path) -> None:
    path = trace / "shard_00000.jsonl"
    original = path.read_text().splitlines(keepends=True)
    record = json.loads(original[1])
    cases = [
        ({**record, "steps": record["steps"][:3]}, "line 2: 3 steps, index.json says halt_max_"),
        ({**record, "id": 7}, "line 2: id is 7, index.json says 1"),
        ({**record, "schema": "trm-trace/v0"}, "line 2: schema 'trm-trace/v0'"),
        ({**record, "input": "01|2"}, "line 2 input: grid '01|2' has rows of different lengths"),
        ({**record, "target": "0a"}, "line 2 target: grid '0a' is not rows of digits"),
    ]
    for bad, expected in cases:
        _edit_line(path, 1, json.dumps(bad) + "\n")
        assert expected in _error(trace)
    path.write_text("".join(original))
    viewer.load_trace(trace)


def test_index_points_at_absent_line(trace: Path) -> None:
    path = trace / "shard_00002.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:1]))
    assert "record 11 points at line 2, which is absent" in _error(trace)


def test_cli_refuses_and_writes_nothing(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataset.common import run_cli

    out = trace.parent / "viewer.html"
    (trace / "shard_00000.jsonl").write_text("not json\n")
    assert run_cli(viewer.main, [str(trace), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "line 1" in err
    assert not out.exists() and not list(trace.parent.glob(".viewer.html*"))


def test_existing_output_kept_unless_force(trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataset.common import run_cli

    out = trace.parent / "viewer.html"
    out.write_text("mine")
    assert run_cli(viewer.main, [str(trace), "-o", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "mine"
    assert run_cli(viewer.main, [str(trace), "-o", str(out), "--force"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_module_entry_point(trace: Path) -> None:
    out = trace.parent / "page.html"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tracing.viewer", str(trace), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "wrote" in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "tracing.viewer", str(trace), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert again.returncode == 2 and again.stderr.startswith("error: ")


# ---- the embedded data (no browser) ------------------------------------------------------------


def _chunks(page: str) -> dict[str, Any]:
    found = re.findall(r'<script type="application/json" id="([^"]+)">(.*?)</script>', page, re.S)
    return {name: json.loads(text) for name, text in found}


def _unpack_grids(table: list[Any]) -> list[str]:
    """Decode a grid table independently of the page's script."""
    grids: list[str] = []
    for entry in table:
        if isinstance(entry, str):
            grids.append(entry)
            continue
        base, changes = entry
        rows = grids[base].split("|")
        w = len(rows[0])
        flat = list("".join(rows))
        for cell, colour in zip(changes[::2], changes[1::2], strict=True):
            flat[cell] = str(colour)
        grids.append("|".join("".join(flat[r * w : (r + 1) * w]) for r in range(len(rows))))
    return grids


def test_embedded_records_round_trip(trace: Path) -> None:
    loaded = viewer.load_trace(trace)
    chunks = _chunks(viewer.render_html(loaded))
    assert set(chunks) == {"trace-index"} | {f"rec-{i}" for i in range(12)}
    diffs = 0
    for record in loaded.records:
        packed = chunks[f"rec-{record['id']}"]
        grids = _unpack_grids(packed["g"])
        assert len(set(grids)) == len(grids)  # every distinct grid once
        diffs += sum(not isinstance(e, str) for e in packed["g"])
        assert [grids[i] for i in packed["s"]["pred"]] == [s["pred"] for s in record["steps"]]
        assert grids[packed["input"]] == record["input"]
        assert grids[packed["target"]] == record["target"]
        assert [[grids[a], grids[b]] for a, b in packed["demos"]] == [
            [d["input"], d["output"]] for d in record["demos"]
        ]
        for t, step in enumerate(record["steps"]):
            for (pred, probes), cycle in zip(packed["hc"][t], step["h_cycles"], strict=True):
                assert grids[pred] == cycle["pred"]
                assert [grids[i] for i in probes] == cycle["l_probes"]
            assert packed["s"]["q_halt"][t] == pytest.approx(step["q_halt"], rel=1e-4)
            assert packed["s"]["exact"][t] == step["exact"]
    assert diffs > 0  # the synthetic answers change a few cells per sub-step


def test_page_index_groups_variants(trace: Path) -> None:
    page = _chunks(viewer.render_html(viewer.load_trace(trace)))["trace-index"]
    assert [it["puzzle_id"] for it in page["items"]] == [f"p{i:03d}" for i in range(6)]
    assert all(
        it["variants"] == {"clean": 2 * k, PERTURB_TAG: 2 * k + 1}
        for k, it in enumerate(page["items"])
    )
    # Kind 1 (never solved clean) relaxes to the answer after the perturbation: recovered.
    assert [it["recovered"] for it in page["items"]] == [False, True, False, False, False, True]
    assert [it["solved_then_lost"] for it in page["items"]][:4] == [False, False, True, False]
    p001 = page["items"][1]
    assert p001["final_exact"] is False and p001["first_correct_step"] is None
    assert p001["summaries"][PERTURB_TAG]["final_exact"] is True
    assert p001["summaries"][PERTURB_TAG]["first_correct_step"] == PERTURB_STEP + 3
    assert p001["summaries"]["clean"]["recovered"] is None


def test_items_keep_the_writer_order(trace: Path) -> None:
    for path in [trace / "index.json", *trace.glob("shard_*.jsonl")]:
        path.write_text(path.read_text().replace('"p000"', '"z000"'))
    page = viewer.page_index(viewer.load_trace(trace))
    assert [it["puzzle_id"] for it in page["items"]][:2] == ["z000", "p001"]


def test_index_and_shard_disagree(trace: Path) -> None:
    path = trace / "shard_00000.jsonl"
    path.write_text(path.read_text().replace('"p001"', '"p999"'))
    assert "line 3: puzzle_id is 'p999', index.json says 'p001'" in _error(trace)


def test_repeated_record_refused(trace: Path) -> None:
    index = json.loads((trace / "index.json").read_text())
    index["records"][3]["variant"] = "clean"
    (trace / "index.json").write_text(json.dumps(index))
    assert "records[3]: repeats records[2]" in _error(trace)


def test_markup_in_strings_cannot_close_the_chunk(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    write_synthetic_trace(folder, 1, H=2, H_cycles=1, L_cycles=1, perturb=False)
    for path in [folder / "index.json", folder / "shard_00000.jsonl"]:
        path.write_text(path.read_text().replace('"p000"', json.dumps("a</script><b>&")))
    page = viewer.render_html(viewer.load_trace(folder))
    assert "a</script>" not in page
    assert _chunks(page)["trace-index"]["items"][0]["puzzle_id"] == "a</script><b>&"


def test_non_finite_numbers_become_null(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    write_synthetic_trace(folder, 1, H=2, H_cycles=1, L_cycles=1, perturb=False)
    path = folder / "shard_00000.jsonl"
    record = json.loads(path.read_text())
    record["steps"][0]["h_cos_dist"] = float("nan")
    path.write_text(json.dumps(record) + "\n")
    packed = viewer.pack_record(viewer.load_trace(folder).records[0])
    text = json.dumps(packed, allow_nan=False)
    assert json.loads(text)["s"]["h_cos_dist"][0] is None


# ---- the page in headless Chromium -------------------------------------------------------------


def _browser_paths() -> tuple[str | None, str | None]:
    """Chromium and chromedriver: ``TRM_CHROMIUM`` / ``TRM_CHROMEDRIVER`` or the ``PATH``."""
    chromium = os.environ.get("TRM_CHROMIUM") or shutil.which("chromium")
    driver = os.environ.get("TRM_CHROMEDRIVER") or shutil.which("chromedriver")
    return (
        chromium if chromium and os.access(chromium, os.X_OK) else None,
        driver if driver and os.access(driver, os.X_OK) else None,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("TRM_SKIP_BROWSER") == "1":
        pytest.skip("TRM_SKIP_BROWSER=1")
    install = (
        "apt-get install -y chromium chromium-driver and pip install -r requirements-dev.txt "
        "(make test does both as root), or set TRM_SKIP_BROWSER=1 to skip the browser tests"
    )
    chromium, driver_path = _browser_paths()
    if chromium is None or driver_path is None:
        missing = "chromium (or TRM_CHROMIUM)" if chromium is None else "chromedriver"
        pytest.fail(f"{missing} not found; {install}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed; {install}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from looking for a driver on the network.
    drv = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("viewer")
    records = write_synthetic_trace(root / "traces", 12, H=8, H_cycles=3, L_cycles=4)
    out = viewer.write_viewer(root / "traces", root / "viewer.html")
    return out, records


def _open(browser: Any, path: Path) -> None:
    browser.get(path.as_uri())
    deadline = time.monotonic() + 30
    while browser.execute_script("return document.documentElement.dataset.ready") != "1":
        errors = _severe(browser)
        assert not errors, errors
        assert time.monotonic() < deadline, "the page did not become ready within 30 s"
        time.sleep(0.05)


def _severe(browser: Any) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _by(browser: Any, testid: str) -> Any:
    return browser.find_element("css selector", f'[data-testid="{testid}"]')


def _attr(browser: Any, testid: str, name: str) -> str:
    return _by(browser, testid).get_attribute(f"data-{name}")


def _set_slider(browser: Any, step: int) -> None:
    browser.execute_script(
        "const s = arguments[0]; s.value = arguments[1];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));",
        _by(browser, "step-slider"),
        str(step),
    )


def _key(browser: Any, key: str) -> None:
    """Press ``key`` with nothing focused, as a reader does after clicking the page."""
    from selenium.webdriver.common.action_chains import ActionChains

    browser.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(browser).send_keys(key).perform()


def _select(browser: Any, testid: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(_by(browser, testid)).select_by_value(value)


@pytest.mark.browser
def test_page_in_chromium(
    browser: Any, page: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    path, records = page
    clean = [r for r in records if r["variant"] == "clean"]
    perturbed = {r["puzzle_id"]: r for r in records if r["variant"] != "clean"}
    _open(browser, path)

    items = browser.find_elements("css selector", '[data-testid="puzzle-item"]')
    assert len(items) == 12
    assert _attr(browser, "puzzle-count", "shown") == "12"
    assert _attr(browser, "puzzle-count", "puzzles") == "12"
    first = clean[0]
    assert _attr(browser, "test-input", "grid") == first["input"]
    assert _attr(browser, "target-grid", "grid") == first["target"]
    demos = browser.find_elements("css selector", '[data-testid="demo-input"]')
    assert len(demos) == len(first["demos"])

    # The slider: step 1 shows step 1's answer, step 8 another one, each the recorded grid.
    assert _attr(browser, "current-grid", "grid") == first["steps"][0]["pred"]
    _set_slider(browser, 8)
    assert _attr(browser, "step-label", "step") == "8"
    assert _attr(browser, "current-grid", "grid") == first["steps"][7]["pred"]
    assert first["steps"][7]["pred"] != first["steps"][0]["pred"]
    # The diff overlay counts the cells that differ from step 7, then from the target.
    s7, s8 = first["steps"][6]["pred"], first["steps"][7]["pred"]
    assert _attr(browser, "current-grid", "diff-cells") == str(_differ(s7, s8))
    _select(browser, "overlay-select", "target")
    assert _attr(browser, "current-grid", "diff-cells") == str(_differ(first["target"], s8))

    # Keyboard: ← goes back a step, ↓ moves to the next puzzle.
    _key(browser, Keys.ARROW_LEFT)
    assert _attr(browser, "step-label", "step") == "7"
    _key(browser, Keys.ARROW_DOWN)
    assert _by(browser, "puzzle-title").text == "p001"
    assert _attr(browser, "current-grid", "grid") == clean[1]["steps"][6]["pred"]

    # An L probe shown from the expanded sub-steps.
    _by(browser, "substeps").find_element("tag name", "summary").click()
    probe = browser.find_element("css selector", '[data-testid="substep"][data-sub="1:2"]')
    probe.click()
    probe_grid = clean[1]["steps"][6]["h_cycles"][1]["l_probes"][2]
    assert _attr(browser, "current-grid", "grid") == probe_grid

    # A filter narrows the list to exactly the puzzles solved at the last step.
    _select(browser, "filter-status", "solved")
    solved = [r["puzzle_id"] for r in clean if r["final_exact"]]
    listed = browser.find_elements("css selector", '[data-testid="puzzle-item"]')
    shown = [e.text.split()[0] for e in listed]
    assert shown == solved and 0 < len(solved) < 12
    assert _attr(browser, "puzzle-count", "shown") == str(len(solved))
    _select(browser, "filter-status", "all")
    _select(browser, "filter-recovered", "recovered")
    clean_exact = {r["puzzle_id"]: r["final_exact"] for r in clean}
    recovered = [p for p, r in perturbed.items() if r["final_exact"] and not clean_exact[p]]
    assert _attr(browser, "puzzle-count", "shown") == str(len(recovered)) and recovered
    _select(browser, "filter-recovered", "all")
    _select(browser, "filter-first-correct", "never")
    never = [r["puzzle_id"] for r in clean if r["first_correct_step"] is None]
    assert _attr(browser, "puzzle-count", "shown") == str(len(never))
    _select(browser, "filter-first-correct", "any")

    # The perturbed toggle: same grid before the injection step, the perturbed one after it,
    # the clean grid beside it and the injection step marked.
    browser.find_elements("css selector", '[data-testid="puzzle-item"]')[1].click()
    target = perturbed["p001"]
    _set_slider(browser, PERTURB_STEP)
    assert not _by(browser, "clean-grid").is_displayed()
    clean_at_5 = _attr(browser, "current-grid", "grid")
    button = f'[data-testid="variant-button"][data-variant="{PERTURB_TAG}"]'
    browser.find_element("css selector", button).click()
    perturbed_at_5 = target["steps"][PERTURB_STEP - 1]["pred"]
    assert _attr(browser, "current-grid", "grid") == perturbed_at_5 != clean_at_5
    assert _attr(browser, "clean-grid", "grid") == clean_at_5
    assert _by(browser, "clean-grid").is_displayed()
    badges = _by(browser, "badges")
    assert badges.get_attribute("data-variant") == PERTURB_TAG
    shown_badges = [b.text for b in badges.find_elements("css selector", ".badge")]
    assert shown_badges[0] == "solved" and "recovered from the clean run's miss" in shown_badges
    assert browser.find_element("id", "inject-mark").text == f"▲{PERTURB_STEP}"
    assert browser.find_elements("css selector", "#chart-halt line.inject")
    _set_slider(browser, PERTURB_STEP - 1)
    assert _attr(browser, "current-grid", "grid") == _attr(browser, "clean-grid", "grid")
    _key(browser, "p")
    assert not _by(browser, "clean-grid").is_displayed()

    shot = tmp_path / "viewer.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert _severe(browser) == []
    assert not _by(browser, "error").is_displayed()
