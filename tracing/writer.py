"""Writing a trace folder (``trm-trace/v1``): JSONL shards, ``index.json``, ``per_step.json``.

Records are ordered by task (source order), test index, augmentation and variant (clean
first, then the perturbations in the order given), so a folder does not depend on how the
rows were spread over batches or ranks; a record's ``id`` is its position in that order.

A shard line is the record as built (``tracing.records``) with ``schema`` and ``id`` first.
Traces with test-time search carry one key beyond ``trm-trace/v1``'s list, ``search`` (the
searched row's trajectory and attempts, ``tracing.records.search_entry``; null on perturbed
variants); the schema name stays, since a reader that ignores the key reads the rest
unchanged, and without search the key is absent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracing.config import Perturbation
from tracing.records import CLEAN
from utils.atomic import write_text_atomically

INDEX_SCHEMA = "trm-trace-index/v1"
INDEX_FILE = "index.json"
PER_STEP_FILE = "per_step.json"
SUMMARY_KEYS = ("first_halt_step", "first_correct_step", "final_exact", "solved_then_lost")


def order_records(
    records: Sequence[dict[str, Any]], task_order: Sequence[str], variants: Sequence[str]
) -> list[dict[str, Any]]:
    """Records sorted as the folder stores them; a duplicate (same task, test index,
    augmentation and variant) keeps its first copy."""
    task_rank = {t: i for i, t in enumerate(task_order)}
    variant_rank = {v: i for i, v in enumerate(variants)}
    unique: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        key = (
            task_rank.get(r["puzzle_id"], len(task_rank)),
            r["puzzle_id"],
            r["test_index"],
            r["aug"] != "identity",
            r["aug"],
            variant_rank[r["variant"]],
        )
        unique.setdefault(key, r)
    return [unique[k] for k in sorted(unique)]


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.jsonl"


def write_trace(
    out: Path,
    records: Sequence[dict[str, Any]],
    run: dict[str, Any],
    dims: dict[str, int],
    perturbations: Sequence[Perturbation],
    per_step: dict[str, Any],
    shard_size: int,
) -> dict[str, Any]:
    """Write the ordered ``records`` (without ids) to ``out`` and return the index.

    ``run``: checkpoint, config_hash, arch, conditioner, created; ``dims``: halt_max_steps,
    H_cycles, L_cycles. Shards left in ``out`` by an earlier trace are removed first.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard_*.jsonl"):
        stale.unlink()
    clean_exact = {
        (r["puzzle_id"], r["test_index"], r["aug"]): r["final_exact"]
        for r in records
        if r["variant"] == CLEAN
    }
    entries: list[dict[str, Any]] = []
    shards: list[str] = []
    lines: list[str] = []
    for i, record in enumerate(records):
        shard = shard_name(i // shard_size)
        if not shards or shards[-1] != shard:
            if lines:
                (out / shards[-1]).write_text("\n".join(lines) + "\n")
            shards.append(shard)
            lines = []
        lines.append(json.dumps({"schema": record["schema"], "id": i, **record}))
        recovered = None
        if record["variant"] != CLEAN and record["final_exact"] is not None:
            before = clean_exact.get((record["puzzle_id"], record["test_index"], record["aug"]))
            recovered = None if before is None else bool(record["final_exact"] and not before)
        entries.append(
            {
                "id": i,
                "shard": shard,
                "line": i % shard_size,
                "puzzle_id": record["puzzle_id"],
                "test_index": record["test_index"],
                "aug": record["aug"],
                "variant": record["variant"],
                **{k: record[k] for k in SUMMARY_KEYS},
                "recovered": recovered,
            }
        )
    if lines:
        (out / shards[-1]).write_text("\n".join(lines) + "\n")
    index = {
        "schema": INDEX_SCHEMA,
        "run": run,
        **dims,
        "shards": shards,
        "perturbations": [p.as_json() for p in perturbations],
        "records": entries,
        "per_step": per_step,
    }
    write_text_atomically(out / PER_STEP_FILE, json.dumps(per_step, indent=1))
    write_text_atomically(out / INDEX_FILE, json.dumps(index))
    return index
