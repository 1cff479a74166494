"""Data for the ablation views: per M × λ × batch-size cell, and λ against bpd for a λ sweep. Pure."""

from __future__ import annotations

import copy
import json
import math
from typing import Any, NamedTuple

import numpy as np

from flowdiag.report.digest import RunDigest
from flowdiag.report.runs import CellKey, best_eval_bpd, is_diverged, run_settings
from flowdiag.report.study_stats import StudyCell, interval_of, is_counted, study_cells
from flowdiag.report.wording import fmt_bpd
from flowdiag.settings.config import placement_fields

# Two runs that differ only in where or how they were done (the placement settings), in λ and in
# seed still form a λ sweep. Seeds may differ so that a sweep repeated over seeds shows its spread.
_SWEPT = {("train", "lam"), ("train", "seed")}


class GridCell(NamedTuple):
    key: CellKey
    n_runs: int  # the runs counted: completed or diverged (`study_stats.is_counted`)
    n_diverged: int
    divergence_rate: float  # n_diverged / n_runs
    ci95: tuple[float, float]  # Wilson 95 % interval of that rate
    # Best held-out bpd over the cell's runs that did not diverge (a diverged run's early evaluations
    # are not its result); NaN when every run diverged or none was evaluated.
    best_bpd: float
    mean_best_bpd: float  # mean over those runs of their best held-out bpd; NaN likewise

    def bpd_text(self, value: float) -> str:
        """`best_bpd` or `mean_best_bpd` in a table: four decimals, or why there is none.

        >>> cell = GridCell(CellKey(1, 0.001, 1), 6, 6, 1.0, (0.61, 1.0), math.nan, math.nan)
        >>> cell.bpd_text(cell.best_bpd), cell._replace(n_diverged=0).bpd_text(math.nan)
        ('all diverged', 'not evaluated')
        """
        if math.isfinite(value):
            return fmt_bpd(value)
        return "all diverged" if self.n_diverged == self.n_runs else "not evaluated"


def grid_cell(cell: StudyCell) -> GridCell:
    """A cell's line in the grid: its counts, interval and best bpd."""
    result = cell.result
    bests = np.array([b for b in result.best_bpd if b is not None], dtype=np.float64)
    return GridCell(
        key=cell.key,
        n_runs=result.runs,
        n_diverged=result.n_diverged,
        divergence_rate=result.n_diverged / result.runs,
        ci95=interval_of(result),
        best_bpd=float(bests.min()) if bests.size else math.nan,
        mean_best_bpd=float(bests.mean()) if bests.size else math.nan,
    )


def grid_cells(runs: list[RunDigest]) -> list[GridCell]:
    """One entry per distinct (M, λ, batch size) of the counted runs, sorted by batch size, then M, then
    λ (settings not given last, as a cell of their own). An interrupted run is no outcome: left out."""
    return [grid_cell(cell) for cell in study_cells(runs)]


def is_grid(cells: list[GridCell]) -> bool:
    return len(cells) > 1


class LambdaPoint(NamedTuple):
    lam: float  # a sweep has λ given in every run
    best_bpd: float  # min of eval/bpd; NaN if none
    diverged: bool
    label: str


def _experiment(config: dict[str, Any]) -> str:
    stripped = copy.deepcopy(config)
    for section, key in placement_fields() | _SWEPT:
        stripped.get(section, {}).pop(key, None)
    return json.dumps(stripped, sort_keys=True)


def is_lambda_sweep(runs: list[RunDigest]) -> bool:
    """True when the runs share everything but λ (and seed), with at least two distinct λ, each given."""
    lams = {run_settings(r.head).lam for r in runs}
    return len(lams) > 1 and None not in lams and len({_experiment(r.head.config) for r in runs}) == 1


def lambda_points(runs: list[RunDigest], labels: list[str]) -> list[LambdaPoint]:
    """λ against best held-out bpd, one point per counted run, λ ascending; empty unless the counted
    runs form a λ sweep. An interrupted run is no outcome: left out, as from the cells."""
    kept = [(r, label) for r, label in zip(runs, labels, strict=True) if is_counted(r)]
    if not is_lambda_sweep([r for r, _ in kept]):
        return []
    points = [
        LambdaPoint(
            float(run_settings(r.head).lam or 0.0), best_eval_bpd(r.eval_bpd), is_diverged(r.head), label
        )
        for r, label in kept
    ]
    return sorted(points, key=lambda p: p.lam)


def lambda_means(points: list[LambdaPoint]) -> list[tuple[float, float]]:
    """(λ, mean best held-out bpd over its runs that did not diverge), for each λ with such a run.

    >>> lambda_means([LambdaPoint(0.0, 5.0, False, "a"), LambdaPoint(0.0, 6.0, False, "b")])
    [(0.0, 5.5)]
    """
    by_lam: dict[float, list[float]] = {}
    for p in points:
        if not p.diverged and math.isfinite(p.best_bpd):
            by_lam.setdefault(p.lam, []).append(p.best_bpd)
    return [(lam, float(np.mean(values))) for lam, values in sorted(by_lam.items())]
