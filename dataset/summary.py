"""Print what the loader sees in a built dataset.

    python -m dataset.summary data/arc1-aug-1000 [more paths] [--global-batch-size 768]

For each split: the merged metadata, and the number of batches one epoch (train) or one pass
(test) gives at the global batch size, read through ``PuzzleDataset`` exactly as training will.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig


def summarise(paths: list[str], global_batch_size: int) -> dict[str, dict[str, object]]:
    """Per split: metadata fields, batches per epoch/pass, and label-token statistics."""
    out: dict[str, dict[str, object]] = {}
    for split, test_mode in (("train", False), ("test", True)):
        config = PuzzleDatasetConfig(
            seed=0,
            dataset_paths=paths,
            global_batch_size=global_batch_size,
            test_set_mode=test_mode,
            epochs_per_iter=1,
        )
        try:
            ds = PuzzleDataset(config, split)
        except FileNotFoundError:
            continue
        batches = list(ds)
        labelled = [int((b["labels"] != -100).sum()) for _, b, _ in batches]
        out[split] = {
            **ds.metadata.model_dump(exclude_none=True),
            "batches_per_epoch" if not test_mode else "batches_per_pass": len(batches),
            "mean_labelled_tokens_per_example": round(
                float(np.sum(labelled)) / max(1, sum(len(b["labels"]) for _, b, _ in batches)), 1
            ),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("--global-batch-size", type=int, default=768)
    args = p.parse_args(argv)
    try:
        summary = summarise(args.paths, args.global_batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not summary:
        print(f"error: no train or test split under {args.paths}", file=sys.stderr)
        return 2
    for split, info in summary.items():
        print(f"[{split}]")
        for key, value in info.items():
            print(f"  {key:34s} {value}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
