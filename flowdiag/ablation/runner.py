"""Run an ablation grid as one Optuna study: one trial per cell, resumable, shared by N workers.

Protocol (measured safe on SQLite and PostgreSQL, see storage.py):
- the launching process *syncs* the grid: RUNNING trials whose heartbeat went stale are failed and
  re-queued; every cell with no COMPLETE, WAITING or RUNNING trial is queued as a WAITING trial
  whose params are the cell values;
- each worker pops WAITING trials through `study.optimize`, which claims a trial atomically and
  keeps its heartbeat; a worker whose `ask()` found the queue empty got a sampler trial instead and
  discards it (pruned, no cell), so no cell ever runs twice;
- two machines that sync the same grid at once both queue its cells: a popped trial whose cell has
  an earlier live (waiting, running or complete) trial is discarded as a duplicate (pruned), so the
  earliest live trial of a cell is the one that runs;
- workers wait while other machines' trials are RUNNING, so a killed one is picked up again here
  once its heartbeat is stale.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from flowdiag.ablation.grid import Grid, cell_key, cell_slug
from flowdiag.ablation.storage import fail_dead_trials, make_storage
from flowdiag.record.store import read_run
from flowdiag.runtime.environment import end_with_parent, process_context, resolve_device
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import DataConfig, RunConfig, validate_config
from flowdiag.settings.options import OPTIONS_BY_NAME
from flowdiag.train.data import ImageData, load_dataset
from flowdiag.train.progress import ProgressSink
from flowdiag.train.trainer import RunResult, train

STUDY_KIND = "ablation"
CREATOR_WAIT_SECONDS = 10.0  # for the process that created a study to write what it holds
POLL_SECONDS = 0.2  # while waiting for other workers' running cells: the last one ends the job
# What may fail one cell and let the others run: memory. Anything else is a bug, and must stop the
# worker loudly rather than leave a FAIL trial that every rerun retries.
CELL_FAILURES: tuple[type[Exception], ...] = (torch.OutOfMemoryError,)


@dataclass(frozen=True)
class AblationSpec:
    grid: Grid
    out: Path
    storage_url: str
    study_name: str
    workers: int = 1
    nproc_per_cell: int = 1  # > 1: each cell is a data-parallel job of that many ranks


# --- the study ---------------------------------------------------------------------------------


def open_study(
    storage_url: str, study_name: str, kind: str, fixed_json: str, axes: list[str]
) -> optuna.Study:
    """Create or load the study; refuse one made with other fixed settings (never mix them)."""
    storage = make_storage(storage_url)
    try:  # the database decides who creates it: of processes starting it at once, exactly one
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
    else:
        _label(study, kind, fixed_json, axes)
        return study
    attrs = _settled_attrs(study)
    if attrs is None:  # its creator died before it said what the study holds
        _label(study, kind, fixed_json, axes)
        return study
    if attrs["kind"] != kind:
        raise UserError(f"study {study_name!r} is a {attrs['kind']} study, not {kind}: use another --study")
    if attrs["fixed"] != fixed_json or sorted(attrs["axes"]) != sorted(axes):
        old, new = json.loads(attrs["fixed"]), json.loads(fixed_json)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "axis") != new.get(k, "axis"))
        details = (
            ", ".join(f"{k}: {old.get(k, 'axis')} -> {new.get(k, 'axis')}" for k in changed) or "grid axes"
        )
        raise UserError(
            f"study {study_name!r} was made with other fixed settings ({details}); "
            "use another --study or --out to keep both"
        )
    return study


def _label(study: optuna.Study, kind: str, fixed_json: str, axes: list[str]) -> None:
    """What the study holds; "kind" last, so that a process that sees it sees the others."""
    study.set_user_attr("fixed", fixed_json)
    study.set_user_attr("axes", sorted(axes))
    study.set_user_attr("kind", kind)


def _settled_attrs(study: optuna.Study) -> dict[str, Any] | None:
    """The study's attributes once its creator has written "kind" (milliseconds after creating it;
    before the fix two machines starting one study met a KeyError here); None if it never does."""
    deadline = time.monotonic() + CREATOR_WAIT_SECONDS
    while True:
        attrs = study.user_attrs
        if "kind" in attrs:
            return attrs
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _distribution(name: str, value: Any) -> BaseDistribution:
    """Single-point distributions: they stay compatible when the grid grows."""
    option = OPTIONS_BY_NAME[name]
    if option.kind == "choice":
        return CategoricalDistribution(option.choices)
    if value is None:
        raise UserError(f"{option.cli_flag}: 'none' cannot be one value of a grid axis")
    if isinstance(value, int):
        return IntDistribution(value, value)
    return FloatDistribution(value, value)


def sync_grid(study: optuna.Study, cells: list[dict[str, Any]]) -> int:
    """Re-queue stale trials and queue every cell that has no live trial; returns how many were queued."""
    fail_dead_trials(study)
    live = {
        t.user_attrs.get("cell")
        for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
        )
    }
    queued = 0
    for cell in cells:
        key = cell_key(cell)
        if key in live:
            continue
        study.add_trial(
            create_trial(
                state=TrialState.WAITING,
                params=cell,
                distributions={name: _distribution(name, value) for name, value in cell.items()},
                user_attrs={"cell": key},
            )
        )
        queued += 1
    return queued


def cell_trials(study: optuna.Study, cells: list[dict[str, Any]]) -> dict[str, FrozenTrial | None]:
    """The COMPLETE trial of each cell (None where it has none yet), in grid order."""
    done = {
        t.user_attrs["cell"]: t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "cell" in t.user_attrs
    }
    return {cell_key(cell): done.get(cell_key(cell)) for cell in cells}


# --- one trial ---------------------------------------------------------------------------------


def trial_value(result: RunResult) -> float:
    """Best held-out bpd, else the last training bpd; a diverged run is +inf (a result, not a failure)."""
    for value in (result.best_eval_bpd, result.final_bpd):
        if result.status == "completed" and math.isfinite(value):
            return value
    return math.inf


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def record_result(trial: optuna.Trial, result: RunResult) -> None:
    trial.set_user_attr("status", result.status)
    trial.set_user_attr("nan_onset_step", result.nan_onset_step)
    trial.set_user_attr("nan_onset_layer", result.nan_onset_layer)
    trial.set_user_attr("hdf5_path", str(Path(result.h5_path).resolve()))
    trial.set_user_attr("best_bpd", _finite_or_none(result.best_eval_bpd))
    trial.set_user_attr("final_bpd", _finite_or_none(result.final_bpd))
    trial.set_user_attr("step2_peak_max_abs", None if math.isnan(result.step2_peak) else result.step2_peak)
    trial.set_user_attr("early_peak_max_abs", None if math.isnan(result.early_peak) else result.early_peak)
    trial.set_user_attr("steps", result.steps)
    # Where it ran: which process, on how many intra-op threads (one per worker unless told otherwise).
    trial.set_user_attr("worker_pid", os.getpid())
    trial.set_user_attr("torch_threads", torch.get_num_threads())


def fresh_run_dir(out: Path, slug: str, trial_number: int) -> Path:
    """The cell's run folder; a killed earlier attempt's folder moves to .stale/, out of the report."""
    run_dir = out / "runs" / slug
    if run_dir.exists():
        stale = out / ".stale" / f"{slug}-before-trial{trial_number}"
        stale.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), str(stale))
    return run_dir


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


class CellObjective:
    """The Optuna objective: train the trial's cell into its own folder and record the result."""

    def __init__(
        self,
        spec: AblationSpec,
        progress: Callable[[optuna.Trial], ProgressSink] | None = None,
        data: dict[DataConfig, ImageData] | None = None,
    ) -> None:
        self.spec = spec
        self.progress = progress or StorageProgress
        # What `prepare` already loaded to check the grid; a spawned worker loads its own.
        self._data: dict[DataConfig, ImageData] = dict(data or {})

    def data_for(self, config: DataConfig) -> ImageData:
        if config not in self._data:
            self._data[config] = load_dataset(config)
        return self._data[config]

    def __call__(self, trial: optuna.Trial) -> float:
        if "cell" not in trial.user_attrs:  # the queue was empty when this worker asked: not a cell
            trial.study.stop()
            raise optuna.TrialPruned("no grid cell left")
        earlier = _earlier_live_trial(trial)
        if earlier is not None:  # another machine queued this cell too, before this trial
            trial.set_user_attr("duplicate_of", earlier)
            raise optuna.TrialPruned(f"cell already taken by trial {earlier}")
        cell = json.loads(trial.user_attrs["cell"])
        config = self.spec.grid.config_for(cell)
        run_dir = fresh_run_dir(self.spec.out, cell_slug(cell), trial.number)
        if self.spec.nproc_per_cell > 1:
            from flowdiag.ablation.ddp_cell import train_data_parallel

            result = train_data_parallel(config, run_dir, self.spec.nproc_per_cell)
            for step, bpd in zip(*_evaluations(result), strict=True):  # learning curve, after the fact
                trial.report(bpd, step)
        else:
            result = train(config, run_dir, data=self.data_for(config.data), progress=self.progress(trial))
        record_result(trial, result)
        if result.status == "interrupted":
            raise KeyboardInterrupt  # the trial ends FAIL, so the next run does this cell again
        return trial_value(result)


def _evaluations(result: RunResult) -> tuple[list[int], list[float]]:
    record = read_run(result.h5_path)
    return record.eval_step.tolist(), record.eval_bpd.tolist()


def _earlier_live_trial(trial: optuna.Trial) -> int | None:
    """The number of an earlier waiting, running or complete trial of the same cell, if any."""
    key = trial.user_attrs["cell"]
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    for other in trial.study.get_trials(deepcopy=False, states=live):
        if other.number < trial.number and other.user_attrs.get("cell") == key:
            return other.number
    return None


def _stop_when_queue_empty(study: optuna.Study, _: FrozenTrial) -> None:
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.stop()


def work(
    spec: AblationSpec,
    objective: CellObjective | None = None,
    after_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> None:
    """One worker: run queued cells until none is waiting and none is running anywhere."""
    study = optuna.load_study(
        study_name=spec.study_name, storage=make_storage(spec.storage_url, schema_checked=True)
    )
    objective = objective or CellObjective(spec)
    while True:
        fail_dead_trials(study)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            callbacks = [_stop_when_queue_empty] + ([after_trial] if after_trial else [])
            study.optimize(objective, callbacks=callbacks, catch=CELL_FAILURES)
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(POLL_SECONDS)  # another worker's cell: wait, in case its heartbeat goes stale
        else:
            return


def _worker_process(spec: AblationSpec, data: dict[DataConfig, ImageData]) -> None:
    end_with_parent()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the launcher prints the summary
        work(spec, CellObjective(spec, data=data))


def start_workers(
    spec: AblationSpec, data: dict[DataConfig, ImageData] | None = None
) -> list[multiprocessing.process.BaseProcess]:
    """Worker processes, each with its own storage engine and one torch thread (see environment).

    Forked where that is safe, so they start with the launcher's imports and data; spawned ones load
    their own data (passing it would pickle it through a pipe).
    """
    context = process_context()
    shared = data if context.get_start_method() == "fork" else {}
    processes = [
        context.Process(target=_worker_process, args=(spec, shared), daemon=False)
        for _ in range(spec.workers)
    ]
    for process in processes:
        process.start()
    return processes


def check_configs(configs: list[RunConfig]) -> dict[DataConfig, ImageData]:
    """What the trainer would refuse, refused before anything is written: settings, device, data."""
    for config in configs:
        validate_config(config)
    for device in {config.train.device for config in configs}:
        resolve_device(device)
    return {data_config: load_dataset(data_config) for data_config in {config.data for config in configs}}


def make_out(out: Path) -> bool:
    """Create the output folder; True when this call created it."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --out {out} ({error.strerror}); choose another folder") from None
    return created


def prepare(spec: AblationSpec) -> tuple[optuna.Study, int, dict[DataConfig, ImageData]]:
    """Open (or resume) the study and queue what is left; nothing runs yet. Returns the study, the
    number of cells queued and the data sets loaded for the check (the in-process worker reuses them)."""
    data = check_configs([spec.grid.config_for(cell) for cell in spec.grid.cells])
    created = make_out(spec.out)
    try:
        study = open_study(
            spec.storage_url, spec.study_name, STUDY_KIND, spec.grid.fixed_json(), list(spec.grid.axes)
        )
        queued = sync_grid(study, spec.grid.cells)
    except UserError:
        if created:  # a refused command leaves nothing behind
            shutil.rmtree(spec.out, ignore_errors=True)
        raise
    return study, queued, data
