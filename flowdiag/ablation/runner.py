"""Run an ablation grid as one Optuna study: one trial per cell, resumable, shared by N workers
(the protocol is in study.py).

Workers wait while other machines' trials are RUNNING, so a killed one is picked up again here once
its heartbeat is stale. A SIGINT / SIGTERM stops a worker after its current cell has checkpointed
(stopping.py): the trial ends FAIL with status `interrupted` and the next run of the same command
continues it from that checkpoint at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from flowdiag.ablation.attempt import ends_trial
from flowdiag.ablation.cell_objective import CellObjective
from flowdiag.ablation.cells_file import publish
from flowdiag.ablation.spec import AblationSpec, check_ablation
from flowdiag.ablation.stopping import StopRequest
from flowdiag.ablation.storage import Reaper, make_storage
from flowdiag.ablation.study import STUDY_KIND, SyncReport, cells_snapshot, open_study, sync_grid
from flowdiag.runtime.environment import end_with_parent, process_context, resolve_device
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import DataConfig, RunConfig, validate_config
from flowdiag.train.data import ImageData, load_dataset

POLL_SECONDS = 0.2  # while waiting for other workers' running cells: the last one ends the job
AfterTrial = Callable[[optuna.Study, FrozenTrial], None]


def publish_cells(spec: AblationSpec, study: optuna.Study, stopped: bool = False) -> None:
    """Rewrite OUT/cells.json from the study (see cells_file.py)."""
    publish(spec.out, spec.study_name, STUDY_KIND, lambda: cells_snapshot(study, spec.grid.cells, stopped))


def _stop_when_queue_empty(study: optuna.Study, _: FrozenTrial) -> None:
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.stop()


def work(
    spec: AblationSpec, objective: CellObjective | None = None, after_trial: AfterTrial | None = None
) -> None:
    """One worker: run queued cells until none is waiting and none is running anywhere, or until
    its stop request (the objective's) is asked."""
    study = optuna.load_study(
        study_name=spec.study_name, storage=make_storage(spec.storage_url, schema_checked=True)
    )
    objective = objective or CellObjective(spec)
    stop = objective.stop
    objective.on_claim = lambda: publish_cells(spec, study)

    def finished(study: optuna.Study, trial: FrozenTrial) -> None:
        publish_cells(spec, study)
        if stop.requested:
            study.stop()
        if after_trial is not None:
            after_trial(study, trial)

    reaper = Reaper()
    while not stop.requested:
        if reaper.sweep(study):
            publish_cells(spec, study)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.optimize(objective, callbacks=[_stop_when_queue_empty, finished], catch=ends_trial())
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(POLL_SECONDS)  # another worker's cell: wait, in case its heartbeat goes stale
        else:
            return


def _worker_process(spec: AblationSpec, data: dict[DataConfig, ImageData]) -> None:
    end_with_parent()
    # A signal before the stop request is in place (the first moments of a spawned worker): no cell
    # was claimed yet, nothing to close.
    with contextlib.suppress(KeyboardInterrupt), StopRequest() as stop:
        work(spec, CellObjective(spec, data=data, stop=stop))


def start_workers(
    spec: AblationSpec, data: dict[DataConfig, ImageData] | None = None
) -> list[multiprocessing.process.BaseProcess]:
    """Worker processes, each with its own storage engine and one torch thread (see environment).

    Forked where that is safe, so they start with the launcher's imports and data; spawned ones load
    their own data (passing it would pickle it through a pipe). Start them before the launcher
    installs its own stop request: a forked child must not share its wakeup socket.
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


def prepare(spec: AblationSpec) -> tuple[optuna.Study, SyncReport, dict[DataConfig, ImageData]]:
    """Open (or resume) the study, fail dead workers' trials and queue what is left; nothing runs
    yet. Returns the study, what the sync found and queued, and the data sets loaded for the check
    (the in-process worker reuses them)."""
    check_ablation(spec, storage_given=False)  # a library caller's spec too; make_storage checks the URL
    data = check_configs([spec.grid.config_for(cell) for cell in spec.grid.cells])
    created = make_out(spec.out)
    try:
        study = open_study(
            spec.storage_url, spec.study_name, STUDY_KIND, spec.grid.fixed_json(), list(spec.grid.axes)
        )
        report = sync_grid(study, spec.grid.cells)
    except UserError:
        if created:  # a refused command leaves nothing behind
            shutil.rmtree(spec.out, ignore_errors=True)
        raise
    publish_cells(spec, study)
    return study, report, data
