"""Hard-example sampling (``sampling=hard_examples``): the weights, the weighted plan, the
attribution of halted rows, a real run that moves its picks, resume and two gloo ranks."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataset.hard_examples import HardExampleSampler, puzzle_offsets
from dataset.puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from dataset.reader import PuzzleReader
from dataset.sampling import UniformSampler
from models.recursive_reasoning.act import ACTCarry
from tests.test_puzzle_dataset import write_split
from training import step as step_module
from training.config import PretrainConfig, load_pretrain_config
from training.data import create_dataloader
from training.hard_examples import HardExampleCounts, hard_example_weights, weight_statistics
from training.loop import run_training
from training.state import create_train_state, seed_everything
from utils import checkpoint as ckpt
from utils.config import compose
from utils.distributed import DistInfo
from utils.logging import build_logger
from utils.schema import ConfigError

# 16 groups of 2 variants with 2 examples each: variant 0 of each group is made "easy".
GROUPS = [[2, 2]] * 16
TINY = [
    "+experiment=tiny_cpu",
    "logger=none",
    "global_batch_size=8",
    "arch.hidden_size=16",
    "arch.num_heads=2",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "arch.puzzle_emb_ndim=16",
    "arch.halt_exploration_prob=0",
    "evaluators=[]",
    "epochs=4",
    "eval_interval=2",
    "+sampling=hard_examples",
    "+save_code=False",
]


def _data(root: Path, groups: list[list[int]] = GROUPS) -> Path:
    write_split(root, "train", groups)
    return root


def _sampler(root: Path, cls: type = HardExampleSampler, **kw: int) -> UniformSampler:
    reader = PuzzleReader([str(root)], "train")
    return cls(reader.sets, reader.metadata, seed=3, global_batch_size=8, epochs_per_iter=2, **kw)


# ----------------------------------------------------------------------------------------------
# Weights and the weighted plan
# ----------------------------------------------------------------------------------------------
def test_weights_are_one_minus_correct_over_seen_plus_one() -> None:
    seen = np.array([0, 1, 3, 4, 9])
    correct = np.array([0, 1, 2, 0, 9])
    expected = [1.0, 1 - 1 / 2, 1 - 2 / 4, 1.0, 1 - 9 / 10]
    assert hard_example_weights(seen, correct).tolist() == pytest.approx(expected, abs=0)


def test_weight_statistics_by_hand() -> None:
    # Groups [0, 2) and [2, 5); a one-variant group [5, 6) counts in neither mean over groups.
    starts, ends = np.array([0, 2, 5]), np.array([2, 5, 6])
    after = np.array([1.0, 1.0, 0.5, 0.0, 0.5, 0.2])
    seen = np.array([0, 0, 2, 1, 2, 3])
    stats = weight_statistics(None, after, seen, starts, ends)
    # Group 2: p = (0.5, 0, 0.5): H = log 2 over log 3; group 1 uniform: 1.
    assert stats["sampling/weight_entropy"] == pytest.approx((1 + np.log(2) / np.log(3)) / 2)
    assert stats["sampling/groups_changed"] == 0.5
    assert stats["sampling/seen_fraction"] == pytest.approx(4 / 6)
    assert stats["sampling/mean_weight"] == pytest.approx(after.mean())
    assert weight_statistics(after, after, seen, starts, ends)["sampling/groups_changed"] == 0.0


def test_without_weights_the_plan_is_uniforms(tmp_path: Path) -> None:
    root = _data(tmp_path, [[3, 1, 2], [2], [1, 4], [5], [2, 2, 2], [1]])
    uniform, hard = _sampler(root, UniformSampler), _sampler(root)
    for counter in (1, 2, 7):
        a, b = uniform.plan(0, counter), hard.plan(0, counter)
        assert a.num_batches == b.num_batches > 0
        for i in range(a.num_batches):
            assert np.array_equal(a.batch(i).rows, b.batch(i).rows)
            assert np.array_equal(a.batch(i).puzzles, b.batch(i).puzzles)


def test_weighted_picks_equal_a_loop_of_rng_choice(tmp_path: Path) -> None:
    groups = [[1] * n for n in (3, 1, 4, 2, 5, 3, 2)]
    root = _data(tmp_path, groups)
    sampler = _sampler(root)
    assert isinstance(sampler, HardExampleSampler)
    rng = np.random.default_rng(11)
    weights = rng.random(sampler.num_puzzles)
    weights[rng.random(weights.size) < 0.3] = 0.0
    weights[3:4] = 0.0  # group 1 (one variant) sums to 0
    weights[8:10] = 0.0  # group 3 sums to 0: uniform
    sampler.set_weights(weights)
    group_indices = np.concatenate([[0], np.cumsum([len(g) for g in groups])])
    for counter in (1, 5):
        # The research fork's loop: group order as uniform, then one rng.choice per visit.
        ref_rng = np.random.Generator(np.random.Philox(seed=3 + counter))
        order = np.concatenate([ref_rng.permutation(len(groups)) for _ in range(2)])
        expected = []
        for g in order:
            ids = np.arange(group_indices[g], group_indices[g + 1])
            w = weights[ids]
            p = w / w.sum() if w.sum() > 0 else np.ones_like(w) / len(w)
            expected.append(ref_rng.choice(ids, p=p))
        own_rng = np.random.Generator(np.random.Philox(seed=3 + counter))
        own_order = np.concatenate([own_rng.permutation(len(groups)) for _ in range(2)])
        assert np.array_equal(own_order, order)
        assert sampler.variant_picks(0, own_rng, own_order).tolist() == expected
        assert own_rng.random() == ref_rng.random()  # one draw per visit, as choice
        plan = sampler.plan(0, counter)
        assert plan.picks.tolist() == expected
    assert not np.array_equal(
        sampler.plan(0, 1).picks, _sampler(root, UniformSampler).plan(0, 1).picks
    )


def test_puzzle_index_field_numbers_puzzles_over_sets(tmp_path: Path) -> None:
    write_split(tmp_path / "a", "train", [[1, 2], [1]])
    write_split(tmp_path / "b", "train", [[2], [1, 1]], base=10)
    config = PuzzleDatasetConfig(
        seed=0,
        dataset_paths=[str(tmp_path / "a"), str(tmp_path / "b")],
        global_batch_size=4,
        test_set_mode=True,
        epochs_per_iter=1,
        fields=["inputs", "puzzle_index"],
    )
    data = PuzzleDataset(config, "train")
    assert puzzle_offsets(data.reader.sets).tolist() == [0, 3, 6]
    batches = [(name, b["puzzle_index"].tolist()) for name, b, _ in data]
    # Set "all" holds examples of puzzles 0, 1, 1, 2; set "all1" puzzles 3, 3, 4, 5 (+3).
    assert batches == [("all", [0, 1, 1, 2]), ("all1", [3, 3, 4, 5])]
    tail = PuzzleDataset(config.model_copy(update={"global_batch_size": 3}), "train")
    assert [b["puzzle_index"].tolist() for _, b, _ in tail][1] == [2, -1, -1]


# ----------------------------------------------------------------------------------------------
# Attribution of halted rows
# ----------------------------------------------------------------------------------------------
def _output(index: list[int], halted: list[bool], labels: list[bool], exact: list[bool]) -> object:
    carry = ACTCarry(
        inner_carry={},
        steps=torch.ones(len(index), dtype=torch.int32),
        halted=torch.tensor(halted),
        current_data={"puzzle_index": torch.tensor(index)},
    )
    rows = {"has_labels": torch.tensor(labels), "exact_accuracy": torch.tensor(exact)}
    return SimpleNamespace(new_carry=carry, row_metrics=rows)


def test_rows_count_for_the_puzzle_their_slot_holds(tmp_path: Path) -> None:
    sampler = _sampler(_data(tmp_path))
    counts = HardExampleCounts(sampler, torch.device("cpu"))  # type: ignore[arg-type]
    # Step 1 loads puzzles 4, 5, 6 and a padding row; slot 0 halts right, slot 3 (padding,
    # no labels) too.
    step_1 = _output(
        [4, 5, 6, -1],
        [True, False, False, True],
        [True, True, True, False],
        [True, False, True, True],
    )
    counts.observe_output(step_1)
    # Step 2's batch brought puzzles 7, 8, 9, 10; slot 0 and the padding slot reloaded (7 and
    # -1), slots 1 and 2 still hold 5 and 6 from step 1 and halt now, 6 right. A padding row
    # flagged as labelled is still not counted.
    step_2 = _output(
        [7, 5, 6, -1],
        [False, True, True, True],
        [True, True, True, True],
        [True, False, True, True],
    )
    counts.observe_output(step_2)
    seen, correct = counts.pending_seen.tolist(), counts.pending_correct.tolist()
    assert {i: s for i, s in enumerate(seen) if s} == {4: 1, 5: 1, 6: 1}
    assert {i: c for i, c in enumerate(correct) if c} == {4: 1, 6: 1}
    stats = counts.rebuild()
    assert counts.pending_seen.sum() == 0 and counts.total_seen.tolist() == seen
    weights = sampler.current_weights()
    assert weights is not None
    assert weights[4] == 0.5 and weights[5] == 1.0 and weights[6] == 0.5 and weights[0] == 1.0
    assert stats["sampling/seen_fraction"] == pytest.approx(3 / 32)  # of 16 x 2 puzzles
    assert stats["sampling/groups_changed"] == pytest.approx(2 / 16)  # groups 2 and 3


# ----------------------------------------------------------------------------------------------
# Real runs
# ----------------------------------------------------------------------------------------------
def _config(data: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_pretrain_config(
        compose(
            overrides=[*TINY, f"data_paths=[{data}]", f"+checkpoint_path={run_dir}", *overrides]
        )
    )


def _train(config: PretrainConfig, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Run ``config``; the ``puzzle_index`` of every batch the loop trained on."""
    seen: list[list[int]] = []
    original = step_module.train_batch

    def recording(config: PretrainConfig, state: object, batch: dict, *a: object, **k: object):
        seen.append(batch["puzzle_index"].tolist())
        return original(config, state, batch, *a, **k)

    monkeypatch.setattr("training.loop.train_batch", recording)
    logger = build_logger(
        "none", project="p", run_name="r", config={}, run_dir=config.checkpoint_path, is_main=True
    )
    run_training(config, DistInfo(), logger=logger)
    return seen


def _make_easy_and_hard(root: Path, config: PretrainConfig) -> np.ndarray:
    """Rewrite the labels so that, under the run's initial weights (which lr=0 keeps), every
    row of variant 0 of each group is predicted exactly and no row of variant 1 is; returns
    whether each puzzle is easy."""
    seed_everything(config, 0)
    _, data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    state = create_train_state(config, data, DistInfo())
    inputs = np.load(root / "train/all__inputs.npy")
    ids = np.load(root / "train/all__puzzle_identifiers.npy")
    indices = np.load(root / "train/all__puzzle_indices.npy")
    puzzle = np.repeat(np.arange(ids.size), np.diff(indices))
    preds = []
    with torch.no_grad():
        for lo in range(0, inputs.shape[0], 8):
            rows = slice(lo, lo + 8)
            batch = {
                "inputs": torch.from_numpy(inputs[rows].astype(np.int32)),
                "labels": torch.ones(8, inputs.shape[1], dtype=torch.int32),
                "puzzle_identifiers": torch.from_numpy(ids[puzzle[rows]].astype(np.int32)),
                "puzzle_index": torch.from_numpy(puzzle[rows]),
            }
            out = state.model(carry=state.model.initial_carry(batch), batch=batch)
            preds.append(out.outputs["preds"].numpy())
    labels = np.concatenate(preds).astype(np.uint16)
    easy = np.arange(ids.size) % 2 == 0
    hard_rows = ~easy[puzzle]
    labels[hard_rows, 0] = np.where(labels[hard_rows, 0] == 1, 2, 1)  # never the prediction
    np.save(root / "train/all__labels.npy", labels)
    return easy


def test_a_run_moves_its_picks_to_the_unsolved_variants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lr=0 and one supervision step per row: variant 0 of every group is always right,
    variant 1 never. Iteration 1 draws uniform's picks; its counts give weights 1/(seen + 1)
    for the easy variants and 1 for the hard ones, and iteration 2, planned by the loader's
    worker (data_workers=1) with those weights, picks the hard variants far more often."""
    root = _data(tmp_path / "data")
    overrides = ["lr=0", "puzzle_emb_lr=0", "arch.halt_max_steps=1", "data_workers=1"]
    config = _config(root, tmp_path / "run", *overrides)
    easy = _make_easy_and_hard(root, config)
    batches = _train(config, monkeypatch)

    reference = PuzzleDataset(
        PuzzleDatasetConfig(
            seed=config.seed,
            dataset_paths=[str(root)],
            global_batch_size=8,
            test_set_mode=False,
            epochs_per_iter=2,
            fields=["inputs", "puzzle_index"],
        ),
        "train",
    )
    first = [b["puzzle_index"].tolist() for _, b, _ in reference]
    n_first = len(first)
    assert batches[:n_first] == first  # iteration 1: uniform's plan, bit for bit

    # Every row halts at its one step and has labels: seen = its rows in iteration 1.
    seen = np.bincount(np.concatenate(first), minlength=easy.size)
    weights = np.where(easy, 1.0 - seen / (seen + 1.0), 1.0)
    second = batches[n_first:]
    expected = HardExampleSampler(
        reference.reader.sets,
        reference.metadata,
        seed=config.seed,
        global_batch_size=8,
        epochs_per_iter=2,
    )
    expected.set_weights(weights)
    plan = expected.plan(0, expected.set_counter(expected.iteration_counter(1), 0))
    assert second == [plan.batch(i).puzzles.tolist() for i in range(plan.num_batches)]
    easy_first = np.mean(easy[np.concatenate(first)])
    easy_second = np.mean(easy[np.concatenate(second)])
    assert easy_first > 0.4 and easy_second < 0.3, (easy_first, easy_second)

    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines if "sampling/" in line]
    assert len(logged) == 2  # after each iteration
    assert logged[0]["step"] == n_first
    assert 0 < logged[0]["sampling/weight_entropy"] < 1
    assert logged[0]["sampling/groups_changed"] == pytest.approx(np.mean(seen[easy] > 0))
    last = torch.load(tmp_path / f"run/step_{len(batches)}/{ckpt.TRAIN_FILE}", weights_only=True)
    totals = last["hard_examples"]
    assert totals["seen"].sum() == 8 * len(batches)
    assert torch.equal(totals["correct"], totals["seen"] * torch.from_numpy(easy))


def test_resume_between_and_within_iterations_equals_the_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two iterations of 8 steps with ACT carries (rows halting steps after they were loaded)
    and a loader worker: stopping at step 3 (mid-iteration), at step 8 (the iteration's last
    batch, before its rebuild) or resuming the checkpoint written after iteration 1's rebuild
    gives the straight run's batches, counts and weights. Variant 1 of every group has no
    labels: a row is never counted for it, also when a slot that loaded it later holds a
    labelled row that halts."""
    root = _data(tmp_path / "data")
    labels = np.load(root / "train/all__labels.npy")
    puzzle = np.repeat(np.arange(32), 2)
    labels[puzzle % 2 == 1] = 0  # the dataset's ignore_label_id
    np.save(root / "train/all__labels.npy", labels)
    common = ["arch.halt_max_steps=2", "data_workers=1", "lr=1e-2"]
    straight = _train(
        _config(root, tmp_path / "a", *common, "checkpoint_every_steps=3"), monkeypatch
    )
    steps = len(straight)
    final = torch.load(tmp_path / f"a/step_{steps}/{ckpt.TRAIN_FILE}", weights_only=True)
    assert final["hard_examples"]["weights"] is not None
    seen = final["hard_examples"]["seen"]
    assert seen[1::2].sum() == 0 and seen[0::2].sum() > 0
    # checkpoint_every_eval (the default) wrote a/step_8 after iteration 1's rebuild.
    shutil.copytree(tmp_path / "a/step_8", tmp_path / "b0/step_8")
    for stop in (0, 3, 8):
        run = tmp_path / f"b{stop}"
        head = []
        if stop:
            head = _train(_config(root, run, *common, f"max_steps={stop}"), monkeypatch)
        tail = _train(_config(root, run, *common, "resume=auto"), monkeypatch)
        resumed_at = 8 if stop == 0 else 0  # b0 starts from a's checkpoint at step 8
        assert head + tail == straight[resumed_at:], stop
        resumed = torch.load(run / f"step_{steps}/{ckpt.TRAIN_FILE}", weights_only=True)
        for key in ("seen", "correct", "weights"):
            assert torch.equal(resumed["hard_examples"][key], final["hard_examples"][key])
        model_a = torch.load(tmp_path / f"a/step_{steps}/model.pt", weights_only=True)
        model_b = torch.load(run / f"step_{steps}/model.pt", weights_only=True)
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)


def test_every_micro_batch_of_an_accumulation_window_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grad_accum_steps=2 (the fork summed the flags of the micro-batches but concatenated
    their identifiers, and crashed): with one supervision step every row of every micro-batch
    halts, so seen adds up to all their rows and correct to the logged exact matches."""
    root = _data(tmp_path / "data")
    config = _config(root, tmp_path / "run", "+grad_accum_steps=2", "arch.halt_max_steps=1")
    batches = _train(config, monkeypatch)
    assert len(batches) == 16  # 8 optimizer steps of 2 micro-batches
    final = torch.load(tmp_path / f"run/step_8/{ckpt.TRAIN_FILE}", weights_only=True)
    totals = final["hard_examples"]
    assert torch.equal(
        totals["seen"], torch.bincount(torch.tensor(batches).flatten(), minlength=32)
    )
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    exact = sum(m["train/exact_accuracy"] * 16 for m in lines if "train/exact_accuracy" in m)
    assert totals["correct"].sum().item() == pytest.approx(exact)


def test_demonstration_families_are_refused(tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    config = _config(data, tmp_path / "run", "arch=etrm", "arch.puzzle_emb_ndim=0")
    with pytest.raises(ConfigError, match=r"sampling=hard_examples.*demonstrations"):
        create_dataloader(config, "train", DistInfo(), test_set_mode=False)


# ----------------------------------------------------------------------------------------------
# Two gloo ranks
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(root: str, rank: int, replicas: int) -> PuzzleDataset:
    config = PuzzleDatasetConfig(
        seed=5,
        dataset_paths=[root],
        global_batch_size=8,
        test_set_mode=False,
        epochs_per_iter=2,
        rank=rank,
        num_replicas=replicas,
        sampler="hard_examples",
        fields=["inputs", "puzzle_index"],
    )
    return PuzzleDataset(config, "train")


def _observe_first_iteration(data: PuzzleDataset, counts: HardExampleCounts) -> None:
    """Every row of iteration 1 halts; a row is right when its puzzle index is even."""
    for _, batch, _ in data:
        index = batch["puzzle_index"]
        halted = torch.ones_like(index, dtype=torch.bool)
        counts.observe(index, halted, index % 2 == 0)


def _rank_main(rank: int, world_size: int, port: int, root: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        data = _dataset(root, rank, world_size)
        assert isinstance(data.sampler, HardExampleSampler)
        counts = HardExampleCounts(data.sampler, torch.device("cpu"))
        _observe_first_iteration(data, counts)
        counts.rebuild()
        second = [b["puzzle_index"] for _, b, _ in data]
        torch.save(
            {"weights": torch.from_numpy(data.sampler.current_weights()), "batches": second},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_gloo_ranks_hold_the_same_weights_and_plan(tmp_path: Path) -> None:
    root = str(_data(tmp_path / "data"))
    mp.spawn(_rank_main, args=(2, _free_port(), root, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = _dataset(root, 0, 1)
    assert isinstance(single.sampler, HardExampleSampler)
    counts = HardExampleCounts(single.sampler, torch.device("cpu"))
    _observe_first_iteration(single, counts)
    counts.rebuild()
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert np.array_equal(ranks[0]["weights"].numpy(), single.sampler.current_weights())
    assert single.sampler.current_weights().min() < 1.0
    # Rank r's rows are rows [4r, 4r + 4) of the single process's global batches.
    for b, whole in enumerate(_dataset_batches(single)):
        assert torch.equal(torch.cat([ranks[0]["batches"][b], ranks[1]["batches"][b]]), whole)


def _dataset_batches(data: PuzzleDataset) -> list[torch.Tensor]:
    return [batch["puzzle_index"] for _, batch, _ in data]
