"""ETRM's builder command: the ARC builder with the strict split, for demonstration encoders.

    python -m dataset.build_arc_dataset_encoder --input-file-prefix kaggle/combined/arc-agi \\
        --output-dir data/arc1concept-encoder-aug-1000 --subsets training evaluation concept \\
        --test-set-name evaluation

This is ``dataset.build_arc_dataset`` with ``--split-policy strict`` fixed (ETRM's
``dataset/build_arc_dataset_encoder.py``): every pair of an evaluation task, demos first, goes to
the ``test`` split, so the evaluation tasks are unseen in training; each split stores
``all__num_demos.npy`` and ``dataset.json`` records ``split_policy: strict``. ETRM's flags and
defaults are those of ``build_arc_dataset`` (``--input-file-prefix``, ``--output-dir``,
``--subsets``, ``--test-set-name``, ``--test-set-name2``, ``--seed`` 42, ``--num-aug`` 1000,
``--puzzle-identifiers-start`` 1), and its other flags (``--source``, ``--input-dir``,
``--max-tasks``, ``--overwrite``) work here too; ``--split-policy`` accepts only ``strict``.

The layout equals ETRM's; the bytes do not: task order and augmentations are drawn from
per-task seeded generators instead of the global NumPy RNG, and duplicate variants are
recognised by their multiset of pairs. ``dataset.reader`` reads datasets built by ETRM's own
builder as well.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python dataset/build_arc_dataset_encoder.py` as well as `-m`
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sys
from collections.abc import Sequence

from dataset import build_arc_dataset
from dataset.common import run_cli

PROG = "python -m dataset.build_arc_dataset_encoder"


def main(argv: Sequence[str] | None = None) -> None:
    """Build the strict-split ARC dataset described by the command line ``argv``."""
    build_arc_dataset.main(argv, prog=PROG, split_policy="strict")


if __name__ == "__main__":
    sys.exit(run_cli(main))
