"""Pieces shared by every dataset builder and by the loader.

The on-disk layout is upstream's (written by its ``dataset/build_*_dataset.py``, read by its
``puzzle_dataset.py``)::

    <dir>/<split>/<set>__<field>.npy   split in {train, test}, set = "all"
    <dir>/<split>/dataset.json         PuzzleDatasetMetadata
    <dir>/identifiers.json             id -> puzzle name, index 0 = "<blank>"
    <dir>/test_puzzles.json            ARC only: raw evaluation tasks with solutions

Builders stream rows straight into ``.npy`` files (``NpyRowWriter``) inside the hidden temporary
folder ``.<name>.tmp-<pid>`` beside ``--output-dir``, renamed into place only once everything is
written (``atomic_output_dir``), so a failed build never leaves a half-written dataset behind.

What a build may replace (``check_output_dir``):

* an absent path, or an empty folder, is built into;
* a *dataset built here* is replaced only with ``--overwrite``. A folder is one when every entry
  belongs to the layout above (``train/`` and ``test/`` folders holding only ``dataset.json`` and
  ``*.npy`` files, ``identifiers.json``, ``test_puzzles.json``) and at least one of
  ``train/dataset.json`` and ``test/dataset.json`` is a JSON object with ``seq_len``,
  ``vocab_size`` and ``sets``. The rule needs no marker file, so datasets built by upstream's code
  or by earlier versions of these builders are recognised too, and it never matches a folder
  holding anything else (``data/`` with other datasets in it, a dataset with notes added);
* anything else (a file, a symbolic link, a folder with other content) is refused, with or
  without ``--overwrite``, and left untouched.

Leftovers of killed builds are handled by the next build into the same path: temporary folders
whose process no longer runs are removed, and a previous version moved aside to ``.<name>.old``
by a build killed in the middle of the final swap is put back. SIGTERM and SIGINT during a build
remove its temporary folder at once (``BuildInterruptedError``, exit code 128 + the signal number).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydantic import BaseModel, ConfigDict

from utils.atomic import aside_path, swap_folder_into_place
from utils.schema import UserError

# Fields stored per split and set, in upstream's naming.
FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
PUZZLE_ID_SEPARATOR = "|||"
BLANK_IDENTIFIER = "<blank>"
# Label value the loader writes for ignored and padded positions and the losses skip (upstream's
# ``models.losses.IGNORE_LABEL_ID``); a dataset's own ``ignore_label_id`` is mapped to it.
IGNORE_LABEL_ID = -100

# 0: identity, 1-3: rot90 k=1..3, 4: fliplr, 5: flipud, 6: transpose, 7: anti-diagonal reflection.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)
# Transforms 1, 3, 6 and 7 swap the two axes of a grid.
DIHEDRAL_SWAPS_AXES = (False, True, False, True, False, False, True, True)


class DatasetBuildError(UserError):
    """A problem with a builder's input; the message is one line naming the file and task."""


class DataError(UserError, ValueError):
    """A built dataset that cannot be read or does not fit the run; the message names the file
    and what to rebuild or change."""


class PuzzleDatasetMetadata(BaseModel):
    """``<split>/dataset.json``: upstream's fields, plus the optional ``split_policy``.

    ``ignore_label_id`` is the label value the loader turns into -100 (ARC and Maze: PAD 0).
    ``num_puzzle_identifiers`` counts ids including the blank id 0 (the embedding table size).
    """

    model_config = ConfigDict(extra="forbid")

    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    total_puzzles: int
    sets: list[str]
    split_policy: str | None = None


def dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Apply dihedral transform ``tid`` (0..7, upstream's numbering) to the last two axes."""
    axes = (-2, -1)
    if tid == 0:
        return arr
    if tid in (1, 2, 3):
        return np.rot90(arr, k=tid, axes=axes)
    if tid == 4:
        return np.flip(arr, axis=-1)
    if tid == 5:
        return np.flip(arr, axis=-2)
    if tid == 6:
        return np.swapaxes(arr, -2, -1)
    if tid == 7:
        return np.flip(np.rot90(arr, k=1, axes=axes), axis=-1)
    raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")


def inverse_dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """Undo ``dihedral_transform(arr, tid)``."""
    return dihedral_transform(arr, DIHEDRAL_INVERSE[tid])


def augmented_name(base: str, trans_id: int, colour_map: np.ndarray) -> str:
    """Upstream's puzzle name for a variant: ``base|||t<trans_id>|||<colour map digits>``."""
    digits = "".join(str(int(c)) for c in colour_map)
    return f"{base}{PUZZLE_ID_SEPARATOR}t{trans_id}{PUZZLE_ID_SEPARATOR}{digits}"


def inverse_aug(name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Parse a puzzle name; return the base name and the map from variant grids to originals.

    The map undoes the dihedral transform and the colour permutation (colours 0..9, not tokens).
    Names without the separator are originals and map to themselves.
    """
    if PUZZLE_ID_SEPARATOR not in name:
        return name, lambda grid: grid
    base, trans, digits = name.split(PUZZLE_ID_SEPARATOR)[-3:]
    trans_id = int(trans[1:])
    inverse_colours = np.argsort(np.array([int(d) for d in digits])).astype(np.uint8)

    def undo(grid: np.ndarray) -> np.ndarray:
        return inverse_colours[inverse_dihedral_transform(grid, trans_id)]

    return base, undo


# ----------------------------------------------------------------------------------------------
# Streaming .npy writer
# ----------------------------------------------------------------------------------------------
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER_BYTES = 128  # magic + length + dict, padded; room for any shape this project writes


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    free = _NPY_HEADER_BYTES - len(_NPY_MAGIC) - 2 - len(text) - 1
    if free < 0:
        raise ValueError(f"npy header too long for shape {shape}")
    body = (text + " " * free + "\n").encode("latin1")
    return _NPY_MAGIC + struct.pack("<H", len(body)) + body


class NpyRowWriter:
    """Append rows to a ``.npy`` file without holding them in memory.

    The header is written with a fixed size and rewritten with the final row count on
    ``close()``, so the file is a standard ``.npy`` that ``np.load(..., mmap_mode="r")`` reads.
    """

    def __init__(self, path: str | os.PathLike[str], dtype: Any, row_shape: tuple[int, ...] = ()):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(_npy_header(self.dtype, (0, *self.row_shape)))

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` of shape ``[n, *row_shape]`` (cast to the writer's dtype)."""
        assert self._file is not None, "writer already closed"
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: row shape {rows.shape[1:]} != {self.row_shape}")
        self._file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.seek(0)
            file.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        finally:
            file.close()

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Output folder handling
# ----------------------------------------------------------------------------------------------
SPLIT_FOLDERS = ("train", "test")
_DATASET_FILES = ("identifiers.json", "test_puzzles.json")
_METADATA_KEYS = ("seq_len", "vocab_size", "sets")
_INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WRITE_HINTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "check the permissions",
}
OVERWRITE_HELP = (
    "replace the dataset an earlier build wrote at --output-dir; anything else there is "
    "never replaced"
)


class BuildInterruptedError(DatasetBuildError):
    """SIGTERM or SIGINT stopped a build; its temporary folder is already removed.

    ``run_cli`` exits with ``128 + signum``, the shell's code for a process stopped by a signal.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _reason(e: OSError) -> str:
    """``strerror: filename`` of an ``OSError`` (either part may be missing)."""
    text = e.strerror or str(e) or type(e).__name__
    return f"{text}: {e.filename}" if e.filename else text


def _entry_label(path: Path) -> str:
    return f"{path.name}/" if path.is_dir() else path.name


def _listing(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ..." if len(names) > limit else shown


def _entries_that_are(names: Sequence[str]) -> str:
    """``1 entry (a) that is`` / ``3 entries (a, b, c) that are`` / ``5 entries (a, b, c, ...)``."""
    if len(names) == 1:
        return f"1 entry ({names[0]}) that is"
    return f"{len(names)} entries ({_listing(names)}) that are"


def _has_split_metadata(split_dir: Path) -> bool:
    try:
        metadata = json.loads((split_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and all(k in metadata for k in _METADATA_KEYS)


def _layout_check(folder: Path) -> tuple[bool, list[str]]:
    """``(has_metadata, foreign)``: whether a split folder holds dataset metadata, and the
    entries (relative names, folders ending in ``/``) that are not part of the layout."""
    has_metadata = False
    foreign: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name in SPLIT_FOLDERS and entry.is_dir():
            for member in sorted(entry.iterdir()):
                is_part = member.is_file() and (
                    member.name == "dataset.json" or member.suffix == ".npy"
                )
                if not is_part:
                    foreign.append(f"{entry.name}/{_entry_label(member)}")
            has_metadata = has_metadata or _has_split_metadata(entry)
        elif not (entry.name in _DATASET_FILES and entry.is_file()):
            foreign.append(_entry_label(entry))
    return has_metadata, foreign


def _absolute(output_dir: str | os.PathLike[str]) -> Path:
    final = Path(os.path.abspath(output_dir))
    if not final.name:
        raise DatasetBuildError(f"{output_dir}: cannot build into the root folder")
    return final


def _restore_interrupted_swap(final: Path, shown: str | os.PathLike[str]) -> None:
    """Put back the previous version that a build killed between the two renames of
    ``swap_folder_into_place`` left at ``aside_path(final)``, with ``final`` missing."""
    aside = aside_path(final)
    if os.path.lexists(final) or not aside.is_dir() or aside.is_symlink():
        return
    try:
        aside.rename(final)
    except OSError as e:
        raise DatasetBuildError(
            f"{shown}: missing, and restoring the previous version from {aside} failed "
            f"({_reason(e)}); move it back by hand"
        ) from None
    print(f"note: restored {shown} from {aside.name}, left by a build killed while replacing it")


def check_output_dir(output_dir: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Raise ``DatasetBuildError`` unless a build may write ``output_dir``.

    An absent path or an empty folder may be built; a dataset built here (the rule in the module
    docstring) only with ``overwrite``; anything else never. Refusing changes nothing on disk;
    the only change this makes is putting back a previous version that a killed build left
    aside (see ``atomic_output_dir``).
    """
    try:
        _check_output_dir(output_dir, overwrite=overwrite)
    except OSError as e:  # e.g. a parent folder that may not be listed
        raise DatasetBuildError(
            f"{output_dir}: cannot inspect it ({_reason(e)}); choose another --output-dir"
        ) from None


def _check_output_dir(output_dir: str | os.PathLike[str], *, overwrite: bool) -> None:
    shown = output_dir
    final = _absolute(output_dir)
    _restore_interrupted_swap(final, shown)
    if final.is_symlink():
        raise DatasetBuildError(
            f"{shown}: is a symbolic link to {os.readlink(final)}; pass the folder itself or "
            "choose another --output-dir"
        )
    if not final.exists():
        return
    if not final.is_dir():
        what = "a file" if final.is_file() else "not a folder"
        raise DatasetBuildError(
            f"{shown}: exists and is {what}, not a dataset folder; choose another --output-dir"
        )
    entries = sorted(final.iterdir())
    if not entries:
        return
    has_metadata, foreign = _layout_check(final)
    if not has_metadata:
        raise DatasetBuildError(
            f"{shown}: exists and holds {_entries_that_are([_entry_label(p) for p in entries])} "
            "not a dataset built here; choose another --output-dir"
        )
    if foreign:
        raise DatasetBuildError(
            f"{shown}: holds a dataset and {_entries_that_are(foreign)} not part of one; move "
            "them out or choose another --output-dir"
        )
    if not overwrite:
        raise DatasetBuildError(
            f"{shown}: holds a dataset built earlier; pass --overwrite to replace it"
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user
        return True
    except (OSError, OverflowError):
        return False
    return True


def _folder_mib(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 2**20


def _remove_leftovers(final: Path) -> None:
    """Remove what killed builds into ``final`` left in its parent folder, one line each: the
    temporary folders of processes that no longer run, and a stale previous version."""
    prefix = f".{final.name}.tmp-"
    leftovers: list[tuple[Path, str]] = []
    for entry in final.parent.iterdir():
        pid_text = entry.name[len(prefix) :]
        if not entry.name.startswith(prefix) or not (pid_text.isascii() and pid_text.isdigit()):
            continue
        pid = int(pid_text)
        # Our own PID on a leftover means a dead process had it before us.
        if pid == 0 or (pid != os.getpid() and _process_alive(pid)):
            continue
        leftovers.append((entry, f"left by build process {pid}, which no longer runs"))
    aside = aside_path(final)
    if aside.is_dir() and not aside.is_symlink() and final.exists():
        leftovers.append((aside, "the previous version left by a build killed after replacing it"))
    for entry, why in leftovers:
        if entry.is_dir() and not entry.is_symlink():
            size = _folder_mib(entry)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            size = entry.lstat().st_size / 2**20
            with contextlib.suppress(OSError):
                entry.unlink()
        if os.path.lexists(entry):
            print(f"note: could not remove {entry} ({why}); remove it by hand")
        else:
            print(f"note: removed {entry} ({size:.1f} MiB), {why}")


class _InterruptGuard:
    """While entered (main thread only), SIGTERM and SIGINT remove ``tmp`` and raise
    ``BuildInterruptedError``; once ``defer()`` is called, or after the first one, further signals
    are only recorded in ``pending`` so that cleanup and the final swap run to the end."""

    def __init__(self, tmp: Path, shown: str | os.PathLike[str], final: Path) -> None:
        self.tmp, self.shown, self.final = tmp, shown, final
        self.pending: int | None = None
        self._deferred = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in _INTERRUPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def defer(self) -> None:
        self._deferred = True

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferred:
            self.pending = signum
            return
        self._deferred = True
        shutil.rmtree(self.tmp, ignore_errors=True)
        state = "is unchanged" if os.path.lexists(self.final) else "was not created"
        raise BuildInterruptedError(
            f"{self.shown}: build stopped by {signal.Signals(signum).name}; removed its "
            f"temporary folder {self.tmp.name}, {self.shown} {state}",
            signum,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def atomic_output_dir(
    output_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``output_dir`` only if the block succeeds.

    ``output_dir`` is checked first (``check_output_dir``; ``overwrite`` allows replacing a
    dataset built earlier) and again just before the swap. Leftovers of killed builds into the
    same path are removed first. On any exception, SIGTERM or SIGINT the temporary folder is
    removed and ``output_dir`` is left as it was (absent, or the previous complete dataset);
    an ``OSError`` (disk full, no permission) becomes a one-line ``DatasetBuildError``.
    """
    shown = output_dir
    final = _absolute(output_dir)
    check_output_dir(output_dir, overwrite=overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(final)
    except OSError as e:
        raise DatasetBuildError(
            f"{shown}: cannot create or read its parent folder ({_reason(e)}); "
            "choose another --output-dir"
        ) from None
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with _InterruptGuard(tmp, shown, final) as guard:
        try:
            tmp.mkdir()
        except OSError as e:
            raise DatasetBuildError(
                f"{shown}: cannot write in {final.parent} ({_reason(e)}); "
                "choose another --output-dir"
            ) from None
        done = False
        try:
            yield tmp
            guard.defer()
            check_output_dir(output_dir, overwrite=overwrite)  # it may have changed meanwhile
            swap_folder_into_place(tmp, final)
            done = True
        except OSError as e:
            state = "is unchanged" if os.path.lexists(final) else "was not created"
            hint = _WRITE_HINTS.get(e.errno or 0, "check the disk")
            raise DatasetBuildError(
                f"{shown}: writing the dataset failed ({_reason(e)}); removed the temporary "
                f"folder, {shown} {state}; {hint} or choose another --output-dir"
            ) from None
        finally:
            guard.defer()
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
    if guard.pending is not None:
        name = signal.Signals(guard.pending).name
        print(f"note: {name} arrived while {shown} was being moved into place; it is complete")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    # One dumps + write: json.dump's many small writes are several times slower on big objects.
    text = json.dumps(obj)
    with open(path, "w") as f:
        f.write(text)


def write_metadata(split_dir: Path, metadata: PuzzleDatasetMetadata) -> None:
    write_json(split_dir / "dataset.json", metadata.model_dump(exclude_none=True))


def write_identifiers(output_dir: Path, names_by_id: Sequence[str]) -> None:
    """Write ``identifiers.json``: a list indexed by puzzle identifier (index 0 is the blank)."""
    write_json(output_dir / "identifiers.json", list(names_by_id))


def write_single_example_split(
    split_dir: Path,
    inputs: np.ndarray,
    labels: np.ndarray,
    group_sizes: Sequence[int] | np.ndarray,
    *,
    vocab_size: int,
    pad_id: int,
    ignore_label_id: int | None,
    num_puzzle_identifiers: int = 1,
    set_name: str = "all",
) -> PuzzleDatasetMetadata:
    """Write a split where every puzzle has one example and all share puzzle identifier 0.

    This is the Sudoku and Maze layout: ``inputs``/``labels`` are ``[N, seq_len]`` uint8,
    consecutive rows are grouped into ``group_sizes`` (original + its augmentations).
    """
    split_dir.mkdir(parents=True, exist_ok=True)
    n, seq_len = inputs.shape
    group_sizes = np.asarray(group_sizes, dtype=np.int64)
    if int(group_sizes.sum()) != n:
        raise ValueError(f"group sizes sum to {int(group_sizes.sum())}, expected {n} rows")
    arrays = {
        "inputs": inputs.astype(np.uint8),
        "labels": labels.astype(np.uint8),
        "puzzle_identifiers": np.zeros(n, dtype=np.int32),
        "puzzle_indices": np.arange(n + 1, dtype=np.int32),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int32),
    }
    for field, arr in arrays.items():
        np.save(split_dir / f"{set_name}__{field}.npy", arr)
    metadata = PuzzleDatasetMetadata(
        pad_id=pad_id,
        ignore_label_id=ignore_label_id,
        blank_identifier_id=0,
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_puzzle_identifiers=num_puzzle_identifiers,
        total_groups=len(group_sizes),
        mean_puzzle_examples=1.0,
        total_puzzles=n,
        sets=[set_name],
    )
    write_metadata(split_dir, metadata)
    return metadata


# ----------------------------------------------------------------------------------------------
# Command-line plumbing
# ----------------------------------------------------------------------------------------------
def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a builder's ``main``; a ``UserError`` (``DatasetBuildError``, ``DataError``) prints one
    ``error:`` line and returns 2; a build stopped by a signal returns 128 + its number."""
    try:
        main(argv)
    except BuildInterruptedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def flag_aliases(name: str) -> list[str]:
    """Accept both ``--num-aug`` and argdantic's ``--num_aug`` spellings of a flag."""
    dashed = "--" + name.replace("_", "-")
    under = "--" + name
    return [dashed] if dashed == under else [dashed, under]


def parse_literal_list(values: Sequence[str]) -> list[str]:
    """Accept ``--subsets a b c`` as well as ``--subsets "['a','b']"``."""
    if len(values) == 1 and values[0].startswith("["):
        return [str(v) for v in ast.literal_eval(values[0])]
    return list(values)
