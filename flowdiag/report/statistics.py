"""What an ablation's seeds can and cannot tell: intervals, tests and verdicts, all from scipy.

Every figure here is a standard statistic computed by scipy (nothing written by hand):
- the divergence rate of a cell with its Wilson 95 % interval (`binomtest(k, n).proportion_ci`);
- two cells that differ in one setting, compared on divergence with Fisher's exact test (two-sided) and
  on best held-out bpd by the mean of the seed-paired differences with a bootstrap 95 % interval;
- time to divergence as a Kaplan–Meier curve (`scipy.stats.ecdf` on right-censored data: a run that did
  not diverge is censored at its last step) with its 95 % band.

A verdict is "better" or "worse" only when the evidence clears the bar (p < 0.05, or a bootstrap interval
that excludes 0); otherwise "cannot tell", which is a result too. Pure: cells in, numbers out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy import stats

Verdict = Literal["better", "worse", "cannot tell"]
ALPHA = 0.05  # the level of every test and interval here (95 %)
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a fixed stream: the same runs give the same interval in every report
# Fewest seed pairs whose bootstrap interval may carry a verdict. Resampling n values gives few distinct
# means (3 for n = 2, 10 for n = 3, 35 for n = 4) and no allowance for the unseen spread, so with fewer
# pairs the interval is about the range of the differences: "2 of 2 seeds got worse" would read as a
# result. From 5 pairs (126 distinct means) on, the interval is reported with its verdict; below, the
# interval is still reported, the verdict is "cannot tell".
MIN_PAIRS_FOR_VERDICT = 5


@dataclass(frozen=True)
class CellResult:
    """One cell of an ablation: its swept settings (the seed aside) and one outcome per seed.

    >>> cell = CellResult({"init_batches": 1}, (0, 1), (True, False), (1, None), (1, 200), (None, 7.9))
    >>> cell.runs, cell.n_diverged
    (2, 1)
    """

    settings: dict[str, Any]
    seeds: tuple[int, ...]
    diverged: tuple[bool, ...]
    onset_steps: tuple[int | None, ...]  # the NaN onset per seed; None where it did not diverge
    last_steps: tuple[int, ...]  # the last step per seed: where a run that did not diverge is censored
    best_bpd: tuple[float | None, ...]  # best held-out bpd per seed; None where there is none

    @property
    def runs(self) -> int:
        return len(self.seeds)

    @property
    def n_diverged(self) -> int:
        return sum(self.diverged)


def wilson_ci95(diverged: int, runs: int) -> tuple[float, float]:
    """The Wilson 95 % interval of a rate of `diverged` in `runs`; (0, 1) when there is no run.

    >>> low, high = wilson_ci95(0, 6)
    >>> round(low, 3), round(high, 3)
    (0.0, 0.39)
    """
    if runs == 0:
        return 0.0, 1.0
    interval = stats.binomtest(diverged, runs).proportion_ci(confidence_level=1 - ALPHA, method="wilson")
    return float(interval.low), float(interval.high)


def fisher_p(from_counts: tuple[int, int], to_counts: tuple[int, int]) -> float:
    """Two-sided p-value of Fisher's exact test on (diverged, runs) of two cells.

    >>> round(fisher_p((6, 6), (0, 6)), 4)
    0.0022
    """
    (k1, n1), (k2, n2) = from_counts, to_counts
    table = [[k1, n1 - k1], [k2, n2 - k2]]
    return float(stats.fisher_exact(table, alternative="two-sided").pvalue)


def divergence_verdict(from_counts: tuple[int, int], to_counts: tuple[int, int], p_value: float) -> Verdict:
    """ "better" when `to` diverges at a lower rate with p < 0.05, "worse" at a higher one."""
    if not p_value < ALPHA:
        return "cannot tell"
    from_rate, to_rate = (k / n if n else math.nan for k, n in (from_counts, to_counts))
    return "better" if to_rate < from_rate else "worse"


class PairedDifference(NamedTuple):
    n: int  # seeds with a value in both cells
    difference: float | None  # mean of (to - from) over those seeds; None without pairs
    ci95: tuple[float, float] | None  # bootstrap 95 % interval of that mean; None with fewer than 2 pairs
    verdict: Verdict


def paired_difference(
    from_values: Sequence[float | None], to_values: Sequence[float | None]
) -> PairedDifference:
    """Mean of the seed-paired differences to - from (lower bpd is better) and its bootstrap interval.

    "better" only when the whole interval is below 0, "worse" when above, else "cannot tell"; always
    "cannot tell" with fewer than MIN_PAIRS_FOR_VERDICT pairs.
    >>> paired_difference([5.0, 5.2, 5.1], [None, None, None]).verdict
    'cannot tell'
    >>> paired_difference([5.0, 5.2, 5.1, 5.3, 5.0], [4.8, 5.0, 4.95, 5.0, 4.9]).verdict
    'better'
    >>> paired_difference([5.0, 5.2], [4.8, 5.0]).verdict  # two seeds both better: not yet a result
    'cannot tell'
    """
    pairs = [(a, b) for a, b in zip(from_values, to_values, strict=True) if a is not None and b is not None]
    if not pairs:
        return PairedDifference(0, None, None, "cannot tell")
    differences = np.array([b - a for a, b in pairs], dtype=np.float64)
    mean = float(differences.mean())
    interval = bootstrap_ci95(differences)
    if interval is None:
        return PairedDifference(len(pairs), mean, None, "cannot tell")
    low, high = interval
    verdict: Verdict = "better" if high < 0 else "worse" if low > 0 else "cannot tell"
    if len(pairs) < MIN_PAIRS_FOR_VERDICT:
        verdict = "cannot tell"
    return PairedDifference(len(pairs), mean, interval, verdict)


def bootstrap_ci95(values: np.ndarray) -> tuple[float, float] | None:
    """scipy's bootstrap 95 % interval (BCa) of the mean; None with fewer than two values. Identical
    values have no spread to resample: their interval is the value itself."""
    if len(values) < 2:
        return None
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
        result = stats.bootstrap(
            (values,), np.mean, confidence_level=1 - ALPHA, n_resamples=BOOTSTRAP_RESAMPLES, rng=rng
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa can fail on tiny samples: no interval then
        return None
    return low, high


class SurvivalCurve(NamedTuple):
    """Kaplan–Meier estimate of P(not diverged by step s) for one cell, with its 95 % band."""

    steps: np.ndarray  # the step of each change, ascending, starting at 0
    survival: np.ndarray  # the estimate after each step
    low: np.ndarray  # the 95 % band (log-log, as scipy computes it)
    high: np.ndarray
    events: int  # divergences observed
    censored: int  # runs that ended without diverging


def survival_curve(cell: CellResult) -> SurvivalCurve:
    """Time to divergence: onsets are events, runs that did not diverge are censored at their last step.

    >>> curve = survival_curve(CellResult({}, (0, 1), (True, False), (3, None), (3, 200), (None, None)))
    >>> curve.survival.tolist(), curve.events, curve.censored
    ([1.0, 0.5, 0.5], 1, 1)
    """
    outcomes = list(zip(cell.onset_steps, cell.diverged, strict=True))
    onsets = [step for step, bad in outcomes if bad and step is not None]
    censored = [last for last, bad in zip(cell.last_steps, cell.diverged, strict=True) if not bad]
    start = np.zeros(1)
    if not onsets:  # nothing happened: the estimate stays at 1, and scipy's band is undefined
        end = max(censored, default=0)
        return SurvivalCurve(np.array([0.0, end]), np.ones(2), np.ones(2), np.ones(2), 0, len(censored))
    data = stats.CensoredData(uncensored=onsets, right=censored)
    sf = stats.ecdf(data).sf
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        band = sf.confidence_interval(confidence_level=1 - ALPHA)
    low = np.nan_to_num(band.low.probabilities, nan=0.0)
    high = np.nan_to_num(band.high.probabilities, nan=1.0)
    return SurvivalCurve(
        np.concatenate([start, sf.quantiles]),
        np.concatenate([[1.0], sf.probabilities]),
        np.concatenate([[1.0], low]),
        np.concatenate([[1.0], high]),
        len(onsets),
        len(censored),
    )


# --- the summary's objects: exact keys, so that people's scripts can rely on them -------------------


def cell_summary(cell: CellResult) -> dict[str, Any]:
    """One cell as `summary.json` writes it."""
    return {
        "settings": dict(cell.settings),
        "seeds": list(cell.seeds),
        "runs": cell.runs,
        "diverged": cell.n_diverged,
        "diverged_ci95": list(wilson_ci95(cell.n_diverged, cell.runs)),
        "onset_steps": list(cell.onset_steps),
        "best_bpd": list(cell.best_bpd),
    }


def one_axis_pairs(cells: Sequence[CellResult]) -> list[tuple[str, CellResult, CellResult]]:
    """(axis, from, to) for every two cells whose settings differ in exactly one axis; `from` is the one
    whose value of that axis comes first in the cells' order (the grid's order: M 1 before M 256)."""
    order: dict[str, list[Any]] = {}
    for cell in cells:
        for axis, value in cell.settings.items():
            if value not in order.setdefault(axis, []):
                order[axis].append(value)
    pairs = []
    for i, a in enumerate(cells):
        for b in cells[i + 1 :]:
            if a.settings.keys() != b.settings.keys():
                continue
            differ = [axis for axis in a.settings if a.settings[axis] != b.settings[axis]]
            if len(differ) == 1:
                axis = differ[0]
                first, second = sorted((a, b), key=lambda c: order[axis].index(c.settings[axis]))
                pairs.append((axis, first, second))
    return pairs


def _paired_by_seed(a: CellResult, b: CellResult) -> tuple[list[float | None], list[float | None]]:
    common = [seed for seed in a.seeds if seed in b.seeds]
    return [a.best_bpd[a.seeds.index(s)] for s in common], [b.best_bpd[b.seeds.index(s)] for s in common]


def compare(axis: str, a: CellResult, b: CellResult) -> list[dict[str, Any]]:
    """The two comparisons of one pair: divergence (Fisher) and best bpd (paired bootstrap)."""
    head = {
        "axis": axis,
        "from": a.settings[axis],
        "to": b.settings[axis],
        "where": {k: v for k, v in a.settings.items() if k != axis},
    }
    from_counts, to_counts = (a.n_diverged, a.runs), (b.n_diverged, b.runs)
    p_value = fisher_p(from_counts, to_counts)
    diverged = head | {
        "metric": "diverged",
        "verdict": divergence_verdict(from_counts, to_counts, p_value),
        "from_counts": list(from_counts),
        "to_counts": list(to_counts),
        "p_value": p_value,
    }
    paired = paired_difference(*_paired_by_seed(a, b))
    bpd = head | {
        "metric": "best_bpd",
        "verdict": paired.verdict,
        "n": paired.n,
        "difference": paired.difference,
        "ci95": None if paired.ci95 is None else list(paired.ci95),
    }
    return [diverged, bpd]


def comparisons(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    """Every pair of cells that differ in exactly one swept axis, on both metrics."""
    return [entry for axis, a, b in one_axis_pairs(cells) for entry in compare(axis, a, b)]


MIN_RUNS_PER_CELL = 2  # below this on average, a forest fitted to the cells says nothing about the axes


def swept_axes(cells: Sequence[CellResult]) -> list[str]:
    """The settings that take more than one value across the cells, in the cells' order."""
    axes = list(cells[0].settings) if cells else []
    return [axis for axis in axes if len({repr(c.settings.get(axis)) for c in cells}) > 1]


def importance(cells: Sequence[CellResult]) -> dict[str, Any]:
    """Optuna's parameter importance (fANOVA, seeded) of the swept axes for best bpd and for divergence,
    or a note saying why there is none. The cells' runs are given to an in-memory study as trials."""
    axes = swept_axes(cells)
    runs = sum(cell.runs for cell in cells)
    if len(axes) == 1:  # normalized importances sum to 1: a lone axis gets 1 whatever the data say
        return {
            "note": f"one swept axis ({axes[0]}): its importance is 1 by construction; the comparisons "
            "say whether it matters"
        }
    if not axes or runs < MIN_RUNS_PER_CELL * len(cells):
        return {
            "note": f"not enough trials: {runs} runs over {len(cells)} cell(s) and {len(axes)} swept "
            f"axis/axes; importance needs at least one swept axis and {MIN_RUNS_PER_CELL} runs per cell"
        }
    result: dict[str, Any] = {}
    for metric in ("best_bpd", "diverged"):
        result[metric] = _importance_of(cells, axes, metric)
    return result


def _importance_of(cells: Sequence[CellResult], axes: list[str], metric: str) -> dict[str, float] | str:
    import optuna  # only here: the report reads run files, not studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    choices = {axis: list(dict.fromkeys(c.settings[axis] for c in cells)) for axis in axes}
    distributions = {
        axis: optuna.distributions.CategoricalDistribution(values) for axis, values in choices.items()
    }
    study = optuna.create_study()
    for cell in cells:
        values = cell.best_bpd if metric == "best_bpd" else [float(d) for d in cell.diverged]
        for value in values:
            if value is not None:
                params = {axis: cell.settings[axis] for axis in axes}
                study.add_trial(
                    optuna.trial.create_trial(params=params, distributions=distributions, value=value)
                )
    finite = [t.value for t in study.trials if t.value is not None and math.isfinite(t.value)]
    if len(finite) < MIN_RUNS_PER_CELL * len(cells) or len(set(finite)) < 2:
        return f"cannot tell: {len(finite)} run(s) with a value, {len(set(finite))} distinct"
    varying = [axis for axis in axes if len({repr(t.params[axis]) for t in study.trials}) > 1]
    if len(varying) < 2:  # e.g. every M = 1 run diverged: only λ varies among the best bpds, and gets 1
        return f"cannot tell: among the runs with a value only {', '.join(varying) or 'no axis'} varies"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True)
    return {axis: float(found.get(axis, 0.0)) for axis in axes}
