"""`flowdiag tune-lambda`: TPE over λ at fixed M, batch size and the rest.

λ is log-uniform in [lam_min, lam_max] with λ = 0 as a separate candidate (a log scale cannot hold
0), tried first. A diverged trial is not a silent FAIL, which TPE would ignore: it completes with a
finite worst-case value (2 · n_bits bits/dim, worse than the uniform model's n_bits) *and* an
infeasibility constraint, so the sampler learns that region diverges.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState, create_trial

from flowdiag.ablation.attempt import StorageProgress, claim, ends_trial, run_attempt
from flowdiag.ablation.cell_states import RUN_NAME_ATTR, by_key, cell_state
from flowdiag.ablation.cells_file import publish
from flowdiag.ablation.runner import check_configs, make_out
from flowdiag.ablation.spec import TuneSpec, check_tuning
from flowdiag.ablation.stopping import StopRequest
from flowdiag.ablation.storage import Reaper, make_storage
from flowdiag.ablation.study import open_study
from flowdiag.runtime.environment import end_with_parent, process_context
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig
from flowdiag.train.data import ImageData
from flowdiag.train.progress import ProgressSink
from flowdiag.train.trainer import RunResult, train

STUDY_KIND = "tune-lambda"
TrainFn = Callable[..., RunResult]


def worst_case_bpd(config: RunConfig) -> float:
    return 2.0 * config.data.n_bits


def run_name(trial: optuna.Trial, lam: float) -> str:
    """The trial's run folder: its own, or the one of the interrupted trial it continues."""
    return trial.user_attrs.get(RUN_NAME_ATTR) or f"trial{trial.number:04d}-lam{lam:.3g}"


class LambdaObjective:
    def __init__(
        self,
        spec: TuneSpec,
        data: ImageData,
        progress: Callable[[optuna.Trial], ProgressSink] | None = None,
        train_fn: TrainFn = train,
        stop: StopRequest | None = None,
    ) -> None:
        self.spec, self.data = spec, data
        self.progress = progress or StorageProgress
        self.train_fn = train_fn
        self.stop = stop or StopRequest()
        self.on_claim: Callable[[], None] = lambda: None  # the runner publishes the cells file

    def __call__(self, trial: optuna.Trial) -> float:
        claim(trial)
        if trial.suggest_categorical("lam_is_zero", [True, False]):
            lam = 0.0
        else:
            lam = trial.suggest_float("lam", self.spec.lam_min, self.spec.lam_max, log=True)
        trial.set_user_attr("lam_value", lam)
        trial.set_user_attr(RUN_NAME_ATTR, run_name(trial, lam))
        self.on_claim()
        config = replace(self.spec.config, train=replace(self.spec.config.train, lam=lam))
        sink = self.progress(trial)
        result = run_attempt(
            trial, trial.user_attrs[RUN_NAME_ATTR], config, self.spec.out, self._train, sink, self.stop
        )
        diverged = result.status != "completed"
        trial.set_constraint("diverged", 1.0 if diverged else -1.0)
        if diverged:
            return worst_case_bpd(config)
        finite = [v for v in (result.best_eval_bpd, result.final_bpd) if math.isfinite(v)]
        return finite[0] if finite else worst_case_bpd(config)

    def _train(self, config: RunConfig, run_dir: Path, resume: bool, sink: ProgressSink) -> RunResult:
        return self.train_fn(config, run_dir, resume=resume, data=self.data, progress=sink)


def publish_runs(spec: TuneSpec, study: optuna.Study, stopped: bool = False) -> None:
    """OUT/cells.json for a tuning study: each trial's run folder and its state."""

    def read() -> tuple[dict[str, str], int]:
        trials = study.get_trials(deepcopy=False)
        runs = {
            name: cell_state(attempts).file_state(stopped)
            for name, attempts in by_key(trials, RUN_NAME_ATTR).items()
        }
        return runs, sum(t.state == TrialState.RUNNING for t in trials)

    publish(spec.out, spec.study_name, STUDY_KIND, read)


def requeue_interrupted(study: optuna.Study) -> int:
    """Queue again each run an earlier command left interrupted (a signal stopped it; a killed
    worker's was queued again already): same λ, same run folder, so it resumes its checkpoint."""
    queued = 0
    for attempts in by_key(study.get_trials(deepcopy=False), RUN_NAME_ATTR).values():
        state = cell_state(attempts)
        if state.state != "interrupted" or state.queued or state.last is None:
            continue
        last = state.last
        study.add_trial(
            create_trial(
                state=TrialState.WAITING,
                params=last.params,
                distributions=last.distributions,
                user_attrs={RUN_NAME_ATTR: last.user_attrs[RUN_NAME_ATTR]},
            )
        )
        queued += 1
    return queued


def open_tuning(spec: TuneSpec) -> tuple[optuna.Study, ImageData]:
    """Check the device and data, then create or resume the study; a refused spec leaves nothing
    behind. (The command line checked the rest before importing torch: spec.check_tuning.)"""
    check_tuning(spec, storage_given=False)  # a library caller's spec too; make_storage checks the URL
    data = check_configs([spec.config])[spec.config.data]
    created = make_out(spec.out)
    try:
        study = open_study(spec.storage_url, spec.study_name, STUDY_KIND, spec.fixed_json(), ["lam"])
    except UserError:
        if created:
            shutil.rmtree(spec.out, ignore_errors=True)
        raise
    Reaper().sweep(study)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({"lam_is_zero": True})  # λ = 0, the unpenalized baseline, first
    requeue_interrupted(study)
    publish_runs(spec, study)
    return study, data


def run_tuning(
    spec: TuneSpec,
    study: optuna.Study | None,
    data: ImageData,
    *,
    progress: Callable[[optuna.Trial], ProgressSink] | None = None,
    train_fn: TrainFn = train,
    after_trial: Callable[[optuna.Study, Any], None] | None = None,
    stop: StopRequest | None = None,
) -> optuna.Study:
    """Run trials until the study holds n_trials finished ones (resumable), the timeout passes or a
    stop is asked."""
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=make_storage(spec.storage_url, schema_checked=True),
        sampler=make_sampler(spec),
    )
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= spec.n_trials:
        return study
    objective = LambdaObjective(spec, data, progress, train_fn, stop)
    objective.on_claim = lambda: publish_runs(spec, study)
    reaper = Reaper()  # dead workers' trials, between trials (Optuna checks stale heartbeats itself)

    def finished(study: optuna.Study, trial: FrozenTrial) -> None:
        reaper.sweep(study)
        publish_runs(spec, study)
        if objective.stop.requested:
            study.stop()
        if after_trial is not None:
            after_trial(study, trial)

    # Running trials count: with N workers, one that finishes must not start a trial that the
    # others' running ones already make one too many.
    callbacks: list[Any] = [
        MaxTrialsCallback(spec.n_trials, states=(TrialState.COMPLETE, TrialState.RUNNING)),
        finished,
    ]
    study.optimize(
        objective,
        n_trials=spec.n_trials - done,
        timeout=spec.timeout,
        callbacks=callbacks,
        catch=ends_trial(),
    )
    return study


def make_sampler(spec: TuneSpec) -> optuna.samplers.TPESampler:
    """TPE with a constant liar: a λ another worker is still training counts as a bad one, so
    parallel workers do not propose the same point."""
    return optuna.samplers.TPESampler(
        seed=spec.sampler_seed, n_startup_trials=spec.startup_trials, constant_liar=True
    )


def worker_spec(spec: TuneSpec, index: int) -> TuneSpec:
    """Worker `index` of several: its own sampler seed, or every worker would draw the same λ."""
    return replace(spec, sampler_seed=spec.sampler_seed + index)


def _tuning_worker(spec: TuneSpec, data: ImageData | None) -> None:
    end_with_parent()
    with contextlib.suppress(KeyboardInterrupt), StopRequest() as stop:  # see runner._worker_process
        data = data if data is not None else check_configs([spec.config])[spec.config.data]
        run_tuning(spec, None, data, stop=stop)


def start_tuning_workers(spec: TuneSpec, data: ImageData, workers: int) -> list[Any]:
    """N processes sharing the study: TPE proposes each a λ as it frees up (one torch thread each)."""
    context = process_context()
    shared = data if context.get_start_method() == "fork" else None
    processes = [
        context.Process(target=_tuning_worker, args=(worker_spec(spec, index), shared))
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    return processes


@dataclass(frozen=True)
class TuneRow:
    number: int
    lam: float
    value: float
    status: str
    onset_step: int
    best_bpd: float | None


def tuning_rows(study: optuna.Study) -> list[TuneRow]:
    rows = [
        TuneRow(
            number=t.number,
            lam=float(t.user_attrs.get("lam_value", math.nan)),
            value=float(t.value) if t.value is not None else math.nan,
            status=str(t.user_attrs.get("status", t.state.name.lower())),
            onset_step=int(t.user_attrs.get("nan_onset_step", -1)),
            best_bpd=t.user_attrs.get("best_bpd"),
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]
    return sorted(rows, key=lambda r: r.number)


def best_lambda(rows: list[TuneRow]) -> TuneRow | None:
    feasible = [r for r in rows if r.status == "completed" and math.isfinite(r.value)]
    return min(feasible, key=lambda r: r.value) if feasible else None
