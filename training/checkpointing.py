"""Resumable checkpoints of a run: ``checkpoint_path/step_N`` written from and into a
``TrainState``, plus the weights-only reads of ``load_checkpoint`` and evaluation.

``utils.checkpoint`` writes the files atomically and verifies them; this module decides what
goes in them and what must agree before one is used:

* a checkpoint is never written with non-finite weights (``NonFiniteWeightsError``);
* ``meta.json`` records the run's config and a fingerprint of every dataset path
  (``dataset.fingerprint``), so resuming, fine-tuning or evaluating on another build of the
  data is refused with one line (``DataMismatchError``) unless ``allow_data_mismatch=True``;
* beside the fingerprints, ``meta.json`` records the weights' provenance (the split policy and
  tasks of the training data, a pretrained decoder's and the initial weights' own records:
  ``training.pretrained_decoder``), which a resumed run takes over and checks against its
  evaluation data;
* resuming with changed settings that alter the model, its optimizers, the objective or the
  data order is refused (``ChangedSettingsError``); the keys in ``RESUME_SAFE_KEYS`` may change
  and are logged when they do.

Format 2 keys the optimizers by group name; format-1 checkpoints (optimizers as a list in build
order, counters at the top of ``train_state.pt``) are migrated when read.

One module past 400 lines on purpose: writing ``meta.json``, the checks of what it records and
the resume that reads it back belong together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dataset.fingerprint import dataset_fingerprint, differences
from dataset.puzzle_dataset import PuzzleDataset
from training.config import PretrainConfig
from training.pretrained_decoder import check_contamination, evaluation_paths
from training.state import TrainState
from utils import checkpoint as ckpt
from utils.distributed import DistInfo, broadcast_object, gather_objects, is_distributed
from utils.schema import UserError

_PROGRESS = ("step", "iteration", "batches_in_iteration")

# Config keys (top-level ``PretrainConfig`` fields) that may differ between a checkpoint and
# the run that resumes it: schedule length and learning rates, evaluation, logging, saving,
# the device and the process-level safety settings. Every other key, including any added
# later, must be equal, because it changes the model (``arch.*``), the optimizers' structure
# (``freeze_weights``, ``ema``), the objective or step strategy (``objective.*``,
# ``aggregator.*``, ``step_strategy``) or the data order (``seed``, ``global_batch_size``,
# ``eval_interval``, which sets the epochs shuffled together, ``sampler``). ``data_paths`` may
# name another folder: the dataset fingerprint, not the path, decides.
RESUME_SAFE_KEYS: tuple[str, ...] = (
    # the schedule and the optimizers' hyper-parameters (the run's values win on load)
    "epochs", "max_steps", "lr", "lr_min_ratio", "lr_warmup_steps", "beta1", "beta2",
    "weight_decay", "puzzle_emb_weight_decay", "puzzle_emb_lr", "ema_rate", "grad_clip_norm",
    # evaluation
    "data_paths", "data_paths_test", "evaluators", "eval_save_outputs", "min_eval_interval",
    # names, logging and checkpointing
    "project_name", "run_name", "checkpoint_path", "load_checkpoint", "resume", "keep_last",
    "checkpoint_every_eval", "checkpoint_every_steps", "logger", "log_predictions_every",
    "log_predictions_max_samples", "log_predictions_crop",
    # where and how it runs
    "device", "compile", "deterministic", "detect_anomaly", "data_workers", "nonfinite",
    "nonfinite_max_skips", "dist_timeout_s", "dist_timeout_slow_s", "allow_data_mismatch",
    # what is evaluated and whether a contaminated decoder may be
    "max_eval_groups", "allow_contaminated_decoder",
    # the JD fork's step knobs (a checkpoint's step wins over start_step)
    "start_step", "lr_first_step", "cap_total_steps", "run_evaluator_only_at_end",
    "log_param_grad_norms_every",
)  # fmt: skip
_NOT_LOGGED = ("resume",)
# TrainState components kept in train_state.pt beside the progress when the run has them
# (loss_scaling on, sampling=hard_examples), absent otherwise so that older checkpoints load.
OPTIONAL_TRAIN_COMPONENTS = ("loss_scaler", "hard_examples")  # differs on every resume by design


class NonFiniteWeightsError(UserError, RuntimeError):
    """The weights (or the EMA shadow) hold NaN or infinity; no checkpoint is written."""


class DataMismatchError(UserError, ValueError):
    """The data is another build than the one the checkpoint was trained on."""


class ChangedSettingsError(ckpt.CheckpointMismatchError):
    """Resuming with settings that change the model, its optimizers or the data order."""


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def _non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity (one host read)."""
    floats = [(k, t) for k, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu().tolist()
    return [k for (k, _), ok in zip(floats, finite, strict=True) if not ok]


def check_finite_weights(state: TrainState, folder: Path) -> None:
    """``NonFiniteWeightsError`` naming the step, the tensors and the last good checkpoint if
    the weights or the EMA shadow are not finite. Every rank holds the same weights, so every
    rank decides the same without a collective."""
    for what, tensors in (
        ("model weights", state.raw_model.state_dict()),
        ("EMA shadow", state.ema.state_dict() if state.ema is not None else {}),
    ):
        bad = _non_finite(tensors)
        if bad:
            good = ckpt.latest_good_checkpoint(folder.parent)
            raise NonFiniteWeightsError(
                f"step {state.step}: {len(bad)} tensors of the {what} are not finite (e.g. "
                f"{bad[0]}), so {folder.name} is not written; last good checkpoint: "
                f"{good or 'none'}"
            )


def data_fingerprints(config: PretrainConfig) -> dict[str, Any]:
    """The fingerprint of every dataset path of the run (training and evaluation), by path."""
    paths = dict.fromkeys([*config.data_paths, *config.data_paths_test])
    return {path: dataset_fingerprint(path) for path in paths}


def _agree(dist_info: DistInfo) -> Callable[[str | None], str | None]:
    """A barrier that returns the first problem any rank reported (``save_checkpoint``)."""

    def agree(problem: str | None) -> str | None:
        if not is_distributed():
            return problem
        problems = gather_objects(problem, group=dist_info.cpu_group)
        first = next((p for p in problems or [] if p is not None), None)
        return broadcast_object(first)

    return agree


def save_train_state(
    config: PretrainConfig, state: TrainState, dist_info: DistInfo, data: PuzzleDataset
) -> Path:
    """Write ``checkpoint_path/step_N`` with everything needed to resume bit-exactly.

    Refuses non-finite weights (``NonFiniteWeightsError``); a failed write raises
    ``utils.checkpoint.CheckpointWriteError`` and leaves the earlier checkpoints as they were.
    """
    assert config.checkpoint_path is not None
    folder = ckpt.step_dir(config.checkpoint_path, state.step)
    check_finite_weights(state, folder)
    shared = None
    meta: dict[str, Any] = {"step": state.step, "config": config.model_dump(mode="json")}
    if dist_info.is_main:
        components = state.state_dict()
        shared = {
            ckpt.MODEL_FILE: components["model"],
            ckpt.TRAIN_FILE: {
                "optimizers": components["optimizers"],
                "progress": components["progress"],
                "strategy": components["strategy"],
                "data": data.state_at(state.iteration, state.batches_in_iteration),
            },
        }
        for key in OPTIONAL_TRAIN_COMPONENTS:
            if key in components:
                shared[ckpt.TRAIN_FILE][key] = components[key]
        if "ema" in components:
            shared[ckpt.EMA_FILE] = components["ema"]
        meta["data"] = data_fingerprints(config)
        if state.provenance:
            meta["provenance"] = state.provenance
    ckpt.save_checkpoint(
        folder,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        shared=shared,
        per_rank=state.rank_state_dict(dist_info.device),
        meta=meta,
        agree=_agree(dist_info),
        keep_last=config.keep_last,
    )
    return folder


# ----------------------------------------------------------------------------------------------
# What must agree before a checkpoint is used
# ----------------------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``arch.H_cycles``); lists stay whole values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted) changes between a checkpoint's config and the run's, each as
    ``"key old → new"``; keys only one side has (another code version) are not compared."""
    old, new = _flatten(dict(saved)), _flatten(json.loads(json.dumps(dict(now))))
    refused, accepted = [], []
    for key in old.keys() & new.keys():
        if old[key] == new[key]:
            continue
        change = f"{key} {_show(old[key])} → {_show(new[key])}"
        if key.split(".")[0] in RESUME_SAFE_KEYS:
            if key not in _NOT_LOGGED:
                accepted.append(change)
        else:
            refused.append(change)
    return sorted(refused), sorted(accepted)


def check_resume_settings(
    meta: Mapping[str, Any], config: PretrainConfig, folder: Path, dist_info: DistInfo
) -> None:
    """``ChangedSettingsError`` naming every refused change; logs the accepted ones."""
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        return
    refused, accepted = config_changes(saved, config.model_dump(mode="json"))
    if refused:
        raise ChangedSettingsError(
            f"{folder}: resuming with settings that change the model, its optimizers, the "
            f"objective or the data order: {', '.join(refused)}; change them back, or start a "
            f"new run from its weights with +load_checkpoint={folder} and another "
            "+checkpoint_path"
        )
    if accepted and dist_info.is_main:
        print(f"resume: {', '.join(accepted)}")


def _data_problem(
    saved: Mapping[str, Any],
    saved_paths: list[str],
    paths: list[str],
    splits: tuple[str, ...],
    checkpoint: Path,
) -> str | None:
    """What differs between the data at ``paths`` and the fingerprints the checkpoint
    recorded for ``saved_paths`` (position by position); None if nothing does."""
    name = checkpoint.name
    if len(saved_paths) != len(paths):
        return (
            f"data_paths {paths}: {len(paths)} dataset folders, the checkpoint {name} was "
            f"trained on {len(saved_paths)} ({saved_paths})"
        )
    for old, new in zip(saved_paths, paths, strict=True):
        before = saved.get(old)
        if not isinstance(before, Mapping):
            continue
        found = differences(dict(before), dataset_fingerprint(new), splits)
        if found:
            whats = " and ".join(w for w, _ in found)
            verb = "differ" if len(found) > 1 or whats.endswith("s") else "differs"
            details = "; ".join(d for _, d in found)
            return (
                f"{new}: {whats} {verb} from the build the checkpoint {name} was trained on "
                f"({details})"
            )
    return None


def _refuse_or_warn(problem: str | None, allow: bool, is_main: bool) -> None:
    if problem is None:
        return
    if not allow:
        raise DataMismatchError(f"{problem}; pass allow_data_mismatch=True to use it anyway")
    if is_main:
        print(f"warning: {problem}; used anyway (allow_data_mismatch=True)")


def _saved_paths(meta: Mapping[str, Any], key: str) -> list[str]:
    config = meta.get("config")
    value = config.get(key) if isinstance(config, Mapping) else None
    return list(value) if isinstance(value, list) else []


def check_training_data(
    meta: Mapping[str, Any], config: PretrainConfig, folder: Path, is_main: bool
) -> None:
    """Resuming: the training data must be the build the checkpoint was trained on (puzzle
    identifiers, the train split's metadata and sampled content)."""
    saved = meta.get("data")
    if not isinstance(saved, Mapping):
        return  # written before fingerprints existed
    problem = _data_problem(
        saved, _saved_paths(meta, "data_paths"), config.data_paths, ("train",), folder
    )
    _refuse_or_warn(problem, config.allow_data_mismatch, is_main)


def check_evaluation_data(
    meta: Mapping[str, Any],
    paths: list[str],
    folder: Path,
    allow: bool,
    is_main: bool,
    puzzle_table: bool = True,
) -> None:
    """Evaluating: the data's puzzle identifiers must be those of the build the checkpoint
    was trained (or evaluated) on, since they index its puzzle-embedding table.

    Only the identifiers are compared: another test split (other puzzles, another size) under
    the same identifier mapping is a legitimate evaluation, and the vocabulary and sequence
    length are checked by the weights' shapes. Without a ``puzzle_table`` (a model conditioned
    on demonstrations) the identifiers index nothing and any build may be evaluated.
    """
    saved = meta.get("data")
    if not isinstance(saved, Mapping) or not puzzle_table:
        return
    train_paths = _saved_paths(meta, "data_paths")
    candidates = [_saved_paths(meta, "data_paths_test") or train_paths, train_paths]
    problems = [_data_problem(saved, c, paths, (), folder) for c in candidates]
    _refuse_or_warn(None if None in problems else problems[0], allow, is_main)


def _num_identifiers(fingerprints: list[dict[str, Any]]) -> int | None:
    total = 0
    for fp in fingerprints:
        split = fp.get("splits", {}).get("train") or fp.get("splits", {}).get("test") or {}
        count = (split.get("metadata") or {}).get("num_puzzle_identifiers")
        if not isinstance(count, int):
            return None
        total += count
    return total


def check_fine_tuning_data(
    meta: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    config: PretrainConfig,
    source: str,
) -> None:
    """``load_checkpoint`` of our folder: fine-tuning on other data is what it is for, and a
    puzzle table of another size starts from its mean embedding (upstream's rule). Only a table
    of the same size loaded onto another identifier mapping is refused: its rows would be
    other puzzles' embeddings."""
    saved = meta.get("data")
    table = weights.get(ckpt.PUZZLE_EMB_KEY)
    if not isinstance(saved, Mapping) or table is None:
        return
    rows = _num_identifiers([dataset_fingerprint(p) for p in config.data_paths])
    if rows is not None and rows != table.shape[0]:
        print(
            f"load_checkpoint={source}: trained on {table.shape[0]} puzzle identifiers, this data "
            f"has {rows}; the puzzle-embedding table starts from its mean embedding"
        )
        return
    problem = _data_problem(
        saved, _saved_paths(meta, "data_paths"), config.data_paths, (), Path(source)
    )
    _refuse_or_warn(problem, config.allow_data_mismatch, True)


# ----------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------
def migrate_train_file(
    train: dict[str, Any], format_version: int, optimizer_names: list[str]
) -> dict[str, Any]:
    """``train_state.pt`` in format 2. Format 1 listed the optimizers in the order the run
    built them, which is the family's group order (``puzzle_emb`` first, then ``weights``)."""
    if format_version >= 2:
        return train
    optimizers = train["optimizers"]
    if len(optimizers) != len(optimizer_names):
        raise ckpt.CheckpointMismatchError(
            f"{len(optimizers)} optimizers saved, the run has {len(optimizer_names)} "
            f"({optimizer_names}); freeze_weights or arch.puzzle_emb_ndim differ"
        )
    return {
        "optimizers": dict(zip(optimizer_names, optimizers, strict=True)),
        "progress": {key: train[key] for key in _PROGRESS},
        "strategy": {},
        "data": train["data"],
    }


def resolve_resume(config: PretrainConfig) -> Path | None:
    """The checkpoint ``resume`` points at, verified first.

    ``resume=auto`` takes the newest ``step_N`` that verifies and says which newer ones it
    stepped over; a corrupt ``resume=PATH`` is an error. Refuses to branch off an older
    checkpoint in place.
    """
    if config.resume == "auto":
        root = config.checkpoint_path or ""
        good, corrupt = ckpt.scan_checkpoints(root)
        if corrupt and good is None:
            raise ckpt.CorruptCheckpointError(
                f"resume=auto: {'; '.join(corrupt)}; no checkpoint in {root} verifies: move "
                "them away to start afresh, or give resume=PATH of a copy"
            )
        if corrupt:
            print(f"resume=auto: {'; '.join(corrupt)}; resuming from {good.name}")
        return good
    folder = Path(str(config.resume))
    if not ckpt.is_complete(folder):
        raise FileNotFoundError(f"resume={folder}: not a complete checkpoint (no meta.json)")
    problem = ckpt.verify_checkpoint(folder)
    if problem is not None:
        raise ckpt.CorruptCheckpointError(
            f"resume={folder}: corrupt checkpoint ({problem}); give another step_N, or "
            "resume=auto for the newest one that verifies"
        )
    if config.checkpoint_path and folder.parent.resolve() == Path(config.checkpoint_path).resolve():
        newer = [
            p.name for p in ckpt.list_checkpoints(folder.parent) if _step_of(p) > _step_of(folder)
        ]
        if newer:
            raise ckpt.CheckpointMismatchError(
                f"resume={folder}: {folder.parent} also holds newer checkpoints {newer}, which "
                "keep_last and resume=auto would mix with this branch; move them away or give "
                "a new +checkpoint_path"
            )
    return folder


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def resume_train_state(
    folder: Path,
    state: TrainState,
    dist_info: DistInfo,
    data: PuzzleDataset,
    config: PretrainConfig,
) -> None:
    """Load a checkpoint written by ``save_train_state`` into ``state`` and the dataset, after
    checking the run's settings and data against it (every rank decides the same)."""
    shared, per_rank = ckpt.load_checkpoint_files(folder, dist_info.rank)
    meta = shared["meta"]
    if ckpt.TRAIN_FILE not in shared:
        raise ckpt.CorruptCheckpointError(
            f"{folder}: {ckpt.TRAIN_FILE} is missing, so it cannot resume; start a new run "
            f"from its weights with +load_checkpoint={folder}"
        )
    try:
        train = migrate_train_file(
            shared[ckpt.TRAIN_FILE], meta["format_version"], list(state.optimizers)
        )
    except ckpt.CheckpointMismatchError as e:
        raise ckpt.CheckpointMismatchError(f"{folder}: {e}") from None
    check_resume_settings(meta, config, folder, dist_info)
    check_training_data(meta, config, folder, dist_info.is_main)
    record = meta.get("provenance")
    if isinstance(record, Mapping):
        state.provenance = dict(record)
    state.contamination = check_contamination(
        state.provenance,
        evaluation_paths(config),
        allow=config.allow_contaminated_decoder,
        subject="this run",
        log=print if dist_info.is_main else None,
    )
    components = {
        "model": shared[ckpt.MODEL_FILE],
        "optimizers": train["optimizers"],
        "progress": train["progress"],
        "strategy": train["strategy"],
    }
    components.update({k: train[k] for k in OPTIONAL_TRAIN_COMPONENTS if k in train})
    if ckpt.EMA_FILE in shared:
        components["ema"] = shared[ckpt.EMA_FILE]
    state.load_state_dict(components, config, source=str(folder))
    data.load_state_dict(train["data"])
    if per_rank is not None and meta.get("world_size") == dist_info.world_size:
        state.load_rank_state_dict(per_rank, dist_info.device)
    elif dist_info.is_main:
        print(
            f"note: {folder} was written by {meta.get('world_size')} processes; "
            "the ACT carry and RNG states restart"
        )


# ----------------------------------------------------------------------------------------------
# Weights only: load_checkpoint and evaluation
# ----------------------------------------------------------------------------------------------
def weights_for_loading(
    path: Path, config: PretrainConfig | None = None
) -> dict[str, torch.Tensor]:
    """A state dict from our checkpoint folder (EMA weights if it has them) or an upstream file.

    With the run's ``config``, a folder's dataset fingerprint is checked as
    ``check_fine_tuning_data`` describes (upstream files have none).
    """
    if path.is_dir():
        shared, _ = ckpt.load_checkpoint_files(path, rank=0)
        weights = evaluation_weights(shared, use_ema=True)
        if config is not None:
            check_fine_tuning_data(shared["meta"], weights, config, str(path))
        return weights
    return ckpt.read_state_dict(path)


def evaluation_weights(shared: dict[str, Any], use_ema: bool) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint, with the EMA shadow (``ema.pt``: parameter name →
    tensor) substituted when asked and present."""
    return ckpt.weights_with_ema(shared, use_ema)[0]
