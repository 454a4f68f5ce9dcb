"""The training loop of ``pretrain.py``: plain functions over a ``TrainState``.

Semantics are upstream ``pretrain.py``'s (``launch``): the ACT carry persists across batches
(slots refill only when they halt), each train iteration is ``eval_interval`` epochs of the
loader followed by an evaluation, and a checkpoint follows each evaluation. The pieces live in
named modules: ``training.state`` (the state and its creation), ``training.strategies`` (how a
batch becomes gradients), ``training.step`` (one optimizer step), ``training.evaluation`` and
``training.rollout``, ``training.checkpointing`` (resumable ``step_N`` folders). Every model
family and step strategy runs through this one loop; a strategy that takes N optimizer steps
per batch (ETRM-FCT) gets each batch N times, ``step`` counts optimizer steps (the schedule's
length is N × the batches), and a checkpoint between two of a batch's steps resumes with the
same batch and its remaining steps.

The JD fork's knobs: ``start_step=N`` starts a fresh run's step counter at N (the schedule, the
logged steps, the checkpoints' names; a resumed checkpoint's own step wins), so with
``cap_total_steps`` the schedule's last N steps are past ``total_steps`` and their batches are
skipped as upstream skips every such batch; ``run_evaluator_only_at_end`` evaluates after the
last iteration only, checkpoints still following ``checkpoint_every_eval``.

Gradient accumulation (k micro-batches per optimizer step, ``training.step``): each loader
batch is one micro-batch and ``step`` counts optimizer steps (the schedule's length is the
batches // k). Windows of k batches start at each iteration's first batch; the last
``batches % k`` batches of an iteration, too few for a step, are drawn and not trained on, so
every evaluation and every checkpoint falls between optimizer steps. A checkpoint is therefore
never taken inside a window: ``checkpoint_every_steps``, ``max_steps`` and a stop signal act
at the next window's end, and resuming continues bit-identically.

With ``sampling=hard_examples`` each completed iteration ends, before its evaluation, with
``training.hard_examples`` rebuilding the sampling weights from every rank's counts; the next
iteration's plan draws from them (an iteration cut short by ``max_steps`` rebuilds when a
resumed run completes it).

SIGTERM or SIGINT (``training.preemption``) ends the run after the current step or evaluation,
on every rank at the same step, with a checkpoint that ``resume=auto`` continues from
bit-identically; ``InterruptedRunError`` says where it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dataset.puzzle_dataset import PuzzleDataset
from evaluators.base import Evaluator, build_evaluators
from evaluators.prediction_images import SEQ_LEN as PREDICTION_SEQ_LEN
from evaluators.prediction_images import log_predictions, log_step_curve
from models.registry import describe_model
from training.checkpointing import resolve_resume, resume_train_state, save_train_state
from training.config import PretrainConfig
from training.data import check_eval_data, create_dataloader
from training.evaluation import ema_weights, evaluate
from training.preemption import InterruptedRunError, StopSignals
from training.run_files import write_run_files
from training.state import TrainState, create_train_state, seed_everything
from training.step import NonFiniteLossError, StepResult, any_rank, train_batch
from utils.distributed import DistInfo, collective_phase, decide_on_main
from utils.logging import RunLogger
from utils.schema import ConfigError

__all__ = [
    "InterruptedRunError",
    "NonFiniteLossError",
    "Progress",
    "RunOutcome",
    "default_evaluators",
    "run_training",
]

EvaluatorsFactory = Callable[[PuzzleDataset], list[Evaluator]]


class Progress(Protocol):
    """Rank 0's progress display, started once the number of steps is known."""

    def start(self, total: int, initial: int) -> None: ...

    def update(self, **postfix: float) -> None: ...

    def close(self) -> None: ...


@dataclass
class RunOutcome:
    steps: int
    last_checkpoint: Path | None
    eval_metrics: dict[str, float]


def default_evaluators(config: PretrainConfig) -> EvaluatorsFactory:
    """The run's configured evaluators for an evaluation dataset."""
    return lambda data: build_evaluators(
        config.evaluators, data.config.dataset_paths, data.identifier_offsets
    )


def run_training(
    config: PretrainConfig,
    dist_info: DistInfo,
    *,
    logger: RunLogger,
    progress: Progress | None = None,
    evaluators_factory: EvaluatorsFactory | None = None,
) -> RunOutcome:
    """Train (resuming if asked), evaluating every ``eval_interval`` epochs."""
    seed_everything(config, dist_info.rank)
    train_loader, train_data = create_dataloader(config, "train", dist_info, test_set_mode=False)
    try:
        eval_loader, eval_data = create_dataloader(config, "test", dist_info, test_set_mode=True)
    except FileNotFoundError as e:
        eval_loader, eval_data = None, None
        if dist_info.is_main:
            print(f"no evaluation data ({e}); evaluation is skipped")
    evaluators: list[Evaluator] = []
    if eval_data is not None:
        check_eval_data(config, train_data.metadata, eval_data.metadata)
        if evaluators_factory is not None:
            evaluators = evaluators_factory(eval_data)

    # The schedule counts optimizer steps (N per batch for fixed computation time, one per k
    # batches with gradient accumulation: training.state.schedule_length).
    state = create_train_state(config, train_data, dist_info)
    assert state.strategy is not None
    if config.log_predictions_every and train_data.metadata.seq_len != PREDICTION_SEQ_LEN:
        raise ConfigError(
            f"log_predictions_every draws ARC grids (seq_len {PREDICTION_SEQ_LEN}); this dataset "
            f"has seq_len {train_data.metadata.seq_len}: drop log_predictions_every"
        )
    if dist_info.is_main:
        info = describe_model(state.raw_model)
        logger.log({f"model/{k}": float(v) for k, v in info.items()}, step=0)
        print(
            f"model: {info['num_params']:,} trainable parameters; puzzle-embedding table "
            f"{info['puzzle_emb_rows']:,} rows, {info['puzzle_emb_bytes'] / 2**20:.1f} MiB"
        )

    last_checkpoint: Path | None = None
    if config.resume is not None:
        # Rank 0 decides (one view of the shared checkpoint folder) and tells the others.
        folder = decide_on_main(lambda: resolve_resume(config), dist_info.is_main)
        if folder is not None:
            resume_train_state(folder, state, dist_info, train_data, config)
            last_checkpoint = folder
            if dist_info.is_main:
                print(f"resumed from {folder} at step {state.step}")
                if config.start_step:
                    print(f"start_step={config.start_step} is ignored: the run continues "
                          f"from the checkpoint's step {state.step}")  # fmt: skip
        elif dist_info.is_main:
            print(f"resume=auto: no checkpoint in {config.checkpoint_path}; starting fresh")
    if dist_info.is_main:
        write_run_files(config, state.step, logger)
    if config.max_steps is not None and state.step >= config.max_steps:
        if dist_info.is_main:
            print(f"max_steps={config.max_steps} already reached at step {state.step}")
        return RunOutcome(state.step, last_checkpoint, {})

    if progress is not None:
        progress.start(total=state.total_steps, initial=state.step)
    run = _Run(config, dist_info, state, train_data, last_checkpoint)
    try:
        with StopSignals() as signals:
            eval_metrics = _train(
                run, train_loader, eval_loader, evaluators, logger, progress, signals
            )
    finally:
        if progress is not None:
            progress.close()
    return RunOutcome(state.step, run.last_checkpoint, eval_metrics)


@dataclass
class _Run:
    """What the loop body shares: the state and where its last checkpoint is."""

    config: PretrainConfig
    dist_info: DistInfo
    state: TrainState
    train_data: PuzzleDataset
    last_checkpoint: Path | None
    saved_at: tuple[int, int, int] | None = None  # the progress the last checkpoint holds
    slow_next: bool = True  # the next step gets the slow collective timeout

    def _progress(self) -> tuple[int, int, int]:
        return (self.state.step, self.state.iteration, self.state.batches_in_iteration)

    def save(self) -> None:
        with collective_phase(f"checkpoint at step {self.state.step}", slow=True):
            self.last_checkpoint = save_train_state(
                self.config, self.state, self.dist_info, self.train_data
            )
        self.saved_at = self._progress()
        self.slow_next = True

    def interrupt(self, signals: StopSignals) -> InterruptedRunError:
        """Write the checkpoint of the current step; the error to raise."""
        where = "no checkpoint_path, nothing saved"
        if self.config.checkpoint_path:
            if self.saved_at != self._progress():
                self.save()
            where = f"checkpoint {self.last_checkpoint}; continue with resume=auto"
        # A rank without a signal of its own stops because another rank had one.
        name = signals.name if signals.requested else "a signal to another process"
        return InterruptedRunError(
            f"stopped by {name} after step {self.state.step}; {where}", signals.received or 15
        )


def _step(
    run: _Run, batch: dict[str, torch.Tensor], logger: RunLogger, signals: StopSignals
) -> StepResult:
    """One optimizer step, or one micro-batch of one; rank 0 logs the metrics of a batch's last
    step (ETRM-FCT's are those of the last of its N) and of every skipped one."""
    config, dist_info, state = run.config, run.dist_info, run.state
    # Slow: the first step compiles, and after an evaluation or a checkpoint the other ranks
    # wait here while rank 0 finishes writing.
    with collective_phase(f"step {state.step + 1}", slow=run.slow_next):
        result = train_batch(
            config, state, batch, dist_info, run.last_checkpoint, stop_requested=signals.requested
        )
    run.slow_next = False
    if result.batch_done:
        state.batches_in_iteration += 1
    if result.metrics is not None and dist_info.is_main:
        if result.batch_done or result.skipped is not None:
            logger.log(result.metrics, step=state.step)
        every = config.log_predictions_every
        if every and result.batch_done and result.predicted is not None and state.step % every == 0:
            log_predictions(
                logger, "train/predictions", result.predicted, {}, state.step,
                config.log_predictions_max_samples, config.log_predictions_crop,
            )  # fmt: skip
        if result.skipped is not None:
            print(f"step {state.step}: non-finite {result.skipped}, update skipped "
                  f"({state.nonfinite_streak} in a row)")  # fmt: skip
    return result


def _train(
    run: _Run,
    train_loader: Any,
    eval_loader: Any,
    evaluators: list[Evaluator],
    logger: RunLogger,
    progress: Progress | None,
    signals: StopSignals,
) -> dict[str, float]:
    config, dist_info, state, train_data = run.config, run.dist_info, run.state, run.train_data
    eval_metrics: dict[str, float] = {}
    stop = False
    k = state.accumulation_steps
    for iteration in range(state.iteration, config.iterations):
        state.model.train()
        started, examples = time.perf_counter(), 0
        # A checkpoint taken after an iteration's last batch (before its evaluation) resumes
        # straight into that evaluation; the data position already points at the next one.
        num_batches = train_data.num_batches(iteration)
        finished = 0 < num_batches <= state.batches_in_iteration
        trained = num_batches - num_batches % k  # batches in whole accumulation windows
        for _set_name, batch, _gbs in [] if finished else train_loader:
            if k > 1 and state.batches_in_iteration >= trained:
                continue  # an accumulation window's worth no longer fits in this iteration
            # The strategy's optimizer steps on this batch (one, except fixed computation time).
            while True:
                result = _step(run, batch, logger, signals)
                if dist_info.is_main and result.batch_done:
                    examples += config.global_batch_size
                if not result.update_done:
                    break
                shown = progress is not None and dist_info.is_main and result.skipped is None
                if result.metrics is not None and progress is not None and shown:
                    postfix = {}
                    if result.batch_done:
                        rate = examples / max(time.perf_counter() - started, 1e-9)
                        postfix = {"loss": result.metrics["train/lm_loss"],
                                   "examples_per_s": rate}  # fmt: skip
                    progress.update(**postfix)
                if config.checkpoint_every_steps and (
                    state.step % config.checkpoint_every_steps == 0
                ):
                    run.save()
                if result.stop_requested:
                    raise run.interrupt(signals)
                if config.max_steps is not None and state.step >= config.max_steps:
                    stop = True
                    break
                if result.batch_done:
                    break
            if stop:
                break
        if not stop:
            state.iteration = iteration + 1
            state.batches_in_iteration = 0
            if state.hard_examples is not None:
                # The next iteration's plan (and this evaluation's checkpoint) get the weights
                # of every rank's counts so far; a stopped iteration keeps its own.
                with collective_phase(f"hard-example weights at step {state.step}"):
                    stats = state.hard_examples.rebuild()
                if dist_info.is_main:
                    logger.log(stats, step=state.step)
        is_last = stop or iteration == config.iterations - 1
        evaluates = iteration >= (config.min_eval_interval or 0) or is_last
        if config.run_evaluator_only_at_end:
            evaluates = is_last  # the JD fork's knob; checkpoints below are unaffected
        if eval_loader is not None and evaluates:
            save_path = None
            if config.checkpoint_path:
                save_path = Path(config.checkpoint_path) / f"eval_step_{state.step}"
            phase = collective_phase(f"evaluation at step {state.step}", slow=True)
            with ema_weights(state), phase:
                result = evaluate(config, state, eval_loader, evaluators, dist_info, save_path)
            eval_metrics = result.metrics
            if dist_info.is_main:
                logger.log(eval_metrics, step=state.step)
                if result.exact_by_step is not None:
                    log_step_curve(logger, "eval/exact_by_step", result.exact_by_step, state.step)
                if result.predictions is not None:
                    result.predictions.log(logger, "eval/predictions", state.step)
                if result.outputs is not None and save_path is not None:
                    save_path.mkdir(parents=True, exist_ok=True)
                    torch.save(result.outputs, save_path / "eval_outputs.pt")
        if config.checkpoint_path and (config.checkpoint_every_eval or is_last):
            run.save()
        with collective_phase(f"end of iteration at step {state.step}", slow=True):
            if any_rank(signals.requested, dist_info.device):
                raise run.interrupt(signals)
        run.slow_next = True
        if stop:
            break
    return eval_metrics
