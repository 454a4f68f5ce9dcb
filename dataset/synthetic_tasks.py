"""A synthetic family of ARC tasks whose rule can be read only from the demonstration pairs.

    python -m dataset.synthetic_tasks --output-dir data/icl-src --train-tasks 2000 \\
        --eval-tasks 100 --seed 0
    python -m dataset.build_arc_dataset --input-dir data/icl-src --subsets training evaluation \\
        --test-set-name evaluation --split-policy strict --num-aug 0 --output-dir data/icl

Each task is a colour substitution: every cell of colour A becomes colour B, every other cell
is kept (A and B in 1..9, A != B; 0 stays background, as the builder's colour permutations keep
it). A task's grids are small random grids, each painted with ``palette_size`` distinct colours
that all occur, A always among them; the palette's other colours are drawn uniformly from the
remaining nine, independently of B. Tasks differ only in (A, B), so the rule of a new task is
known only through its demonstrations.

Held-out rules (``heldout_offsets``): with colours numbered 1..9 around a circle, the rules
whose step ``(B - A) mod 9`` is in the held-out set are given only to evaluation tasks, so an
evaluation task's rule never occurs in training (build with ``--num-aug 0``: the builder's colour
permutations would map training rules onto held-out ones). Each source colour keeps
``8 - len(offsets)`` training targets and gets ``len(offsets)`` held-out ones.

What a model that never sees the demonstrations can reach (``demo_free_bound``): it sees one
query input, and the only thing about that input that depends on the rule is its set of colours
S, which contains A; the cells, given S, and the grid's size are independent of (A, B). The best
exact accuracy of any such model, however trained, is therefore the Bayes rate
``sum over S of max over rules (a, b) of P(a, b) * P(S | a)``, computed exactly by enumerating
the palettes. Copying the input scores 0 (A always occurs and always changes).

Files: ``<output-dir>/training/<name>.json`` and ``<output-dir>/evaluation/<name>.json`` (the
layout ``build_arc_dataset --input-dir`` reads) and ``family.json`` (the settings, the rule of
every task and the demo-free bounds).
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python dataset/synthetic_tasks.py` as well as `-m`
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import itertools
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from dataset.common import DatasetBuildError, atomic_output_dir, flag_aliases, run_cli
from utils.atomic import swap_folder_into_place

NUM_COLOURS = 10
RULE_COLOURS = tuple(range(1, NUM_COLOURS))  # A and B; 0 is the background
SUBSETS = ("training", "evaluation")
NAME_PREFIX = {"training": "train", "evaluation": "eval"}
FAMILY_FILE = "family.json"
ARC_CANVAS = 30  # the ARC builder's canvas side (seq_len 900)
PAD_TOKEN, EOS_TOKEN, COLOUR_TOKEN = 0, 1, 2  # colour c is token c + 2
TOKEN_KINDS = ("inputs", "labels")

Rule = tuple[int, int]
Grid = list[list[int]]


@dataclass(frozen=True)
class SubstitutionFamily:
    """How the family's tasks are drawn.

    ``min_side``..``max_side``: grid rows and columns, drawn independently and uniformly.
    ``palette_size``: distinct colours per grid, all present, A among them.
    ``num_demos``: demonstration pairs per task; ``min_tests``..``max_tests``: test pairs.
    ``heldout_offsets``: steps ``(B - A) mod 9`` (1..8) whose rules only evaluation tasks get;
    empty: evaluation tasks draw from all 72 rules.
    """

    min_side: int = 3
    max_side: int = 5
    palette_size: int = 3
    num_demos: int = 3
    min_tests: int = 1
    max_tests: int = 2
    heldout_offsets: tuple[int, ...] = (2, 5, 8)

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.min_side <= self.max_side <= 30, "need 1 <= min_side <= max_side <= 30"),
            (1 <= self.palette_size <= NUM_COLOURS, "palette_size must be in 1..10"),
            (self.palette_size <= self.min_side**2, "palette_size exceeds min_side**2 cells"),
            (self.num_demos >= 1, "num_demos must be >= 1"),
            (1 <= self.min_tests <= self.max_tests, "need 1 <= min_tests <= max_tests"),
            (all(1 <= d <= 8 for d in self.heldout_offsets), "heldout_offsets must be in 1..8"),
            (len(set(self.heldout_offsets)) == len(self.heldout_offsets), "offset given twice"),
            (len(self.heldout_offsets) < 8, "at least one offset must stay for training"),
        ]
        for ok, why in checks:
            if not ok:
                raise DatasetBuildError(f"synthetic task family: {why} ({self})")

    def rule_split(self) -> tuple[list[Rule], list[Rule]]:
        """``(training_rules, evaluation_rules)``; disjoint unless ``heldout_offsets`` is empty
        (then both are all 72 rules)."""
        rules = [(a, b) for a in RULE_COLOURS for b in RULE_COLOURS if a != b]
        if not self.heldout_offsets:
            return rules, rules
        heldout = set(self.heldout_offsets)
        train = [r for r in rules if rule_offset(r) not in heldout]
        return train, [r for r in rules if rule_offset(r) in heldout]


def rule_offset(rule: Rule) -> int:
    """The step from A to B around the circle of colours 1..9: ``(B - A) mod 9``, in 1..8."""
    a, b = rule
    return (b - a) % len(RULE_COLOURS)


def apply_rule(grid: np.ndarray, rule: Rule) -> np.ndarray:
    """``grid`` [rows, cols] with every cell of colour A set to B."""
    a, b = rule
    return np.where(grid == a, b, grid).astype(grid.dtype)


def sample_grid(rng: np.random.Generator, family: SubstitutionFamily, source: int) -> np.ndarray:
    """A random uint8 grid [rows, cols] painted with ``palette_size`` distinct colours, all of
    them present, ``source`` among them; the other colours are uniform over the remaining nine."""
    rows, cols = rng.integers(family.min_side, family.max_side + 1, size=2)
    others = [c for c in range(NUM_COLOURS) if c != source]
    palette = np.array([source, *rng.choice(others, family.palette_size - 1, replace=False)])
    # Rejection keeps the cells uniform over the paintings that use every palette colour, so
    # given the palette they say nothing about which colour is the source.
    while True:
        grid = palette[rng.integers(0, len(palette), size=(rows, cols))].astype(np.uint8)
        if len(np.unique(grid)) == len(palette):
            return grid


def sample_task(rng: np.random.Generator, family: SubstitutionFamily, rule: Rule) -> dict:
    """One ARC task ``{"train": [{"input", "output"}...], "test": [...]}`` following ``rule``."""
    num_tests = int(rng.integers(family.min_tests, family.max_tests + 1))

    def pair() -> dict[str, Grid]:
        grid = sample_grid(rng, family, rule[0])
        return {"input": grid.tolist(), "output": apply_rule(grid, rule).tolist()}

    return {
        "train": [pair() for _ in range(family.num_demos)],
        "test": [pair() for _ in range(num_tests)],
    }


@dataclass
class GeneratedFamily:
    """The tasks of one draw: per subset, task name -> ARC JSON, and each task's rule."""

    family: SubstitutionFamily
    seed: int
    tasks: dict[str, dict[str, dict]] = field(default_factory=dict)
    rules: dict[str, dict[str, Rule]] = field(default_factory=dict)


def generate(
    family: SubstitutionFamily, train_tasks: int, eval_tasks: int, seed: int
) -> GeneratedFamily:
    """Draw ``train_tasks`` training and ``eval_tasks`` evaluation tasks, each with a rule drawn
    uniformly from its subset's rules (``SubstitutionFamily.rule_split``)."""
    if train_tasks < 1 or eval_tasks < 1:
        raise DatasetBuildError(
            f"--train-tasks and --eval-tasks must be >= 1, got {train_tasks} and {eval_tasks}"
        )
    out = GeneratedFamily(family=family, seed=seed)
    for s_idx, (subset, rules, count) in enumerate(
        zip(SUBSETS, family.rule_split(), (train_tasks, eval_tasks), strict=True)
    ):
        # One stream per subset: the evaluation tasks do not change with --train-tasks.
        rng = np.random.default_rng([seed, s_idx])
        out.tasks[subset], out.rules[subset] = {}, {}
        width = len(str(count - 1))
        for i in range(count):
            rule = rules[int(rng.integers(0, len(rules)))]
            name = f"{NAME_PREFIX[subset]}{i:0{width}d}"
            out.tasks[subset][name] = sample_task(rng, family, rule)
            out.rules[subset][name] = rule
    return out


def demo_free_bound(family: SubstitutionFamily, rules: Sequence[Rule]) -> Fraction:
    """The best exact accuracy on one query of any predictor that sees only the query input,
    for tasks whose rule is uniform over ``rules``.

    The input's colour set S is the only rule-dependent part of the query: P(S | a) is
    ``1 / C(9, k - 1)`` when a is in S (k = ``palette_size``) and 0 otherwise, and the cells and
    size given S do not depend on the rule. Each (a, b) with a in S yields a different output,
    so the Bayes-optimal predictor picks the most probable rule given S, and its accuracy is
    ``sum_S max_(a, b) P(a, b) P(S | a)``.
    """
    if not rules:
        raise ValueError("demo_free_bound needs at least one rule")
    p_rule = Fraction(1, len(rules))
    p_palette = Fraction(1, comb(NUM_COLOURS - 1, family.palette_size - 1))
    sources = {a for a, _ in rules}
    total = Fraction(0)
    for palette in itertools.combinations(range(NUM_COLOURS), family.palette_size):
        # Under a uniform prior every rule whose source is in S is equally likely.
        if sources.intersection(palette):
            total += p_rule * p_palette
    return total


def family_record(generated: GeneratedFamily) -> dict[str, Any]:
    """What ``family.json`` holds: settings, rule sets, each task's rule, the bounds."""
    family = generated.family
    train_rules, eval_rules = family.rule_split()
    return {
        "family": "colour_substitution",
        "settings": asdict(family),
        "seed": generated.seed,
        "rules": {"training": train_rules, "evaluation": eval_rules},
        "task_rules": generated.rules,
        "demo_free_bound": {
            "evaluation": float(demo_free_bound(family, eval_rules)),
            "training": float(demo_free_bound(family, train_rules)),
        },
    }


def _check_output_dir(folder: Path, overwrite: bool) -> None:
    """An absent or empty folder is written; one written here earlier only with ``overwrite``;
    anything else never."""
    if not folder.exists():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise DatasetBuildError(
            f"{folder}: exists and is not a folder; choose another --output-dir"
        )
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    ours = (folder / FAMILY_FILE).is_file() and all(
        name == FAMILY_FILE
        or (name in SUBSETS and all(p.suffix == ".json" for p in (folder / name).iterdir()))
        for name in entries
    )
    if not ours:
        raise DatasetBuildError(
            f"{folder}: holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}, "
            "not tasks written by dataset.synthetic_tasks; choose another --output-dir"
        )
    if not overwrite:
        raise DatasetBuildError(f"{folder}: holds tasks written earlier; pass --overwrite")


def write_family(generated: GeneratedFamily, output_dir: str | os.PathLike[str], *,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write every task and ``family.json`` into ``output_dir`` (replaced as a whole, so a
    failed write leaves the previous version). Returns the folder."""
    final = Path(os.path.abspath(output_dir))
    _check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for subset, tasks in generated.tasks.items():
            (tmp / subset).mkdir(parents=True)
            for name, task in tasks.items():
                (tmp / subset / f"{name}.json").write_text(json.dumps(task))
        (tmp / FAMILY_FILE).write_text(json.dumps(family_record(generated), indent=1))
        swap_folder_into_place(tmp, final)
    except OSError as e:
        raise DatasetBuildError(f"{output_dir}: writing the tasks failed ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _origin_crop(
    inputs: np.ndarray, labels: np.ndarray, side: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 900] canvases → uint8 [N, side·side]: each example's grids moved from their
    offset (shared by input and label: the input grid's top-left cell) to the origin, with the
    EOS row below and the EOS column right of each grid drawn afresh (the builder leaves them
    out where a translated grid touches the 30 × 30 edge)."""
    n = len(inputs)
    canvas = np.concatenate([inputs, labels]).reshape(2 * n, ARC_CANVAS, ARC_CANVAS)
    colour = canvas >= COLOUR_TOKEN
    if not colour[:n].any(axis=(1, 2)).all():
        raise DatasetBuildError(f"{where}: an example without any grid cell")
    r0 = np.tile(np.argmax(colour[:n].any(axis=2), axis=1), 2)
    c0 = np.tile(np.argmax(colour[:n].any(axis=1), axis=1), 2)
    padded = np.pad(canvas, ((0, 0), (0, side), (0, side)))  # PAD beyond the 30 × 30 edge
    r = np.arange(side)[None, :, None]
    c = np.arange(side)[None, None, :]
    window = padded[np.arange(2 * n)[:, None, None], r0[:, None, None] + r, c0[:, None, None] + c]
    cells = window >= COLOUR_TOKEN
    h = cells.any(axis=2).sum(axis=1)[:, None, None]
    w = cells.any(axis=1).sum(axis=1)[:, None, None]
    lost = cells.sum(axis=(1, 2)) != colour.sum(axis=(1, 2))
    lost |= (h[:, 0, 0] >= side) | (w[:, 0, 0] >= side)
    if lost.any():
        raise DatasetBuildError(
            f"{where}: example {int(np.argmax(lost)) % n} does not fit a {side}x{side} canvas "
            "with its EOS frame; choose a larger canvas side"
        )
    eos = ((r == h) & (c < w)) | ((c == w) & (r < h))
    compact = np.where(cells, window, np.where(eos, EOS_TOKEN, PAD_TOKEN)).astype(np.uint8)
    flat = compact.reshape(2 * n, side * side)
    return flat[:n], flat[n:]


def compact_canvas(src: str | os.PathLike[str], dst: str | os.PathLike[str], side: int, *,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Copy an ARC build (``dataset.build_arc_dataset``) to ``dst`` on a side × side canvas.

    Every example's input and label move from their offset on the 30 × 30 canvas to the origin
    of a ``side`` × ``side`` one, each framed by its EOS row and column; everything else
    (identifiers, groups, ``num_demos``, ``test_puzzles.json``, the split policy) is kept, and
    ``seq_len`` becomes ``side**2``. The family's grids fill a few dozen of the 900 tokens and
    attention grows with the square of the sequence, so this makes a CPU run two orders of
    magnitude cheaper. The builder's translation augmentation is undone, which a colour
    substitution does not need. ``side`` must exceed the largest grid side (room for the EOS
    frame). Refuses ``dst`` as the builders do (``dataset.common.atomic_output_dir``).
    """
    if not 1 <= side <= ARC_CANVAS:
        raise DatasetBuildError(f"canvas side must be in 1..{ARC_CANVAS}, got {side}")
    source = Path(src)
    with atomic_output_dir(dst, overwrite=overwrite) as out:
        for split in ("train", "test"):
            if not (source / split / "dataset.json").is_file():
                continue
            (out / split).mkdir()
            for f in sorted((source / split).glob("*.npy")):
                if not f.name.endswith(tuple(f"__{kind}.npy" for kind in TOKEN_KINDS)):
                    shutil.copy2(f, out / split / f.name)
            metadata = json.loads((source / split / "dataset.json").read_text())
            for set_name in metadata["sets"]:
                inputs, labels = (
                    np.load(source / split / f"{set_name}__{kind}.npy") for kind in TOKEN_KINDS
                )
                cropped = _origin_crop(inputs, labels, side, str(source / split))
                for kind, part in zip(TOKEN_KINDS, cropped, strict=True):
                    np.save(out / split / f"{set_name}__{kind}.npy", part)
            metadata["seq_len"] = side * side
            (out / split / "dataset.json").write_text(json.dumps(metadata))
        for name in ("identifiers.json", "test_puzzles.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
    return Path(dst)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = SubstitutionFamily()
    p = argparse.ArgumentParser(
        prog="python -m dataset.synthetic_tasks", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(*flag_aliases("output_dir"), dest="output_dir", required=True)
    p.add_argument(*flag_aliases("train_tasks"), dest="train_tasks", type=int, required=True)
    p.add_argument(*flag_aliases("eval_tasks"), dest="eval_tasks", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    helps = {"palette_size": "distinct colours per grid, A among them"}
    for name in ("min_side", "max_side", "palette_size", "num_demos", "min_tests", "max_tests"):
        p.add_argument(*flag_aliases(name), dest=name, type=int, default=getattr(defaults, name),
                       help=helps.get(name))  # fmt: skip
    p.add_argument(
        *flag_aliases("heldout_offsets"),
        dest="heldout_offsets",
        type=int,
        nargs="*",
        default=list(defaults.heldout_offsets),
        help="steps (B - A) mod 9 whose rules only evaluation tasks get; none: all rules shared",
    )
    p.add_argument("--overwrite", action="store_true", help="replace tasks written here earlier")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    family = SubstitutionFamily(
        min_side=a.min_side,
        max_side=a.max_side,
        palette_size=a.palette_size,
        num_demos=a.num_demos,
        min_tests=a.min_tests,
        max_tests=a.max_tests,
        heldout_offsets=tuple(a.heldout_offsets),
    )
    generated = generate(family, a.train_tasks, a.eval_tasks, a.seed)
    folder = write_family(generated, a.output_dir, overwrite=a.overwrite)
    record = family_record(generated)
    print(
        f"{a.train_tasks} training tasks ({len(record['rules']['training'])} rules), "
        f"{a.eval_tasks} evaluation tasks ({len(record['rules']['evaluation'])} rules) in "
        f"{folder}; best demo-free exact accuracy on evaluation tasks "
        f"{record['demo_free_bound']['evaluation']:.4f}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
