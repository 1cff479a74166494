"""Data for the ablation views: per M × λ × batch-size cell, and λ against bpd for a λ sweep. Pure."""

from __future__ import annotations

import copy
import json
import math
from typing import Any, NamedTuple

import numpy as np

from flowdiag.report.digest import RunDigest
from flowdiag.report.runs import CellKey, best_eval_bpd, is_diverged, run_settings
from flowdiag.settings.config import placement_fields

# Two runs that differ only in where or how they were done (the placement settings), in λ and in
# seed still form a λ sweep. Seeds may differ so that a sweep repeated over seeds shows its spread.
_SWEPT = {("train", "lam"), ("train", "seed")}


class GridCell(NamedTuple):
    key: CellKey
    n_runs: int
    n_diverged: int
    divergence_rate: float  # n_diverged / n_runs
    # Best held-out bpd over the cell's runs that did not diverge (a diverged run's early evaluations
    # are not its result); NaN when every run diverged or none was evaluated.
    best_bpd: float
    mean_best_bpd: float  # mean over those runs of their best held-out bpd; NaN likewise


def grid_cells(runs: list[RunDigest]) -> list[GridCell]:
    """One entry per distinct (M, λ, batch size), sorted by batch size, then M, then λ (settings not
    given last, as a cell of their own)."""
    members: dict[CellKey, list[RunDigest]] = {}
    for run in runs:
        members.setdefault(run_settings(run.head).cell, []).append(run)
    cells = []
    for key, group in members.items():
        n_diverged = sum(is_diverged(r.head) for r in group)
        bests = np.array(
            [best_eval_bpd(r.eval_bpd) for r in group if not is_diverged(r.head)], dtype=np.float64
        )
        bests = bests[np.isfinite(bests)]
        cells.append(
            GridCell(
                key=key,
                n_runs=len(group),
                n_diverged=n_diverged,
                divergence_rate=n_diverged / len(group),
                best_bpd=float(bests.min()) if bests.size else math.nan,
                mean_best_bpd=float(bests.mean()) if bests.size else math.nan,
            )
        )
    return sorted(cells, key=lambda c: c.key.order())


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
    """λ against best held-out bpd, λ ascending; empty unless the runs form a λ sweep."""
    if not is_lambda_sweep(runs):
        return []
    points = [
        LambdaPoint(
            float(run_settings(r.head).lam or 0.0), best_eval_bpd(r.eval_bpd), is_diverged(r.head), label
        )
        for r, label in zip(runs, labels, strict=True)
    ]
    return sorted(points, key=lambda p: p.lam)
