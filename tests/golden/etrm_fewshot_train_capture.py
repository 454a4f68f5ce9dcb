"""Writes ``etrm_fewshot_train_batches.json``: what ETRM's few-shot training loader yields.

ETRM's ``FewShotPuzzleDataset`` (bdsaglam/etrm at 109b070, ``dataset/fewshot_puzzle_dataset.py``)
in training mode on ``tests/fixtures/etrm_encoder_dataset``, for each case of ``CASES`` and each
rank: its batches over ``ITERATIONS`` iterations (one ``iter`` per iteration, so its counter
moves as in training), each as the rank's puzzle identifiers and one sha256 over the collated
fields of ``HASHED`` in that order. ETRM's code is read from a checkout given on the command
line, never copied here; it needs numpy, pydantic and torch (this repository's venv has them)::

    mkdir -p /tmp/etrm && git -C ETRM_REPO archive 109b070 dataset models | tar -x -C /tmp/etrm
    .venv/bin/python tests/golden/etrm_fewshot_train_capture.py /tmp/etrm
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "fixtures" / "etrm_encoder_dataset"
OUT = HERE / "etrm_fewshot_train_batches.json"
HASHED = ("demo_inputs", "demo_labels", "demo_mask", "inputs", "labels", "puzzle_identifiers")
ITERATIONS = 4
# (seed, global_batch_size, epochs_per_iter, num_replicas, max_demos, max_groups)
CASES = [
    (0, 3, 2, 1, 10, None),
    (7, 3, 5, 1, 10, None),
    (3, 8, 4, 1, 10, None),
    (3, 8, 4, 2, 10, None),
    (11, 8, 6, 2, 4, None),
    (5, 2, 3, 2, 10, 2),
    (2, 4, 7, 2, 2, None),
]


def capture(etrm: Path) -> dict[str, Any]:
    """Runs ETRM's loader for every case and rank; the JSON document ``OUT`` holds."""
    sys.path.insert(0, str(etrm))
    module = importlib.import_module("dataset.fewshot_puzzle_dataset")
    if not Path(module.__file__).resolve().is_relative_to(etrm):
        raise SystemExit(f"imported {module.__file__}, not ETRM's loader under {etrm}")
    cases = []
    for seed, gbs, epochs, replicas, max_demos, max_groups in CASES:
        per_rank = []
        for rank in range(replicas):
            config = module.FewShotPuzzleDatasetConfig(
                seed=seed,
                dataset_paths=[str(FIXTURE)],
                global_batch_size=gbs,
                test_set_mode=False,
                epochs_per_iter=epochs,
                rank=rank,
                num_replicas=replicas,
                max_demos=max_demos,
                max_groups=max_groups,
            )
            loader = module.FewShotPuzzleDataset(config, split="train")
            iterations = []
            for _ in range(ITERATIONS):
                batches = []
                for set_name, batch, effective in loader:
                    assert set_name == "all" and effective == gbs
                    digest = hashlib.sha256()
                    for key in HASHED:
                        digest.update(batch[key].numpy().tobytes())
                    batches.append([batch["puzzle_identifiers"].tolist(), digest.hexdigest()])
                iterations.append(batches)
            per_rank.append(iterations)
        # Regrouped as iteration -> batch -> rank, the order a test compares in.
        iterations = [
            [[per_rank[r][i][b] for r in range(replicas)] for b in range(len(per_rank[0][i]))]
            for i in range(ITERATIONS)
        ]
        cases.append(
            {
                "seed": seed,
                "global_batch_size": gbs,
                "epochs_per_iter": epochs,
                "num_replicas": replicas,
                "max_demos": max_demos,
                "max_groups": max_groups,
                "iterations": iterations,
            }
        )
    return {
        "etrm_commit": "109b0706aa4e9134fbe7369a8e2e8fea54fbfbe9",
        "loader": "dataset/fewshot_puzzle_dataset.py FewShotPuzzleDataset, test_set_mode=False",
        "fixture": "tests/fixtures/etrm_encoder_dataset (train split)",
        "batch": "[puzzle_identifiers of the rank's rows, sha256 of " + ", ".join(HASHED) + "]",
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: the path of an ETRM checkout (its ``dataset`` and ``models`` folders)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("etrm", type=Path, help="root of an ETRM checkout at 109b070")
    args = parser.parse_args(argv)
    document = capture(args.etrm.resolve())
    OUT.write_text(json.dumps(document, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({sum(len(c['iterations']) for c in document['cases'])} iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
