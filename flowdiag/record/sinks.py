"""What a Monitor tells besides its run file: an Optuna trial (`trial=`) and live loggers (`log_to=`),
each a listener called after every step's row and closed with the run. Only the data-parallel rank
that writes the run file (rank 0) makes them.

A logger is recognized by what it offers, never by importing its package here: a TensorBoard
SummaryWriter (`add_scalar`, `add_histogram`), a W&B run (its class comes from `wandb`), an MLflow run
(`.info.run_id`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from flowdiag.record.live_log import LiveLog
from flowdiag.record.log_mlflow import MlflowLog
from flowdiag.record.log_tensorboard import TensorBoardLog
from flowdiag.record.log_wandb import WandbLog
from flowdiag.record.run_state import RunState, StepRecord
from flowdiag.record.trial_record import TrialRecord
from flowdiag.runtime.errors import UserError


class Sink(Protocol):
    def __call__(self, record: StepRecord, onset: str | None) -> None: ...

    def close(self, status: str, state: RunState) -> None: ...


def live_log(target: Any, every: int, pixels: Callable[[], list[int | None]]) -> LiveLog:
    """The live logger for one `log_to` object (see the module docstring)."""
    if callable(getattr(target, "add_scalar", None)) and callable(getattr(target, "add_histogram", None)):
        return TensorBoardLog(target, every, pixels)
    if type(target).__module__.split(".")[0] == "wandb":
        return WandbLog(target, every, pixels)
    if isinstance(getattr(getattr(target, "info", None), "run_id", None), str):
        return MlflowLog(target, every, pixels)
    raise UserError(
        f"Monitor(log_to=...) takes a TensorBoard SummaryWriter, an MLflow run (mlflow.start_run()) or a "
        f"W&B run (wandb.init()), or a list of them; got {type(target).__name__}"
    )


def monitor_sinks(
    trial: Any, log_to: Any, every: int, run_file: Path, pixels: Callable[[], list[int | None]]
) -> list[Sink]:
    """The sinks a Monitor was asked for, trial first (its onset is what a pruner waits on)."""
    if every < 1:
        raise UserError(f"Monitor(log_every=...) must be at least 1, got {every}")
    sinks: list[Sink] = [] if trial is None else [TrialRecord(trial, run_file, every)]
    targets: Sequence[Any] = (
        [] if log_to is None else list(log_to) if isinstance(log_to, list | tuple) else [log_to]
    )
    sinks.extend(live_log(target, every, pixels) for target in targets)
    return sinks
