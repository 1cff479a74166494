"""`flowdiag tune-lambda`: TPE over λ at fixed M, batch size and the rest, each λ trained on every seed.

λ is log-uniform in [lam_min, lam_max], with λ = 0 as one enqueued first trial (a log scale cannot
hold 0) and no λ trained twice (lambda_choice.py). Each trial trains its λ on every seed, one after
another (seed_runs.py): its objective is the mean over the seeds of the best held-out bpd, a diverged
seed counting as a finite worst case (2 · n_bits bits/dim, worse than the uniform model's n_bits);
its constraint is the rate of seeds that diverged, so a trial is infeasible when any seed diverged.
A diverged seed is a result, not a silent FAIL that TPE would ignore: the sampler learns where λ
diverges, and by how much (an infeasible trial's rate orders it among the infeasible ones).
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
from flowdiag.ablation.lambda_choice import (
    LAM_ATTR,
    MAX_REPEATS_IN_A_ROW,
    REPEATS_ATTR,
    enqueue_baseline,
    skip_if_trained,
    trial_lambda,
)
from flowdiag.ablation.runner import check_configs, make_out
from flowdiag.ablation.seed_runs import (
    LaterSeedSink,
    Outcome,
    SeedRun,
    carry_first_seed_curve,
    finished_before,
    finished_seeds,
    record_outcome,
    seed_run_name,
    seed_states,
    write_seed_runs,
)
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
    """The trial's name, which its seeds' run folders start with: its own, or the one of the
    interrupted trial it continues."""
    return trial.user_attrs.get(RUN_NAME_ATTR) or f"trial{trial.number:04d}-lam{lam:.3g}"


def seed_config(config: RunConfig, lam: float, seed: int) -> RunConfig:
    """The run of λ on one seed: the study's config with both set."""
    return replace(config, train=replace(config.train, lam=lam, seed=seed))


class LambdaObjective:
    """Optuna's objective: choose the trial's λ (or prune it as a repeat), train it on every seed,
    return the seeds' mean and set the divergence rate as the constraint."""

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
        lam = trial_lambda(trial, self.spec.lam_min, self.spec.lam_max)
        trial.set_user_attr(LAM_ATTR, lam)
        trial.set_user_attr(RUN_NAME_ATTR, run_name(trial, lam))
        skip_if_trained(trial, lam)  # named first: of two trials of one λ, the later one sees the other
        self.on_claim()
        runs = self._train_seeds(trial, lam)
        outcome = Outcome.of(runs, worst_case_bpd(self.spec.config))
        record_outcome(trial, runs)
        trial.set_constraint("diverged", outcome.diverged_rate)
        return outcome.value

    def _train_seeds(self, trial: optuna.Trial, lam: float) -> list[SeedRun]:
        """Train the seeds that earlier attempts of this trial did not finish, in order."""
        name, seeds = trial.user_attrs[RUN_NAME_ATTR], self.spec.trial_seeds
        runs = finished_before(trial, name)
        write_seed_runs(trial, runs)
        if seeds[0] in runs:
            carry_first_seed_curve(trial, name)
        for seed in seeds:
            if seed in runs:
                continue
            if self.stop.requested and runs:
                # Between two seeds: run_attempt ends the trial before this seed starts. Said here, or
                # the earlier seed's "completed" would make the log line read as a killed worker's.
                trial.set_user_attr("status", "interrupted")
                trial.set_user_attr("steps", 0)
            sink = self.progress(trial)
            config = seed_config(self.spec.config, lam, seed)
            result = run_attempt(
                trial,
                seed_run_name(name, seed),
                config,
                self.spec.out,
                self._train,
                sink if seed == seeds[0] else LaterSeedSink(sink),
                self.stop,
            )
            runs[seed] = SeedRun.from_result(seed, seed_run_name(name, seed), result)
            write_seed_runs(trial, runs)
        return [runs[seed] for seed in seeds]

    def _train(self, config: RunConfig, run_dir: Path, resume: bool, sink: ProgressSink) -> RunResult:
        return self.train_fn(config, run_dir, resume=resume, data=self.data, progress=sink)


def publish_runs(spec: TuneSpec, study: optuna.Study, stopped: bool = False) -> None:
    """OUT/cells.json for a tuning study: each (λ, seed) run folder and its state."""

    def read() -> tuple[dict[str, str], int]:
        trials = study.get_trials(deepcopy=False)
        runs: dict[str, str] = {}
        for name, attempts in by_key(trials, RUN_NAME_ATTR).items():
            runs.update(seed_states(name, attempts, spec.trial_seeds, stopped))
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


def resuming_runs(spec: TuneSpec, study: optuna.Study) -> tuple[int, list[str]]:
    """The trials queued again to resume, and the (λ, seed) runs they have still to finish."""
    trials = study.get_trials(deepcopy=False)
    groups = by_key(trials, RUN_NAME_ATTR)
    waiting = sorted(
        {
            t.user_attrs[RUN_NAME_ATTR]
            for t in trials
            if t.state == TrialState.WAITING and RUN_NAME_ATTR in t.user_attrs
        }
    )
    runs = []
    for name in waiting:
        states = seed_states(name, groups[name], spec.trial_seeds, stopped=False)
        runs += [run for run, state in states.items() if state != "done"]
    return len(waiting), runs


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
    enqueue_baseline(study)  # λ = 0, the unpenalized baseline, first
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

    budget = TrialBudget(spec.n_trials - done)

    def finished(study: optuna.Study, trial: FrozenTrial) -> None:
        reaper.sweep(study)
        publish_runs(spec, study)
        if budget.spent(trial) or objective.stop.requested:
            study.stop()
        if after_trial is not None:
            after_trial(study, trial)

    # Running trials count: with N workers, one that finishes must not start a trial that the
    # others' running ones already make one too many.
    callbacks: list[Any] = [
        MaxTrialsCallback(spec.n_trials, states=(TrialState.COMPLETE, TrialState.RUNNING)),
        finished,
    ]
    study.optimize(  # no n_trials: the budget stops it, and a pruned repeat does not count
        objective,
        n_trials=None,
        timeout=spec.timeout,
        callbacks=callbacks,
        catch=ends_trial(),
    )
    return study


class TrialBudget:
    """The trials one worker may still run: n_trials less those done when it started. A trial that
    trained (or failed) spends one; one pruned because its λ was trained already does not, but
    MAX_REPEATS_IN_A_ROW of those in a row end the worker: TPE finds no λ in the range it has not
    tried."""

    def __init__(self, trials: int) -> None:
        self.left, self.repeats = trials, 0

    def spent(self, trial: FrozenTrial) -> bool:
        """Count the trial that just ended; True when the worker should start no other."""
        if trial.state == TrialState.PRUNED:
            self.repeats += 1
        else:
            self.left, self.repeats = self.left - 1, 0
        return self.left <= 0 or self.repeats >= MAX_REPEATS_IN_A_ROW


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
    """One finished trial: its λ, the objective, and each seed's run."""

    number: int
    lam: float
    value: float  # the objective: the mean over the seeds (a diverged seed at the worst case)
    seeds: tuple[SeedRun, ...]

    @property
    def diverged(self) -> int:
        """How many of its seeds diverged."""
        return sum(run.diverged for run in self.seeds)

    @property
    def feasible(self) -> bool:
        """No seed diverged (the constraint holds) and the objective is a number."""
        return bool(self.seeds) and self.diverged == 0 and math.isfinite(self.value)


def tuning_rows(study: optuna.Study) -> list[TuneRow]:
    """The study's finished trials, λ ascending."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        runs = finished_seeds(t.user_attrs)
        rows.append(
            TuneRow(
                number=t.number,
                lam=float(t.user_attrs.get(LAM_ATTR, math.nan)),
                value=float(t.value) if t.value is not None else math.nan,
                seeds=tuple(runs[seed] for seed in sorted(runs)),
            )
        )
    return sorted(rows, key=lambda r: (r.lam, r.number))


def repeats_at_end(study: optuna.Study) -> int:
    """How many of the study's last finished trials in a row were pruned as repeats of a trained λ
    (lambda_choice.skip_if_trained): MAX_REPEATS_IN_A_ROW of them and the range is used up."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    count = 0
    for trial in sorted(finished, key=lambda t: t.number, reverse=True):
        if trial.state != TrialState.PRUNED or REPEATS_ATTR not in trial.user_attrs:
            break
        count += 1
    return count
