"""A tuning trial's runs: its λ trained on every seed, one after another, each in its own run folder
OUT/runs/<trial name>-seed<S> (the trial name holds its number and λ).

What each seed ended with is written on the trial as the seed finishes (`SEEDS_ATTR`): an interrupted
trial's continuation (same trial name, queued again) copies what its earlier attempts finished and
trains only the seeds they had not, resuming the one that was stopped from its checkpoint.

Optuna keeps one intermediate value per step, so a trial's learning curve (Optuna Dashboard) is its
first seed's; the later seeds' evaluations are not reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from flowdiag.ablation.cell_states import RUN_DIR_ATTR, RUN_NAME_ATTR, cell_state
from flowdiag.train.progress import ProgressSink
from flowdiag.train.trainer import RunResult

SEEDS_ATTR = "seeds"  # {"<seed>": SeedRun fields}: the seeds a trial (or its earlier attempts) finished


@dataclass(frozen=True)
class SeedRun:
    """One finished (completed or diverged) run of a trial's λ on one seed."""

    seed: int
    status: str  # completed | diverged
    nan_onset_step: int  # -1: it did not diverge
    nan_onset_layer: str
    best_bpd: float | None  # best held-out bpd; None where there was none
    final_bpd: float | None  # the last training bpd; None where it was not finite
    run: str  # the run folder's name under OUT/runs/
    hdf5_path: str  # its run file, absolute

    @classmethod
    def from_result(cls, seed: int, run: str, result: RunResult) -> SeedRun:
        """What the trainer returned for the run folder `run`; non-finite numbers become None."""
        return cls(
            seed=seed,
            status=result.status,
            nan_onset_step=result.nan_onset_step,
            nan_onset_layer=result.nan_onset_layer,
            best_bpd=_finite_or_none(result.best_eval_bpd),
            final_bpd=_finite_or_none(result.final_bpd),
            run=run,
            hdf5_path=str(Path(result.h5_path).resolve()),
        )

    @property
    def diverged(self) -> bool:
        """Anything but completed: a finished run that did not complete diverged."""
        return self.status != "completed"

    @property
    def result_bpd(self) -> float | None:
        """The seed's best held-out bpd as a result: None where it diverged (its evaluations before the
        divergence are not its outcome), as the report's statistics read it."""
        return None if self.diverged else self.best_bpd

    def value(self, worst: float) -> float:
        """What the seed adds to the objective: its best held-out bpd, else its last training bpd; the
        finite worst case where it diverged or has neither."""
        if self.diverged:
            return worst
        return next((v for v in (self.best_bpd, self.final_bpd) if v is not None), worst)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def seed_run_name(trial_name: str, seed: int) -> str:
    """The run folder of one seed of a trial: `trial0003-lam0.0001-seed2`."""
    return f"{trial_name}-seed{seed}"


def finished_seeds(attrs: dict[str, Any]) -> dict[int, SeedRun]:
    """The seeds one trial's attributes say were finished."""
    return {int(seed): SeedRun(**fields) for seed, fields in attrs.get(SEEDS_ATTR, {}).items()}


def write_seed_runs(trial: optuna.Trial, runs: dict[int, SeedRun]) -> None:
    """Write the finished seeds on the trial, whole (one attribute, rewritten as each seed ends)."""
    trial.set_user_attr(SEEDS_ATTR, {str(seed): asdict(run) for seed, run in sorted(runs.items())})


def finished_before(trial: optuna.Trial, name: str) -> dict[int, SeedRun]:
    """The seeds that earlier attempts of the trial `name` (interrupted, queued again) finished."""
    finished: dict[int, SeedRun] = {}
    for other in trial.study.get_trials(deepcopy=False):
        if other.number < trial.number and other.user_attrs.get(RUN_NAME_ATTR) == name:
            finished.update(finished_seeds(other.user_attrs))
    return finished


def carry_first_seed_curve(trial: optuna.Trial, name: str) -> None:
    """The first seed finished in an earlier attempt, which reported its evaluations: report them on
    this attempt too, so that the trial that completes holds its first seed's whole learning curve."""
    reported = set(_frozen(trial).intermediate_values)
    for other in trial.study.get_trials(deepcopy=False):
        if other.number < trial.number and other.user_attrs.get(RUN_NAME_ATTR) == name:
            for step, value in sorted(other.intermediate_values.items()):
                if step not in reported:
                    trial.report(value, step)
                    reported.add(step)


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


class LaterSeedSink(ProgressSink):
    """A later seed's progress goes to the trial's sink as the first seed's did, but not its held-out
    evaluations: Optuna keeps one value per step, and the trial's curve is its first seed's."""

    def __init__(self, inner: ProgressSink) -> None:
        self.inner = inner

    def start(self, total_steps: int, description: str) -> None:
        self.inner.start(total_steps, description)

    def phase(self, name: str) -> None:
        self.inner.phase(name)

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        self.inner.advance(step, bpd, steps_per_second)

    def stop(self) -> None:
        self.inner.stop()


@dataclass(frozen=True)
class Outcome:
    """A trial's result over its seeds: the objective and the constraint."""

    value: float  # mean over the seeds of SeedRun.value
    diverged_rate: float  # diverged seeds / seeds: the constraint, feasible only at 0

    @classmethod
    def of(cls, runs: Sequence[SeedRun], worst: float) -> Outcome:
        """The outcome of a trial's seeds (at least one), `worst` standing for a diverged seed."""
        return cls(
            value=sum(run.value(worst) for run in runs) / len(runs),
            diverged_rate=sum(run.diverged for run in runs) / len(runs),
        )


def record_outcome(trial: optuna.Trial, runs: Sequence[SeedRun]) -> None:
    """The trial's own result attributes summarize its seeds (the result table's line for the trial,
    Optuna Dashboard): diverged when any seed did, at the earliest onset; best bpd the mean of the
    seeds' when every seed has one."""
    diverged = sorted((r for r in runs if r.diverged), key=lambda r: r.nan_onset_step)
    trial.set_user_attr("status", "diverged" if diverged else "completed")
    trial.set_user_attr("nan_onset_step", diverged[0].nan_onset_step if diverged else -1)
    trial.set_user_attr("nan_onset_layer", diverged[0].nan_onset_layer if diverged else "")
    bests = [r.result_bpd for r in runs]
    mean = sum(b for b in bests if b is not None) / len(bests) if None not in bests else None
    trial.set_user_attr("best_bpd", mean)


def seed_states(
    name: str, attempts: list[FrozenTrial], seeds: Iterable[int], stopped: bool
) -> dict[str, str]:
    """What the cells file says of each (λ, seed) run of one trial name: `done` once a seed finished
    (whatever became of its trial), `running` for the seed a running trial trains (the others
    `waiting`), else the trial's own state."""
    state = cell_state(attempts)
    finished: dict[int, SeedRun] = {}
    for attempt in attempts:
        finished.update(finished_seeds(attempt.user_attrs))
    training = None
    if state.state == "running" and state.last is not None:
        training = Path(state.last.user_attrs.get(RUN_DIR_ATTR, "")).name
    states = {}
    for seed in seeds:
        run = seed_run_name(name, seed)
        if seed in finished:
            states[run] = "done"
        elif state.state == "running":
            states[run] = "running" if run == training else "waiting"
        else:
            states[run] = state.file_state(stopped)
    return states
