"""Weights that come from another run: a pretrained TRM decoder (``load_pretrained_decoder``)
and the provenance record that every checkpoint carries, which guards strict-split evaluation.

ETRM (bdsaglam/etrm, ``pretrain_etrm.py``, ``load_pretrained_decoder``) starts its decoder from a
TRM checkpoint: the puzzle embedding is dropped, every other weight goes into the new model's
``model.inner``, and the encoder keeps its initialisation. Here, unlike there:

* the checkpoint's EMA weights are used when it has them (ETRM loaded the raw weights);
* the architecture keys the weights cannot tell apart (``DECODER_ARCH_KEYS``: the cycles, the
  heads, the positions) must be the run's, or the load is refused (ETRM ran an ``L_cycles=4``
  decoder at 6 without a word);
* every missing, unexpected or mis-shaped decoder key is an error (ETRM loaded with
  ``strict=False`` and printed the missing keys). A model whose ``model.inner`` holds weights
  that are no part of TRM's decoder (a learned context scale) names them, relative to
  ``model.inner``, in its class attribute ``keys_outside_decoder``; they keep their values.

Provenance. ``meta.json`` of every checkpoint holds ``provenance``::

    {"data": {path: {"split_policy", "split_policy_from", "tasks"}},  # its training data
     "decoder": {"path", "weights", "arch", "provenance"},            # load_pretrained_decoder
     "initial_weights": {"path", "provenance"}}                        # load_checkpoint

with the loaded checkpoint's own record nested under ``provenance``; None there stands for an
upstream file or a checkpoint written before records existed, counted as trained on a TRM split
(every evaluation task's demonstrations in train) of unknown tasks. Weights whose record names a
task of a strict-split evaluation set have seen that task's demonstration pairs:
``check_contamination`` refuses the evaluation unless ``allow_contaminated_decoder=True``, and
then every result carries ``Contamination.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dataset.fingerprint import data_provenance, split_policy, split_tasks
from models.arch_config import ArchConfig
from training.config import PretrainConfig
from utils import checkpoint as ckpt
from utils.schema import UserError

DECODER_PREFIX = "model.inner."
PUZZLE_EMB_MARK = "puzzle_emb"
UPSTREAM_CONFIG_FILE = "all_config.yaml"  # upstream's pretrain.py writes it beside step_N
# What the decoder computes with and its weights do not (all) show: checked against the run's
# arch. H_layers is absent because TRM has no high-level network; where a model has one, its
# keys differ.
DECODER_ARCH_KEYS = (
    "H_cycles", "L_cycles", "L_layers", "hidden_size", "num_heads", "expansion",
    "pos_encodings", "puzzle_emb_len", "mlp_t", "rope_theta", "rms_norm_eps",
)  # fmt: skip
_EXAMPLES = 3  # task names quoted in a message


class ContaminatedDecoderError(UserError, ValueError):
    """The weights were trained on demonstration pairs of the strict-split tasks they are about
    to be evaluated on."""


# ----------------------------------------------------------------------------------------------
# Reading and loading a decoder
# ----------------------------------------------------------------------------------------------
@dataclass
class DecoderCheckpoint:
    """A TRM checkpoint read for its decoder.

    ``weights``: its state dict (prefixes stripped), the EMA shadow substituted when it has one;
    ``weights_used``: ``ema``, ``raw`` or ``as_saved`` (an upstream file that does not say);
    ``arch``: the architecture it was trained with, None when nothing records it.
    """

    path: str
    weights: dict[str, torch.Tensor]
    weights_used: str
    description: str
    arch: dict[str, Any] | None
    provenance: dict[str, Any] | None


def _upstream_config(file: Path, source: str) -> dict[str, Any] | None:
    saved = file.parent / UPSTREAM_CONFIG_FILE
    if not saved.is_file():
        return None
    try:
        config = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ckpt.CheckpointMismatchError(f"{source}: {saved} is unreadable ({first})") from None
    if not isinstance(config, dict):
        raise ckpt.CheckpointMismatchError(f"{source}: {saved} does not hold a config mapping")
    return config


def read_decoder_checkpoint(path: str, source: str) -> DecoderCheckpoint:
    """Our ``step_N`` folder (verified; EMA weights when it has ``ema.pt``) or an upstream
    state-dict file (its ``all_config.yaml`` beside it, when present, gives the architecture)."""
    location = Path(path)
    if location.is_dir():
        shared, _ = ckpt.load_checkpoint_files(location, rank=0)
        meta = shared["meta"]
        weights, used_ema = ckpt.weights_with_ema(shared, use_ema=True)
        config = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
        arch = config.get("arch")
        record = meta.get("provenance")
        return DecoderCheckpoint(
            path=path,
            weights=ckpt.strip_prefixes(weights),
            weights_used="ema" if used_ema else "raw",
            description="its EMA weights (ema.pt)"
            if used_ema
            else "its weights (no ema.pt: trained with ema=False)",
            arch=dict(arch) if isinstance(arch, Mapping) else None,
            provenance=dict(record) if isinstance(record, Mapping) else None,
        )
    if location.is_file():
        weights = ckpt.read_state_dict(location)
        config = _upstream_config(location, source)
        arch = config.get("arch") if config is not None else None
        ema = config.get("ema") if config is not None else None
        name = UPSTREAM_CONFIG_FILE
        if ema is True:
            used, text = "ema", f"its weights, the EMA copy upstream saves ({name}: ema=True)"
        elif ema is False:
            used, text = "raw", f"its weights (trained without EMA, {name}: ema=False)"
        else:
            used, text = "as_saved", f"its weights (no {name} says whether EMA)"
        return DecoderCheckpoint(
            path=path,
            weights=weights,
            weights_used=used,
            description=text,
            arch=dict(arch) if isinstance(arch, Mapping) else None,
            provenance=None,
        )
    raise FileNotFoundError(
        f"{source}: not found (a step_N folder of ours or an upstream step_N state-dict file)"
    )


def decoder_arch_problems(
    saved: Mapping[str, Any] | None, arch: ArchConfig
) -> tuple[list[str], list[str]]:
    """(each ``DECODER_ARCH_KEYS`` key whose value differs, as ``"arch.K=<decoder's> in the
    decoder, <run's> in this run"``; the keys of the run's arch that ``saved`` does not record)."""
    run = arch.model_dump(mode="json")
    keys = [k for k in DECODER_ARCH_KEYS if k in run]
    if saved is None:
        return [], keys
    differ, unverified = [], []
    for key in keys:
        if key not in saved:
            unverified.append(key)
        elif saved[key] != run[key]:
            differ.append(f"arch.{key}={saved[key]!r} in the decoder, {run[key]!r} in this run")
    return differ, unverified


def _is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PREFIX) and PUZZLE_EMB_MARK not in key


def _own_keys(head: nn.Module) -> set[str]:
    """The model's ``model.inner`` keys that a TRM decoder does not hold (its declaration)."""
    try:
        inner = head.get_submodule(DECODER_PREFIX.rstrip("."))
    except AttributeError:
        return set()
    return {DECODER_PREFIX + k for k in getattr(inner, "keys_outside_decoder", ())}


def decoder_state(
    weights: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    own: set[str] | frozenset[str] = frozenset(),
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(the checkpoint's ``model.inner.*`` tensors for the model, its dropped puzzle-embedding
    keys, its ignored keys outside ``model.inner``).

    ``expected`` is the model's state dict; its own puzzle embedding (if any) and the keys in
    ``own`` are not decoder keys. A decoder key missing on either side or of another shape
    raises ``CheckpointMismatchError`` naming it.
    """
    dropped = sorted(k for k in weights if PUZZLE_EMB_MARK in k)
    ignored = sorted(k for k in weights if not k.startswith(DECODER_PREFIX) and k not in dropped)
    found = {k: v for k, v in weights.items() if _is_decoder_key(k)}
    wanted = [k for k in expected if _is_decoder_key(k) and k not in own]
    if not wanted:
        raise ckpt.CheckpointMismatchError(
            f"{source}: the model has no decoder weights ({DECODER_PREFIX}*) to load into"
        )
    missing = [k for k in wanted if k not in found]
    unexpected = sorted(set(found) - set(wanted))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model's {missing[0]} is not in the checkpoint ({len(missing)} such)")
        if unexpected:
            parts.append(f"the checkpoint's {unexpected[0]} is not in the model "
                         f"({len(unexpected)} such)")  # fmt: skip
        raise ckpt.CheckpointMismatchError(
            f"{source}: decoder keys differ: {'; '.join(parts)}; it must be a TRM checkpoint of "
            "the same architecture"
        )
    for key in wanted:
        have, want = tuple(found[key].shape), tuple(expected[key].shape)
        if have != want:
            raise ckpt.CheckpointMismatchError(
                f"{source}: {key} has shape {have} in the checkpoint, the model expects {want}; "
                "check the architecture options (hidden_size, expansion, ...) and the data's "
                "vocabulary against the decoder's"
            )
    return found, dropped, ignored


def load_pretrained_decoder(
    head: nn.Module, path: str, arch: ArchConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Load a TRM checkpoint's decoder into ``head``'s ``model.inner`` (see the module
    docstring); the rest of ``head`` keeps its values. Returns the ``decoder`` entry of the
    run's provenance record. Refuses, with one line, an architecture or key mismatch."""
    source = f"load_pretrained_decoder={path}"
    found = read_decoder_checkpoint(path, source)
    differ, unverified = decoder_arch_problems(found.arch, arch)
    if differ:
        raise ckpt.CheckpointMismatchError(
            f"{source}: {'; '.join(differ)}; set them to the decoder's values (its weights were "
            "trained with them)"
        )
    expected = head.state_dict()
    state, dropped, ignored = decoder_state(found.weights, expected, source, _own_keys(head))
    head.load_state_dict({**expected, **state}, strict=True)
    kept = [k for k in expected if k not in state]
    extra = f"; ignored {len(ignored)} keys outside {DECODER_PREFIX}*" if ignored else ""
    log(
        f"{source}: {len(state)} decoder tensors loaded from {found.description}; "
        f"{len(dropped)} puzzle-embedding keys dropped{extra}; the other {len(kept)} tensors "
        "(the encoder) keep their initialisation"
    )
    if unverified:
        where = "its config lacks them" if found.arch else "the checkpoint carries no config"
        log(
            f"warning: {source}: {', '.join(f'arch.{k}' for k in unverified)} could not be "
            f"verified ({where}; an upstream file gets them from {UPSTREAM_CONFIG_FILE} beside it)"
        )
    return {
        "path": path,
        "weights": found.weights_used,
        "arch": {k: found.arch[k] for k in DECODER_ARCH_KEYS if found.arch and k in found.arch},
        "provenance": found.provenance,
    }


# ----------------------------------------------------------------------------------------------
# Provenance records
# ----------------------------------------------------------------------------------------------
def checkpoint_provenance(path: str) -> dict[str, Any] | None:
    """The record our ``step_N`` folder holds; None for an upstream file or a folder written
    before checkpoints recorded provenance."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    record = ckpt.read_meta(folder).get("provenance")
    return dict(record) if isinstance(record, Mapping) else None


def run_provenance(
    config: PretrainConfig,
    decoder: dict[str, Any] | None = None,
    initial_weights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record a run's checkpoints carry: its training data (``dataset.fingerprint.
    data_provenance`` of each of ``data_paths``), plus the decoder's and the initial weights'
    entries when it started from them."""
    data = {p: data_provenance(p) for p in dict.fromkeys(config.data_paths)}
    record: dict[str, Any] = {"data": data}
    if decoder is not None:
        record["decoder"] = decoder
    if initial_weights is not None:
        record["initial_weights"] = initial_weights
    return record


def evaluation_paths(config: PretrainConfig) -> list[str]:
    """The dataset paths a run evaluates on (their test split)."""
    return list(config.data_paths_test or config.data_paths)


def _sources(record: Mapping[str, Any], owner: str, out: list[tuple[str, set[str] | None]]) -> None:
    """Append (where, its tasks or None when unknown) for every source of ``record``."""
    data = record.get("data")
    for path, entry in (data if isinstance(data, Mapping) else {}).items():
        tasks = entry.get("tasks") if isinstance(entry, Mapping) else None
        known = set(tasks) if isinstance(tasks, list) else None
        out.append((f"the training data {path} of {owner}", known))
    for key, what in (("decoder", "the decoder"), ("initial_weights", "the initial weights")):
        entry = record.get(key)
        if not isinstance(entry, Mapping):
            continue
        where = f"{what} {entry.get('path')} of {owner}"
        nested = entry.get("provenance")
        if isinstance(nested, Mapping):
            _sources(nested, where, out)
        else:
            out.append((where, None))


@dataclass(frozen=True)
class Contamination:
    """What a strict-split evaluation set shares with the training of the weights evaluated.

    ``eval_tasks``: the set's test-split tasks; ``overlap``: those whose demonstrations some
    source of the weights was trained on (``blamed`` names the sources); ``unknown``: sources
    without a record (counted as TRM-split training on unknown tasks); ``allowed``: evaluated
    anyway with ``allow_contaminated_decoder=True``.
    """

    eval_paths: tuple[str, ...]
    eval_tasks: int
    overlap: tuple[str, ...]
    blamed: tuple[str, ...]
    unknown: tuple[str, ...]
    allowed: bool

    @property
    def contaminated(self) -> bool:
        return bool(self.overlap or self.unknown)

    def metrics(self) -> dict[str, float]:
        """The flag every evaluation result of a strict-split set carries (0 when clean)."""
        return {
            "provenance/contaminated_decoder": float(self.contaminated),
            "provenance/overlapping_tasks": float(len(self.overlap)),
            "provenance/unknown_sources": float(len(self.unknown)),
        }

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account for the files an evaluation writes."""
        return {
            "contaminated_decoder": self.contaminated,
            "allowed": self.allowed,
            "evaluation_data": list(self.eval_paths),
            "evaluation_tasks": self.eval_tasks,
            "overlapping_tasks": list(self.overlap),
            "sources": list(self.blamed),
            "unknown_sources": list(self.unknown),
        }

    def describe(self) -> str:
        """One line: what was seen, through which source."""
        parts = []
        if self.overlap:
            names = ", ".join(self.overlap[:_EXAMPLES])
            names += ", ..." if len(self.overlap) > _EXAMPLES else ""
            more = f" (and {len(self.blamed) - 1} more sources)" if len(self.blamed) > 1 else ""
            parts.append(
                f"{self.blamed[0]}{more} holds the demonstrations of {len(self.overlap)} of its "
                f"{self.eval_tasks} tasks ({names})"
            )
        if self.unknown:
            more = f" (and {len(self.unknown) - 1} more)" if len(self.unknown) > 1 else ""
            parts.append(
                f"{self.unknown[0]}{more} carries no provenance record (an upstream file, or a "
                "checkpoint written before checkpoints recorded one), so it counts as trained on "
                "a TRM split, which puts every evaluation task's demonstrations in train, of "
                "unknown tasks"
            )
        return (
            f"evaluation data {', '.join(self.eval_paths)} is a strict split, but "
            f"{'; and '.join(parts)}: its scores there are not scores on unseen tasks"
        )


def check_contamination(
    record: Mapping[str, Any] | None,
    eval_paths: Sequence[str],
    *,
    allow: bool,
    subject: str,
    log: Callable[[str], None] | None = print,
) -> Contamination | None:
    """The guard: None when no evaluation path is a strict split with a test split (nothing
    claims unseen tasks); else the ``Contamination`` of the weights described by ``record``
    (None: no record, as ``subject``, e.g. ``checkpoint PATH``, names them).

    Contaminated weights raise ``ContaminatedDecoderError`` (one line, how many tasks and a few
    of them) unless ``allow``; allowed, a warning goes to ``log`` (None: rank > 0, silent).
    """
    strict = [p for p in dict.fromkeys(eval_paths) if split_policy(p)[0] == "strict"]
    eval_tasks: set[str] = set()
    for path in strict:
        eval_tasks.update(split_tasks(path, "test") or [])
    if not eval_tasks:
        return None
    sources: list[tuple[str, set[str] | None]] = []
    if record is None:
        sources.append((subject, None))
    else:
        _sources(record, subject, sources)
    overlap: set[str] = set()
    blamed, unknown = [], []
    for where, tasks in sources:
        if tasks is None:
            unknown.append(where)
        elif tasks & eval_tasks:
            overlap |= tasks & eval_tasks
            blamed.append(where)
    found = Contamination(
        eval_paths=tuple(strict),
        eval_tasks=len(eval_tasks),
        overlap=tuple(sorted(overlap)),
        blamed=tuple(blamed),
        unknown=tuple(unknown),
        allowed=allow,
    )
    if not found.contaminated:
        return found
    if not allow:
        raise ContaminatedDecoderError(
            f"{found.describe()}; evaluate on data it was not trained on, or pass "
            "allow_contaminated_decoder=True to evaluate anyway (flagged in every result)"
        )
    if log is not None:
        log(
            f"warning: {found.describe()}; evaluated anyway (allow_contaminated_decoder=True), "
            "every result carries provenance/contaminated_decoder=1"
        )
    return found
