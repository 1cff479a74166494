"""`flowdiag tune-lambda`: TPE over λ at fixed M, batch size and the rest.

λ is log-uniform in [lam_min, lam_max] with λ = 0 as a separate candidate (a log scale cannot hold
0), tried first. A diverged trial is not a silent FAIL, which TPE would ignore: it completes with a
finite worst-case value (2 · n_bits bits/dim, worse than the uniform model's n_bits) *and* an
infeasibility constraint, so the sampler learns that region diverges.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from flowdiag.ablation.runner import (
    CELL_FAILURES,
    StorageProgress,
    check_configs,
    make_out,
    open_study,
    record_result,
)
from flowdiag.ablation.storage import make_storage
from flowdiag.runtime.environment import end_with_parent, process_context
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig, placement_fields
from flowdiag.train.data import ImageData
from flowdiag.train.progress import ProgressSink
from flowdiag.train.trainer import RunResult, train

STUDY_KIND = "tune-lambda"
TrainFn = Callable[..., RunResult]


@dataclass(frozen=True)
class TuneSpec:
    config: RunConfig  # everything but λ
    lam_min: float
    lam_max: float
    n_trials: int
    out: Path
    storage_url: str
    study_name: str
    timeout: float | None = None
    sampler_seed: int = 0
    startup_trials: int = 4

    def fixed_json(self) -> str:
        """What defines the study: the config but λ and the placement settings, and λ's range."""
        config = self.config.to_dict()
        config["train"].pop("lam")
        for section, name in placement_fields():
            config[section].pop(name)
        return json.dumps({"config": config, "lam_range": [self.lam_min, self.lam_max]}, sort_keys=True)


def worst_case_bpd(config: RunConfig) -> float:
    return 2.0 * config.data.n_bits


def validate(spec: TuneSpec) -> None:
    if not (0 < spec.lam_min < spec.lam_max) or not math.isfinite(spec.lam_max):
        raise UserError(f"--lam-min/--lam-max: need 0 < min < max, got {spec.lam_min:g}, {spec.lam_max:g}")
    if spec.n_trials < 1:
        raise UserError(f"--n-trials must be a positive integer, got {spec.n_trials}")
    if spec.timeout is not None and spec.timeout <= 0:
        raise UserError(f"--timeout must be positive seconds, got {spec.timeout:g}")


class LambdaObjective:
    def __init__(
        self,
        spec: TuneSpec,
        data: ImageData,
        progress: Callable[[optuna.Trial], ProgressSink] | None = None,
        train_fn: TrainFn = train,
    ) -> None:
        self.spec, self.data = spec, data
        self.progress = progress or StorageProgress
        self.train_fn = train_fn

    def __call__(self, trial: optuna.Trial) -> float:
        if trial.suggest_categorical("lam_is_zero", [True, False]):
            lam = 0.0
        else:
            lam = trial.suggest_float("lam", self.spec.lam_min, self.spec.lam_max, log=True)
        trial.set_user_attr("lam_value", lam)
        config = replace(self.spec.config, train=replace(self.spec.config.train, lam=lam))
        run_dir = self.spec.out / "runs" / f"trial{trial.number:04d}-lam{lam:.3g}"
        result = self.train_fn(config, run_dir, data=self.data, progress=self.progress(trial))
        record_result(trial, result)
        if result.status == "interrupted":
            raise KeyboardInterrupt
        diverged = result.status != "completed"
        trial.set_constraint("diverged", 1.0 if diverged else -1.0)
        if diverged:
            return worst_case_bpd(config)
        finite = [v for v in (result.best_eval_bpd, result.final_bpd) if math.isfinite(v)]
        return finite[0] if finite else worst_case_bpd(config)


def open_tuning(spec: TuneSpec) -> tuple[optuna.Study, ImageData]:
    """Check everything, then create or resume the study; a refused spec leaves nothing behind."""
    validate(spec)
    data = check_configs([spec.config])[spec.config.data]
    created = make_out(spec.out)
    try:
        study = open_study(spec.storage_url, spec.study_name, STUDY_KIND, spec.fixed_json(), ["lam"])
    except UserError:
        if created:
            shutil.rmtree(spec.out, ignore_errors=True)
        raise
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({"lam_is_zero": True})  # λ = 0, the unpenalized baseline, first
    return study, data


def run_tuning(
    spec: TuneSpec,
    study: optuna.Study | None,
    data: ImageData,
    *,
    progress: Callable[[optuna.Trial], ProgressSink] | None = None,
    train_fn: TrainFn = train,
    after_trial: Callable[[optuna.Study, Any], None] | None = None,
) -> optuna.Study:
    """Run trials until the study holds n_trials finished ones (resumable) or the timeout passes."""
    sampler = make_sampler(spec)
    study = optuna.load_study(
        study_name=spec.study_name,
        storage=make_storage(spec.storage_url, schema_checked=True),
        sampler=sampler,
    )
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= spec.n_trials:
        return study
    # Running trials count: with N workers, one that finishes must not start a trial that the
    # others' running ones already make one too many.
    callbacks: list[Any] = [
        MaxTrialsCallback(spec.n_trials, states=(TrialState.COMPLETE, TrialState.RUNNING))
    ]
    if after_trial:
        callbacks.append(after_trial)
    study.optimize(
        LambdaObjective(spec, data, progress, train_fn),
        n_trials=spec.n_trials - done,
        timeout=spec.timeout,
        callbacks=callbacks,
        catch=CELL_FAILURES,
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
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the launcher prints the table
        run_tuning(spec, None, data if data is not None else check_configs([spec.config])[spec.config.data])


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
