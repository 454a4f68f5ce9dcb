"""What the three dataset builders do to the disk around ``--output-dir`` when things go wrong.

Each builder runs on a tiny offline input (hand-written ARC task files, generated Sudoku and Maze
puzzles). The tests snapshot the whole temporary tree, hidden entries included, and compare it
byte for byte before and after: refusing a path, failing while writing and being stopped by a
signal must leave the previous state exactly as it was, with one ``error:`` line on stderr.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import dataset.common as common
from dataset import build_arc_dataset, build_maze_dataset, build_sudoku_dataset
from dataset.common import run_cli

REPO = Path(__file__).resolve().parent.parent
GRID_RULE = "grid cells must be integers 0-9"


def _arc_task(colour: int) -> dict:
    return {
        "train": [
            {"input": [[colour, 0], [0, colour]], "output": [[0, colour], [colour, 0]]},
            {"input": [[1, 2, 3]], "output": [[3, 2, 1]]},
        ],
        "test": [{"input": [[colour]], "output": [[9 - colour]]}],
    }


def _arc_source(root: Path) -> list[str]:
    for subset, names in (("training", ("aa", "bb")), ("evaluation", ("cc",))):
        (root / subset).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            file = root / subset / f"{name}.json"
            if not file.exists():  # a test may have edited it
                file.write_text(json.dumps(_arc_task(3 + i)))
    return ["--input-dir", str(root), "--subsets", "training", "evaluation",
            "--test-set-name", "evaluation", "--num-aug", "2"]  # fmt: skip


def _sudoku_source(root: Path) -> list[str]:
    return ["--generate", "2", "--generate-test", "1"]


def _maze_source(root: Path) -> list[str]:
    return ["--generate", "2", "--generate-test", "1", "--grid-size", "7"]


# name -> (module, source arguments given a folder for input files)
BUILDERS: dict[str, tuple[object, Callable[[Path], list[str]]]] = {
    "arc": (build_arc_dataset, _arc_source),
    "sudoku": (build_sudoku_dataset, _sudoku_source),
    "maze": (build_maze_dataset, _maze_source),
}


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (hidden ones too): file bytes, ``<dir>`` or ``-> target``."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = path.read_bytes()
    return out


def run(
    name: str,
    tmp_path: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
) -> tuple[int, str, str]:
    """Run builder ``name`` in-process; returns ``(exit code, stdout, stderr)``."""
    module, source = BUILDERS[name]
    argv = [*source(tmp_path / "src"), "--output-dir", str(out), *extra]
    rc = run_cli(module.main, argv)  # type: ignore[attr-defined]
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_error_line(err: str, expected: str) -> None:
    assert err == f"error: {expected}\n"


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# What may be replaced
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folder_is_refused_untouched(
    name: str, overwrite: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    (data / "arc1" / "train").mkdir(parents=True)
    (data / "arc1" / "train" / "dataset.json").write_text("{}")
    (data / "notes.txt").write_text("keep me")
    (data / "x").mkdir()
    _arc_source(tmp_path / "src")
    before = snapshot(tmp_path)
    rc, _, err = run(name, tmp_path, data, capsys, *(["--overwrite"] if overwrite else []))
    assert rc == 2
    assert_one_error_line(
        err,
        f"{data}: exists and holds 3 entries (arc1/, notes.txt, x/) that are not a dataset "
        "built here; choose another --output-dir",
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("overwrite", [False, True])
def test_file_at_output_path_is_refused_untouched(
    name: str, overwrite: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "ds"
    target.write_bytes(b"precious")
    _arc_source(tmp_path / "src")
    before = snapshot(tmp_path)
    rc, _, err = run(name, tmp_path, target, capsys, *(["--overwrite"] if overwrite else []))
    assert rc == 2
    assert_one_error_line(
        err, f"{target}: exists and is a file, not a dataset folder; choose another --output-dir"
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_previous_dataset_is_replaced_only_with_overwrite(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, fresh = tmp_path / "out" / "ds", tmp_path / "fresh"
    assert run(name, tmp_path, out, capsys, "--seed", "1")[0] == 0
    before, old = snapshot(tmp_path), snapshot(out)

    rc, _, err = run(name, tmp_path, out, capsys, "--seed", "2")
    assert rc == 2
    assert_one_error_line(
        err, f"{out}: holds a dataset built earlier; pass --overwrite to replace it"
    )
    assert snapshot(tmp_path) == before

    assert run(name, tmp_path, out, capsys, "--seed", "2", "--overwrite")[0] == 0
    assert run(name, tmp_path, fresh, capsys, "--seed", "2")[0] == 0
    assert snapshot(out) == snapshot(fresh), "the replacement is a complete new build"
    assert snapshot(out) != old
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"], "nothing left beside it"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_empty_folder_is_built_into(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert run(name, tmp_path, out, capsys)[0] == 0
    assert (out / "train" / "dataset.json").is_file() and (out / "identifiers.json").is_file()
    assert hidden_entries(tmp_path) == []


def test_dataset_with_added_files_is_refused_even_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    assert run("maze", tmp_path, out, capsys)[0] == 0
    (out / "notes.txt").write_text("my results")
    (out / "train" / "extra").mkdir()
    before = snapshot(tmp_path)
    rc, _, err = run("maze", tmp_path, out, capsys, "--overwrite")
    assert rc == 2
    assert_one_error_line(
        err,
        f"{out}: holds a dataset and 2 entries (notes.txt, train/extra/) that are not part of "
        "one; move them out or choose another --output-dir",
    )
    assert snapshot(tmp_path) == before


def test_upstream_layout_without_marker_counts_as_a_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset written by upstream's builders (same layout, no file of ours) is recognised."""
    out = tmp_path / "upstream"
    (out / "train").mkdir(parents=True)
    metadata = {"seq_len": 81, "vocab_size": 11, "sets": ["all"], "pad_id": 0}
    (out / "train" / "dataset.json").write_text(json.dumps(metadata))
    (out / "train" / "all__inputs.npy").write_bytes(b"old")
    (out / "identifiers.json").write_text('["<blank>"]')
    rc, _, err = run("sudoku", tmp_path, out, capsys)
    assert rc == 2 and "pass --overwrite" in err
    assert run("sudoku", tmp_path, out, capsys, "--overwrite")[0] == 0
    assert (out / "test" / "dataset.json").is_file()
    assert (out / "train" / "all__inputs.npy").read_bytes() != b"old"


def test_symlink_at_output_path_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real"
    assert run("maze", tmp_path, real, capsys)[0] == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(tmp_path)
    rc, _, err = run("maze", tmp_path, link, capsys, "--overwrite")
    assert rc == 2
    assert_one_error_line(
        err,
        f"{link}: is a symbolic link to {real}; pass the folder itself or choose another "
        "--output-dir",
    )
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# ARC grid values
# ----------------------------------------------------------------------------------------------
def _set_cell(value: object) -> Callable[[dict], str]:
    def mutate(task: dict) -> str:
        task["train"][1]["input"][0][1] = value
        return f"train pair 1 input: row 0 holds {json.dumps(value)}; {GRID_RULE}"

    return mutate


def _set_grid(side: str, grid: object, why: str, pair: str = "train pair 0") -> Callable:
    def mutate(task: dict) -> str:
        kind, index = pair.split(" pair ")
        task[kind][int(index)][side] = grid
        return f"{pair} {side}: {why}"

    return mutate


BAD_GRIDS: dict[str, Callable[[dict], str]] = {
    "float 1.5": _set_cell(1.5),
    "float 1.0": _set_cell(1.0),
    "boolean": _set_cell(True),
    "string": _set_cell("1"),
    "null": _set_cell(None),
    "negative": _set_cell(-1),
    "colour 10": _set_cell(10),
    "3-D grid": _set_grid("input", [[[1, 2]], [[3, 4]]], f"row 0 holds [1, 2]; {GRID_RULE}"),
    "ragged": _set_grid("output", [[1, 2], [3]], "not rectangular (row lengths [1, 2])"),
    "empty grid": _set_grid("input", [], "expected a non-empty list of rows, got []"),
    "empty row": _set_grid("input", [[]], "row 0 is [], expected a non-empty list of cells"),
    "not a grid": _set_grid("input", 7, "expected a non-empty list of rows, got 7"),
    "31x31": _set_grid("input", [[1] * 31] * 31, "31x31, larger than the 30x30 canvas"),
    "30x31": _set_grid(
        "output", [[2] * 31] * 30, "30x31, larger than the 30x30 canvas", "test pair 0"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_arc_bad_grid_is_one_line_naming_file_task_and_pair(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _arc_source(tmp_path / "src")
    file = tmp_path / "src" / "training" / "bb.json"
    task = json.loads(file.read_text())
    detail = BAD_GRIDS[case](task)
    file.write_text(json.dumps(task))
    out = tmp_path / "out" / "ds"
    rc, _, err = run("arc", tmp_path, out, capsys)
    assert rc == 2
    assert_one_error_line(err, f"{file}: task bb, {detail}")
    assert not (tmp_path / "out").exists()


def test_arc_malformed_json_and_missing_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _arc_source(tmp_path / "src")
    file = tmp_path / "src" / "evaluation" / "cc.json"
    file.write_text(file.read_text()[:-2])
    rc, _, err = run("arc", tmp_path, tmp_path / "ds", capsys)
    assert rc == 2 and err.startswith(f"error: {file}: malformed JSON at line 1 column ")
    assert err.count("\n") == 1

    task = _arc_task(3)
    del task["test"][0]["output"]
    file.write_text(json.dumps(task))
    rc, _, err = run("arc", tmp_path, tmp_path / "ds", capsys)
    assert rc == 2
    assert_one_error_line(err, f"{file}: task cc, test pair 0: needs 'input' and 'output'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_arc_bad_solution_grid_names_the_solutions_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "arc-agi"
    task = _arc_task(4)
    challenges = {"t1": {"train": task["train"], "test": [{"input": [[4]]}]}}
    Path(f"{prefix}_evaluation_challenges.json").write_text(json.dumps(challenges))
    solutions = Path(f"{prefix}_evaluation_solutions.json")
    solutions.write_text(json.dumps({"t1": [[[0.5]]]}))
    argv = ["--input-file-prefix", str(prefix), "--subsets", "evaluation",
            "--test-set-name", "evaluation", "--output-dir", str(tmp_path / "ds")]  # fmt: skip
    assert run_cli(build_arc_dataset.main, argv) == 2
    err = capsys.readouterr().err
    assert_one_error_line(
        err, f"{solutions}: task t1, test pair 0 output: row 0 holds 0.5; {GRID_RULE}"
    )


# ----------------------------------------------------------------------------------------------
# Write failures
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_disk_full_keeps_previous_dataset(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    assert run(name, tmp_path, out, capsys)[0] == 0
    before = snapshot(tmp_path)
    writes: list[str] = []

    def disk_full(path: str | os.PathLike[str], obj: object) -> None:
        writes.append(str(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(common, "write_json", disk_full)
    rc, _, err = run(name, tmp_path, out, capsys, "--overwrite", "--seed", "3")
    tmp = tmp_path / f".ds.tmp-{os.getpid()}"
    assert writes == [str(tmp / "train" / "dataset.json")]
    assert rc == 2
    assert_one_error_line(
        err,
        f"{out}: writing the dataset failed (No space left on device: {writes[0]}); removed the "
        f"temporary folder, {out} is unchanged; free some space or choose another --output-dir",
    )
    assert snapshot(tmp_path) == before


def test_disk_full_on_a_new_path_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: object, rows: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(common.NpyRowWriter, "append", disk_full)
    out = tmp_path / "new" / "ds"
    rc, _, err = run("arc", tmp_path, out, capsys)
    assert rc == 2
    assert_one_error_line(
        err,
        f"{out}: writing the dataset failed (No space left on device); removed the temporary "
        f"folder, {out} was not created; free some space or choose another --output-dir",
    )
    assert list((tmp_path / "new").iterdir()) == []


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_parent_that_is_a_file(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    _arc_source(tmp_path / "src")
    before = snapshot(tmp_path)
    out = blocker / "ds"
    rc, _, err = run(name, tmp_path, out, capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {out}: cannot create or read its parent folder (")
    assert str(blocker) in err and err.endswith("; choose another --output-dir\n")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_unwritable_parent_folder(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        rc, _, err = run(name, tmp_path, parent / "ds", capsys)
    finally:
        parent.chmod(0o755)
    assert rc == 2
    assert_one_error_line(
        err,
        f"{parent / 'ds'}: cannot write in {parent} (Permission denied: "
        f"{parent / f'.ds.tmp-{os.getpid()}'}); choose another --output-dir",
    )
    assert list(parent.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Signals and leftovers of killed builds
# ----------------------------------------------------------------------------------------------
# Runs a builder with its last write into the temporary folder followed by a long pause, so that
# a signal is sure to arrive while the temporary folder exists, holding almost the whole dataset.
PAUSED_BUILD = """
import sys, time
from pathlib import Path
from dataset.common import run_cli
import dataset.build_{name}_dataset as builder
ready = Path(sys.argv[1])
write_identifiers = builder.write_identifiers
def write_then_pause(*args, **kwargs):
    write_identifiers(*args, **kwargs)
    ready.touch()
    time.sleep(60)
builder.write_identifiers = write_then_pause
sys.exit(run_cli(builder.main, sys.argv[2:]))
"""


def start_paused_build(name: str, tmp_path: Path, argv: Sequence[str]) -> subprocess.Popen:
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    _, source = BUILDERS[name]
    cmd = [sys.executable, "-c", PAUSED_BUILD.format(name=name), str(ready)]
    cmd += [*source(tmp_path / "src"), *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"build ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("build did not reach its last write")
        time.sleep(0.01)
    ready.unlink()
    return proc


@pytest.mark.parametrize(
    ("name", "sig", "previous"),
    [
        ("arc", signal.SIGTERM, True),
        ("sudoku", signal.SIGINT, False),
        ("maze", signal.SIGTERM, False),
    ],
)
def test_signal_removes_temporary_folder_at_once(
    name: str,
    sig: signal.Signals,
    previous: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "data" / "ds"
    if previous:
        assert run(name, tmp_path, out, capsys)[0] == 0
    before = snapshot(tmp_path / "data") if previous else {}
    proc = start_paused_build(name, tmp_path, ["--output-dir", str(out), "--overwrite"])
    tmp = out.with_name(f".ds.tmp-{proc.pid}")
    assert (tmp / "train" / "dataset.json").is_file()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    state = "is unchanged" if previous else "was not created"
    assert_one_error_line(
        stderr,
        f"{out}: build stopped by {sig.name}; removed its temporary folder {tmp.name}, "
        f"{out} {state}",
    )
    assert snapshot(tmp_path / "data") == before


def test_next_build_removes_what_a_killed_build_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data" / "ds"
    proc = start_paused_build("maze", tmp_path, ["--output-dir", str(out)])
    proc.kill()  # SIGKILL cannot be caught: the temporary folder stays
    proc.communicate(timeout=60)
    killed_tmp = out.with_name(f".ds.tmp-{proc.pid}")
    assert (killed_tmp / "train" / "dataset.json").is_file()

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = out.with_name(f".ds.tmp-{alive.pid}")
        live_tmp.mkdir()
        other = out.with_name(".other.tmp-1")  # another output path's: not ours to judge
        other.mkdir()
        rc, stdout, err = run("maze", tmp_path, out, capsys)
        assert rc == 0 and err == ""
        notes = [line for line in stdout.splitlines() if line.startswith("note:")]
        assert len(notes) == 1
        assert notes[0].startswith(f"note: removed {killed_tmp} (")
        assert notes[0].endswith(f" MiB), left by build process {proc.pid}, which no longer runs")
        assert sorted(p.name for p in out.parent.iterdir()) == sorted(
            [".other.tmp-1", live_tmp.name, "ds"]
        )
    finally:
        alive.kill()
        alive.wait()


def test_build_killed_mid_swap_is_recovered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed between the two renames of the swap: the previous version sits at ``.ds.old``
    and ``ds`` is missing. The next build puts it back before deciding anything."""
    out = tmp_path / "ds"
    assert run("sudoku", tmp_path, out, capsys, "--seed", "1")[0] == 0
    before = snapshot(out)
    out.rename(tmp_path / ".ds.old")

    rc, stdout, err = run("sudoku", tmp_path, out, capsys)
    assert (
        stdout == f"note: restored {out} from .ds.old, left by a build killed while replacing it\n"
    )
    assert rc == 2 and "pass --overwrite" in err
    assert snapshot(out) == before and hidden_entries(tmp_path) == []

    # Killed after the new version was in place: the old one at .ds.old is stale.
    stale = tmp_path / ".ds.old"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "all__inputs.npy").write_bytes(b"x" * 2048)
    rc, stdout, _ = run("sudoku", tmp_path, out, capsys, "--overwrite")
    assert rc == 0
    note = f"note: removed {stale} (0.0 MiB), the previous version left by a build killed after"
    assert f"{note} replacing it\n" in stdout
    assert hidden_entries(tmp_path) == []


def test_failed_final_rename_puts_the_previous_dataset_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    assert run("maze", tmp_path, out, capsys)[0] == 0
    before = snapshot(tmp_path)
    rename = Path.rename

    def refuse_new_version(self: Path, target: str | os.PathLike[str]) -> Path:
        if self.name.startswith(".ds.tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_new_version)
    rc, _, err = run("maze", tmp_path, out, capsys, "--overwrite", "--seed", "4")
    assert rc == 2
    tmp = tmp_path / f".ds.tmp-{os.getpid()}"
    assert_one_error_line(
        err,
        f"{out}: writing the dataset failed (Input/output error: {tmp}); removed the temporary "
        f"folder, {out} is unchanged; check the disk or choose another --output-dir",
    )
    assert snapshot(tmp_path) == before


def test_swap_folder_into_place_rolls_back_when_the_new_version_cannot_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from utils.atomic import swap_folder_into_place

    final, new = tmp_path / "step_1", tmp_path / ".step_1.tmp-1"
    final.mkdir()
    (final / "model.pt").write_bytes(b"old")
    new.mkdir()
    rename = Path.rename

    def fail_for_new(self: Path, target: str | os.PathLike[str]) -> Path:
        if self == new:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_for_new)
    with pytest.raises(OSError, match="cross-device"):
        swap_folder_into_place(new, final)
    assert (final / "model.pt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_1.tmp-1", "step_1"]
