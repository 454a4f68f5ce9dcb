"""Writes that a kill at any moment leaves either complete or absent: the old version or the new.

Used by the dataset builders (the output folder), checkpoints (``step_N``) and the evaluators
(``submission.json``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_folder_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final`` (same parent folder).

    An existing ``final`` is first moved aside to the hidden ``.<name>.old``, then removed once
    ``tmp`` is in place, so at every moment one complete version exists under one of the names.
    """
    aside_tmp = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(aside_tmp, ignore_errors=True)
        final.rename(aside_tmp)
    tmp.rename(final)
    shutil.rmtree(aside_tmp, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """``path.write_text(text)`` through a hidden temporary file renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
