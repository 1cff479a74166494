"""Which λ a tuning trial trains, and never one that another trial trains or trained.

The search space is λ log-uniform in [lam_min, lam_max] only. λ = 0, the unpenalized baseline every
other λ is compared with, cannot sit on a log scale: it is one enqueued trial that carries its λ as
a user attribute and suggests nothing, so TPE never proposes it again. (A `lam_is_zero` categorical
beside the float, as before, was proposed again by TPE: λ = 0 trained twice in 4 trials.)

A proposal can still repeat a λ: two launchers starting one study both enqueue the baseline, and TPE
may propose a λ within a hair of one it has. Such a trial is pruned before it trains (Optuna's public
way to end a trial without a result); TPE counts a pruned trial without intermediate values among
its worst, so it learns to propose elsewhere. Of two trials running the same λ at once, the one with
the lower number trains: each names its λ before it checks, so whichever checks last sees the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from flowdiag.ablation.cell_states import RUN_NAME_ATTR, by_key, cell_state

LAM_ATTR = "lam_value"  # the λ a trial trains (0 included, which no parameter can hold)
REPEATS_ATTR = "repeats"  # on a pruned trial: the trial whose λ it repeated
BASELINE_LAM = 0.0
# Two λ this close are one experiment: the penalty scales with λ, and a 0.1 % change is far below what
# seeds can resolve; they also print alike at the 3 significant digits of run names and tables.
SAME_LAMBDA_REL_TOL = 1e-3
# Proposals in a row that repeat a trained λ before a worker gives up: the range is used up.
MAX_REPEATS_IN_A_ROW = 20


def same_lambda(a: float, b: float) -> bool:
    """One experiment: equal to SAME_LAMBDA_REL_TOL (0 only equals 0)."""
    return math.isclose(a, b, rel_tol=SAME_LAMBDA_REL_TOL, abs_tol=0.0)


def trial_lambda(trial: optuna.Trial, lam_min: float, lam_max: float) -> float:
    """The λ this trial trains: the baseline's (an enqueued trial carries it), that of the trial it
    continues (an interrupted one queued again under its trial name), else TPE's proposal."""
    preset = trial.user_attrs.get(LAM_ATTR)
    if preset is not None:
        return float(preset)
    name = trial.user_attrs.get(RUN_NAME_ATTR)
    if name is not None:
        for other in trial.study.get_trials(deepcopy=False):
            if other.user_attrs.get(RUN_NAME_ATTR) == name and LAM_ATTR in other.user_attrs:
                return float(other.user_attrs[LAM_ATTR])
    return trial.suggest_float("lam", lam_min, lam_max, log=True)


def holder_of(trials: Sequence[FrozenTrial], lam: float, number: float, name: str | None) -> str | None:
    """The trial that trains or trained `lam` instead of trial `number` (named `name`), if any: one that
    finished it, one interrupted that will resume it, or one that started training it first."""
    for other, attempts in by_key(trials, RUN_NAME_ATTR).items():
        lams = [t.user_attrs[LAM_ATTR] for t in attempts if LAM_ATTR in t.user_attrs]
        if other == name or not lams or not same_lambda(lams[0], lam):
            continue
        state = cell_state(attempts).state
        if state in ("done", "interrupted") or (state == "running" and attempts[0].number < number):
            return other
    for trial in trials:  # running, not yet named: the baseline another launcher enqueued too
        if (
            trial.state == TrialState.RUNNING
            and trial.number < number
            and RUN_NAME_ATTR not in trial.user_attrs
            and same_lambda(trial.user_attrs.get(LAM_ATTR, math.nan), lam)
        ):
            return f"trial {trial.number}"
    return None


def skip_if_trained(trial: optuna.Trial, lam: float) -> None:
    """Prune this trial when another trains or trained its λ (call it once the trial is named)."""
    holder = holder_of(
        trial.study.get_trials(deepcopy=False), lam, trial.number, trial.user_attrs.get(RUN_NAME_ATTR)
    )
    if holder is not None:
        trial.set_user_attr(REPEATS_ATTR, holder)
        raise optuna.TrialPruned(f"λ = {lam:.3g} is trained by {holder}")


def enqueue_baseline(study: optuna.Study) -> bool:
    """Queue the λ = 0 trial unless the study has it (queued, running, finished or to resume)."""
    trials = study.get_trials(deepcopy=False)
    queued = any(t.state == TrialState.WAITING and t.user_attrs.get(LAM_ATTR) == BASELINE_LAM for t in trials)
    if queued or holder_of(trials, BASELINE_LAM, math.inf, None) is not None:
        return False
    study.enqueue_trial({}, user_attrs={LAM_ATTR: BASELINE_LAM})
    return True
