"""Data for the ablation views: per M × λ × batch-size cell, and λ against bpd for a λ sweep. Pure."""

from __future__ import annotations

import copy
import json
import math
from typing import Any, NamedTuple

import numpy as np

from flowdiag.record.store import RunRecord
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


def grid_cells(runs: list[RunRecord]) -> list[GridCell]:
    """One entry per distinct (M, λ, batch size), sorted by batch size, then M, then λ."""
    members: dict[CellKey, list[RunRecord]] = {}
    for run in runs:
        members.setdefault(run_settings(run).cell, []).append(run)
    cells = []
    for key, group in members.items():
        n_diverged = sum(is_diverged(r) for r in group)
        bests = np.array([best_eval_bpd(r) for r in group if not is_diverged(r)], dtype=np.float64)
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
    return sorted(cells, key=lambda c: (c.key.batch_size, c.key.init_batches, c.key.lam))


def is_grid(cells: list[GridCell]) -> bool:
    return len(cells) > 1


class LambdaPoint(NamedTuple):
    lam: float
    best_bpd: float  # min of eval/bpd; NaN if none
    diverged: bool
    label: str


def _experiment(config: dict[str, Any]) -> str:
    stripped = copy.deepcopy(config)
    for section, key in placement_fields() | _SWEPT:
        stripped.get(section, {}).pop(key, None)
    return json.dumps(stripped, sort_keys=True)


def is_lambda_sweep(runs: list[RunRecord]) -> bool:
    """True when the runs share everything but λ (and seed), with at least two distinct λ."""
    lams = {run_settings(r).lam for r in runs}
    return len(lams) > 1 and len({_experiment(r.config) for r in runs}) == 1


def lambda_points(runs: list[RunRecord], labels: list[str]) -> list[LambdaPoint]:
    """λ against best held-out bpd, λ ascending; empty unless the runs form a λ sweep."""
    if not is_lambda_sweep(runs):
        return []
    points = [
        LambdaPoint(run_settings(r).lam, best_eval_bpd(r), is_diverged(r), label)
        for r, label in zip(runs, labels, strict=True)
    ]
    return sorted(points, key=lambda p: p.lam)
