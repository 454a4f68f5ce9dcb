"""The run's loaders: upstream's ``PuzzleDataset`` yielding whole batches, with the batch
fields the model family reads, and the start-up checks of the data against the run."""

from __future__ import annotations

from torch.utils.data import DataLoader

from dataset.common import DataError, PuzzleDatasetMetadata
from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from models.family import family_of
from training.config import PretrainConfig
from utils.distributed import DistInfo


def create_dataloader(
    config: PretrainConfig, split: str, dist_info: DistInfo, *, test_set_mode: bool
) -> tuple[DataLoader, PuzzleDataset]:
    """Upstream's loader: ``PuzzleDataset`` yields whole batches (``batch_size=None``)."""
    use_test_paths = split == "test" and config.data_paths_test
    paths = config.data_paths_test if use_test_paths else config.data_paths
    dataset = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=config.seed,
            dataset_paths=paths,
            global_batch_size=config.global_batch_size,
            test_set_mode=test_set_mode,
            epochs_per_iter=1 if test_set_mode else config.epochs_per_iteration,
            rank=dist_info.rank,
            num_replicas=dist_info.world_size,
            fields=list(family_of(config.arch).batch_fields),
            sampler=None if test_set_mode else config.sampler,
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
