"""Writes that a kill at any moment leaves either complete or absent: the old version or the new.

Used by the dataset builders (the output folder), checkpoints (``step_N``) and the evaluators
(``submission.json``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def aside_path(final: Path) -> Path:
    """Where ``swap_folder_into_place`` keeps the previous version of ``final`` during the swap."""
    return final.with_name(f".{final.name}.old")


def swap_folder_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final`` (same parent folder).

    An existing ``final`` is first moved aside to the hidden ``aside_path(final)``, then removed
    once ``tmp`` is in place, so at every moment one complete version exists under one of the
    names. If ``tmp`` cannot be renamed, the previous version is moved back before the error
    propagates.
    """
    aside = aside_path(final)
    moved_aside = False
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        moved_aside = True
    try:
        tmp.rename(final)
    except BaseException:
        if moved_aside and not os.path.lexists(final):
            aside.rename(final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """``path.write_text(text)`` through a hidden temporary file renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
