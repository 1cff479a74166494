"""One attempt at a run inside an Optuna trial, shared by ablation cells and λ tuning trials: the
claim, the run folder (resumed or fresh), training with the stop request forwarded, and what the
trial records. A finished run (completed or diverged) is the trial's result; an interrupted or
failed one leaves the trial FAIL with no result attributes, so nothing counts it as one."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from flowdiag.ablation.cell_states import RUN_DIR_ATTR
from flowdiag.ablation.claims import CLAIM_ATTR, this_worker
from flowdiag.ablation.resume import run_folder
from flowdiag.ablation.stopping import StopRequest
from flowdiag.record import trial_record as names
from flowdiag.settings.config import RunConfig
from flowdiag.train.progress import ProgressSink
from flowdiag.train.trainer import RunResult

# What may fail one cell and let the others run: memory. Anything else is a bug, and must stop the
# worker loudly rather than leave a FAIL trial that every rerun retries.
CELL_FAILURES: tuple[type[Exception], ...] = (torch.OutOfMemoryError,)
Train = Callable[[RunConfig, Path, bool, ProgressSink], RunResult]


class CellInterrupted(Exception):
    """The attempt stopped unfinished on a signal: the trial ends FAIL, the worker runs no more."""


def ends_trial() -> tuple[type[Exception], ...]:
    """What `study.optimize` catches: the trial ends FAIL and the worker's loop decides what next."""
    return (*CELL_FAILURES, CellInterrupted)


def claim(trial: optuna.Trial) -> None:
    """The claim record, first thing in the trial (see claims.py and storage.Reaper)."""
    trial.set_user_attr(CLAIM_ATTR, this_worker())


class StorageProgress(ProgressSink):
    """A ProgressSink for worker processes: the trial's step, written to the study every few seconds,
    and every held-out evaluation as an intermediate value (Optuna Dashboard's learning curves)."""

    def __init__(self, trial: optuna.Trial, every_seconds: float = 3.0) -> None:
        self.trial, self.every, self.last = trial, every_seconds, 0.0

    def start(self, total_steps: int, description: str) -> None:
        self.trial.set_user_attr("progress_total", total_steps)

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.trial.set_user_attr("progress_step", step)

    def phase(self, name: str) -> None:
        self.trial.set_user_attr("progress_phase", name)

    def evaluated(self, step: int, bpd: float) -> None:
        self.trial.report(bpd, step)


class StopForwardingSink(ProgressSink):
    """Wraps the trial's sink. The trainer calls `phase` once its signal handler is in place: a stop
    asked before then (while the data or the model were built) is handed to it there, so it stops
    after the init with a checkpoint instead of training the whole cell. Notes the first step run,
    so the trial can say where a resumed run continued from."""

    def __init__(self, inner: ProgressSink, stop: StopRequest) -> None:
        self.inner, self.stop_request = inner, stop
        self.first_step: int | None = None

    def start(self, total_steps: int, description: str) -> None:
        self.inner.start(total_steps, description)

    def phase(self, name: str) -> None:
        self.stop_request.forward_to_trainer()
        self.inner.phase(name)

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        if self.first_step is None:
            self.first_step = step
        self.inner.advance(step, bpd, steps_per_second)

    def evaluated(self, step: int, bpd: float) -> None:
        self.inner.evaluated(step, bpd)

    def stop(self) -> None:
        self.inner.stop()


def run_attempt(
    trial: optuna.Trial,
    name: str,
    config: RunConfig,
    out: Path,
    train: Train,
    sink: ProgressSink,
    stop: StopRequest,
) -> RunResult:
    """Train (or resume) the run `name` for this trial; raises CellInterrupted when it stopped
    unfinished, and records a failure before re-raising it."""
    if stop.requested:
        raise CellInterrupted("stopped before it started")
    run_dir, resume = run_folder(out, name, trial.number, config)
    trial.set_user_attr(RUN_DIR_ATTR, str(run_dir.resolve()))
    forwarding = StopForwardingSink(sink, stop)
    try:
        result = train(config, run_dir, resume, forwarding)
    except Exception as error:  # memory (CELL_FAILURES) or a bug: failed, not interrupted
        text = str(error).strip()
        trial.set_user_attr(names.STATUS, "failed")
        trial.set_user_attr("error", text.splitlines()[0][:200] if text else type(error).__name__)
        raise
    if resume and forwarding.first_step is not None:
        trial.set_user_attr("resumed_from_step", forwarding.first_step - 1)
        carry_curve(trial, str(run_dir.resolve()), forwarding.first_step - 1)
    if result.status == "interrupted":
        trial.set_user_attr(names.STATUS, "interrupted")
        trial.set_user_attr(names.STEPS, result.steps)  # the checkpoint's step: where its rerun continues
        stop.ask()  # a signal the trainer took for itself: this worker stops too
        raise CellInterrupted(f"interrupted at step {result.steps}")
    record_result(trial, result)
    return result


def carry_curve(trial: optuna.Trial, run_dir: str, through: int) -> None:
    """A resumed run's evaluations before its checkpoint were reported to the attempts it continues:
    report them again here, so this trial holds the whole learning curve."""
    trials = trial.study.get_trials(deepcopy=False)
    reported = next(t for t in trials if t.number == trial.number).intermediate_values
    earlier: dict[int, float] = {}
    for other in trials:
        if other.number < trial.number and other.user_attrs.get(RUN_DIR_ATTR) == run_dir:
            earlier.update(other.intermediate_values)
    for step in sorted(earlier):
        if step <= through and step not in reported:
            trial.report(earlier[step], step)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def record_result(trial: optuna.Trial, result: RunResult) -> None:
    """A finished run's numbers on its trial (Optuna Dashboard, the result table, the report)."""
    # The names a user's own study gets from `Monitor(trial=...)` too (record/trial_record.py).
    trial.set_user_attr(names.STATUS, result.status)
    trial.set_user_attr(names.ONSET_STEP, result.nan_onset_step)
    trial.set_user_attr(names.ONSET_LAYER, result.nan_onset_layer)
    trial.set_user_attr(names.RUN_FILE, str(Path(result.h5_path).resolve()))
    trial.set_user_attr(names.BEST_BPD, _finite_or_none(result.best_eval_bpd))
    trial.set_user_attr(names.FINAL_BPD, _finite_or_none(result.final_bpd))
    trial.set_user_attr(names.STEP2_PEAK, None if math.isnan(result.step2_peak) else result.step2_peak)
    trial.set_user_attr(names.EARLY_PEAK, None if math.isnan(result.early_peak) else result.early_peak)
    trial.set_user_attr(names.STEPS, result.steps)
    # Where it ran: which process, on how many intra-op threads (one per worker unless told otherwise).
    trial.set_user_attr("worker_pid", os.getpid())
    trial.set_user_attr("torch_threads", torch.get_num_threads())


def trial_value(result: RunResult) -> float:
    """Best held-out bpd, else the last training bpd; a diverged run is +inf (a result, not a failure)."""
    for value in (result.best_eval_bpd, result.final_bpd):
        if result.status == "completed" and math.isfinite(value):
            return value
    return math.inf


def describe(attrs: dict[str, Any]) -> str:
    """How an unfinished attempt ended, for the log line: interrupted at step N, or the error."""
    if attrs.get("status") == "interrupted":
        return f"interrupted at step {attrs.get('steps', '?')}: rerun the same command to resume"
    if attrs.get("status") == "failed":
        return f"failed ({attrs.get('error', 'error')})"
    if RUN_DIR_ATTR in attrs:
        return "its worker stopped without a word (killed?); queued again to resume"
    return "stopped before it trained"
