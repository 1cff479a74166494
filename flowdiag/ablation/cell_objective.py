"""The ablation's Optuna objective: train the trial's cell into its own folder and record the result."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from flowdiag.ablation.attempt import StorageProgress, claim, run_attempt, trial_value
from flowdiag.ablation.grid import cell_slug
from flowdiag.ablation.spec import AblationSpec
from flowdiag.ablation.stopping import StopRequest
from flowdiag.record.store.scan import read_evals
from flowdiag.settings.config import DataConfig, RunConfig
from flowdiag.train.data import ImageData, load_dataset
from flowdiag.train.progress import ProgressSink
from flowdiag.train.trainer import RunResult, train


class CellObjective:
    """One trial = one cell: claimed, checked for duplicates, trained or resumed, recorded."""

    def __init__(
        self,
        spec: AblationSpec,
        progress: Callable[[optuna.Trial], ProgressSink] | None = None,
        data: dict[DataConfig, ImageData] | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.spec = spec
        self.progress = progress or StorageProgress
        self.stop = stop or StopRequest()
        # What `prepare` already loaded to check the grid; a spawned worker loads its own.
        self._data: dict[DataConfig, ImageData] = dict(data or {})
        self.on_claim: Callable[[], None] = lambda: None  # the runner publishes the cells file

    def data_for(self, config: DataConfig) -> ImageData:
        if config not in self._data:
            self._data[config] = load_dataset(config)
        return self._data[config]

    def __call__(self, trial: optuna.Trial) -> float:
        claim(trial)
        if "cell" not in trial.user_attrs:  # the queue was empty when this worker asked: not a cell
            trial.study.stop()
            raise optuna.TrialPruned("no grid cell left")
        earlier = _earlier_live_trial(trial)
        if earlier is not None:  # another machine queued this cell too, before this trial
            trial.set_user_attr("duplicate_of", earlier)
            raise optuna.TrialPruned(f"cell already taken by trial {earlier}")
        self.on_claim()
        cell = json.loads(trial.user_attrs["cell"])
        config = self.spec.grid.config_for(cell)
        sink = self.progress(trial)
        result = run_attempt(trial, cell_slug(cell), config, self.spec.out, self._train, sink, self.stop)
        if self.spec.nproc_per_cell > 1:  # the ranks' evaluations: the learning curve, after the fact
            for step, bpd in zip(*_evaluations(result), strict=True):
                trial.report(bpd, step)
        return trial_value(result)

    def _train(self, config: RunConfig, run_dir: Path, resume: bool, sink: ProgressSink) -> RunResult:
        if self.spec.nproc_per_cell > 1:
            from flowdiag.ablation.ddp_cell import train_data_parallel

            return train_data_parallel(config, run_dir, self.spec.nproc_per_cell, resume=resume)
        return train(config, run_dir, resume=resume, data=self.data_for(config.data), progress=sink)


def _evaluations(result: RunResult) -> tuple[list[int], list[float]]:
    steps, bpds = read_evals(result.h5_path)
    return steps.tolist(), bpds.tolist()


def _earlier_live_trial(trial: optuna.Trial) -> int | None:
    """The number of an earlier waiting, running or complete trial of the same cell, if any."""
    key = trial.user_attrs["cell"]
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    for other in trial.study.get_trials(deepcopy=False, states=live):
        if other.number < trial.number and other.user_attrs.get("cell") == key:
            return other.number
    return None
