"""The run's loaders: upstream's ``PuzzleDataset`` yielding whole batches, with the batch
fields the model family reads, and the start-up checks of the data against the run.

A family that reads ``demo_inputs`` is conditioned on demonstrations (ETRM): its training loader
uses ``sampler`` or ``few_shot`` and its evaluation loader ``few_shot_eval`` (``dataset.few_shot``)
with the run's ``max_demos``, ``max_train_groups``/``max_eval_groups`` and ``target_policy``, on
ARC data whose evaluation tasks are unseen (``--split-policy strict``). Any other family's loaders
are ``sampler`` (default ``uniform``) and ``sequential``, with ``max_train_groups`` and
``max_eval_groups`` as their ``max_groups``: every family trains and evaluates on the same first
N task groups of each set.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from dataset.common import DataError, PuzzleDatasetMetadata
from dataset.demos import DEMO_FIELDS
from dataset.few_shot import DemoSampler, FewShotSampler
from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from dataset.reader import find_source, load_metadata
from dataset.sampling import SAMPLERS, UniformSampler
from models.family import family_of
from training.config import PretrainConfig
from utils.distributed import DistInfo
from utils.schema import ConfigError


def reads_demos(config: PretrainConfig) -> bool:
    """Whether the run's model family is conditioned on demonstrations."""
    return "demo_inputs" in family_of(config.arch).batch_fields


def _demo_sampling(config: PretrainConfig, test_set_mode: bool) -> tuple[str, dict[str, Any]]:
    """The sampler and its options for a family that reads demonstrations."""
    if test_set_mode:
        return "few_shot_eval", {
            "max_demos": config.max_demos,
            "max_groups": config.max_eval_groups,
        }
    name = config.sampler or "few_shot"
    if name not in SAMPLERS or not issubclass(SAMPLERS.get(name), DemoSampler):
        raise ConfigError(
            f"sampler={name} does not choose demonstrations, which arch {config.arch.name} reads; "
            "use sampler=few_shot or leave sampler unset"
        )
    options = {"max_demos": config.max_demos, "max_groups": config.max_train_groups}
    if config.batch_fill != "continue":  # absent from the default, so older checkpoints resume
        options["batch_fill"] = config.batch_fill
    return name, {**options, "target_policy": config.target_policy}


def _hard_example_sampler(config: PretrainConfig) -> str:
    """``sampling=hard_examples``'s training sampler; one line for a family that reads
    demonstrations, whose few-shot samplers choose rows and demos otherwise."""
    if reads_demos(config):
        raise ConfigError(
            f"sampling=hard_examples weights the uniform sampler's variant picks, but arch "
            f"{config.arch.name} reads demonstrations (few-shot samplers); use sampling=uniform"
        )
    return "hard_examples"


def check_demo_data(paths: list[str], split: str) -> None:
    """Data built with ``--split-policy trm`` trains on the evaluation tasks' demos and has no
    demos in its test split: refuse it for a model that reads demonstrations."""
    for path in paths:
        metadata = load_metadata(find_source(path, split))
        if metadata.split_policy == "trm":
            raise DataError(
                f"{path}: built with --split-policy trm, which trains on the evaluation tasks' "
                "demos and leaves none in its test split; a model conditioned on demonstrations "
                "needs unseen evaluation tasks: rebuild it with --split-policy strict (python -m "
                "dataset.build_arc_dataset_encoder)"
            )


def create_dataloader(
    config: PretrainConfig,
    split: str,
    dist_info: DistInfo,
    *,
    test_set_mode: bool,
    with_demos: bool = False,
) -> tuple[DataLoader, PuzzleDataset]:
    """Upstream's loader: ``PuzzleDataset`` yields whole batches (``batch_size=None``).

    ``with_demos`` (evaluation with test-time search): the few-shot evaluation rows, every query
    with its task's demos (ETRM's evaluation loader), also for a family that reads no demos
    (TRM, whose search variable is a fresh puzzle-embedding row), the demo fields added. Those
    rows are the queries only, so TRM's plain per-row metrics then leave out the demonstration
    pairs a strict split's test set also holds; the ARC evaluator never scored those.
    """
    if with_demos and not test_set_mode:
        raise ValueError("with_demos is for evaluation loaders (test_set_mode=True)")
    use_test_paths = split == "test" and config.data_paths_test
    paths = config.data_paths_test if use_test_paths else config.data_paths
    sampler, options = None if test_set_mode else config.sampler, {}
    max_groups = config.max_eval_groups if test_set_mode else config.max_train_groups
    if max_groups is not None:  # absent otherwise, so that states saved without it resume
        options = {"max_groups": max_groups}
    fields = list(family_of(config.arch).batch_fields)
    if reads_demos(config) or with_demos:
        if not reads_demos(config):
            fields += DEMO_FIELDS  # for the search only
        sampler, options = _demo_sampling(config, test_set_mode)
        check_demo_data(paths, split)
    if config.sampling == "hard_examples" and not test_set_mode:
        # Each row's puzzle rides in the ACT carry with it, to be counted when it halts.
        sampler, fields = _hard_example_sampler(config), [*fields, "puzzle_index"]
    dataset = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=config.seed,
            dataset_paths=paths,
            global_batch_size=config.global_batch_size,
            test_set_mode=test_set_mode,
            epochs_per_iter=1 if test_set_mode else config.epochs_per_iteration,
            rank=dist_info.rank,
            num_replicas=dist_info.world_size,
            fields=fields,
            sampler=sampler,
            sampler_options=options,
        ),
        split=split,
    )
    if not test_set_mode:
        check_train_batches(config, dataset)
    workers = config.data_workers
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=8 if workers else None,
        pin_memory=dist_info.device.type == "cuda",
        persistent_workers=workers > 0,
    )
    return loader, dataset


def check_train_batches(config: PretrainConfig, data: PuzzleDataset) -> None:
    """A global batch larger than what one iteration draws would train no step at all (each
    iteration drops its short last batch) and then evaluate an untrained model: refuse it."""
    if data.num_batches(0) > 0 and data.total_steps(config.epochs) > 0:
        return
    meta = data.metadata
    per_epoch = meta.total_groups * meta.mean_puzzle_examples
    if isinstance(data.sampler, FewShotSampler):
        per_epoch = data.sampler.queries_per_epoch()
    elif isinstance(data.sampler, UniformSampler):
        per_epoch = data.sampler.examples_per_epoch()
    epochs = config.epochs_per_iteration
    which = "eval_interval" if config.eval_interval else "epochs"
    raise DataError(
        f"global_batch_size {config.global_batch_size} is larger than what the training data "
        f"{', '.join(data.config.dataset_paths)} yields: about {per_epoch:.0f} examples per "
        f"epoch, {per_epoch * epochs:.0f} per iteration of {epochs} epochs ({which}), so no "
        "step would run; lower global_batch_size"
    )


def check_eval_data(
    config: PretrainConfig, train: PuzzleDatasetMetadata, test: PuzzleDatasetMetadata
) -> None:
    """Evaluation data the model cannot read fails at start-up, not hours later."""
    paths = config.data_paths_test or config.data_paths
    for field in ("seq_len", "vocab_size"):
        if getattr(test, field) != getattr(train, field):
            raise DataError(
                f"data_paths_test {paths}: {field} {getattr(test, field)} differs from the "
                f"training data's {getattr(train, field)}; build both with the same builder"
            )
    if test.num_puzzle_identifiers > train.num_puzzle_identifiers:
        raise DataError(
            f"data_paths_test {paths}: {test.num_puzzle_identifiers} puzzle identifiers, more "
            f"than the training data's {train.num_puzzle_identifiers} embedding rows"
        )
