"""The runs of a report as an ablation's cells (`statistics.CellResult`), and `summary.json` / `summary.csv`.

Only a run with an outcome counts: one that completed, or one that diverged (diverging is its outcome).
An interrupted, failed or still running run is neither, so it is left out of every cell and named
instead (`not_counted`). Pure apart from `write_summary`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Any, NamedTuple

import numpy as np

from flowdiag.report.digest import RunDigest
from flowdiag.report.outcome import run_end
from flowdiag.report.runs import CellKey, best_eval_bpd, is_diverged, onset_step, run_settings
from flowdiag.report.statistics import CellResult, cell_summary, comparisons, importance, wilson_ci95

SUMMARY_JSON, SUMMARY_CSV = "summary.json", "summary.csv"
COUNTED_ENDS = ("completed", "diverged")  # the ends that are an outcome of the settings


class StudyCell(NamedTuple):
    """One cell: its key in the M × λ × batch-size grid and its counted runs, seed by seed."""

    key: CellKey
    result: CellResult  # settings: all three axes (`swept_cells` keeps those that vary)


def is_counted(run: RunDigest) -> bool:
    """Whether the run is an outcome of its settings: it completed, or it diverged."""
    return run_end(run.head).kind in COUNTED_ENDS


def not_counted(runs: list[RunDigest], labels: list[str]) -> list[str]:
    """A line per run left out of the cells, saying why: "… interrupted at step 197 of 1500: not counted"."""
    return [
        f"{label}: {run_end(run.head).text}: not counted"
        for run, label in zip(runs, labels, strict=True)
        if not is_counted(run)
    ]


def _seed_order(pair: tuple[int, RunDigest]) -> tuple[bool, int]:
    seed = run_settings(pair[1].head).seed
    return seed is None, seed if seed is not None else pair[0]


def _cell_result(key: CellKey, runs: list[RunDigest]) -> CellResult:
    # A run whose config gives no seed (a Monitor run) is known by its place in the cell instead.
    ordered = [run for _, run in sorted(enumerate(runs), key=_seed_order)]
    seeds = [run_settings(r.head).seed for r in ordered]
    diverged = [is_diverged(r.head) for r in ordered]
    # A diverged run's early evaluations are not its result: it has no best bpd.
    bests = [math.nan if bad else best_eval_bpd(r.eval_bpd) for r, bad in zip(ordered, diverged, strict=True)]
    return CellResult(
        settings=key._asdict(),
        seeds=tuple(i if s is None else s for i, s in enumerate(seeds)),
        diverged=tuple(diverged),
        onset_steps=tuple(
            onset_step(r.head) if bad else None for r, bad in zip(ordered, diverged, strict=True)
        ),
        last_steps=tuple(r.head.last_step for r in ordered),
        best_bpd=tuple(b if math.isfinite(b) else None for b in bests),
    )


def study_cells(runs: list[RunDigest]) -> list[StudyCell]:
    """The counted runs grouped by (M, λ, batch size), in the grid's order (`CellKey.order`)."""
    members: dict[CellKey, list[RunDigest]] = {}
    for run in runs:
        if is_counted(run):
            members.setdefault(run_settings(run.head).cell, []).append(run)
    cells = [StudyCell(key, _cell_result(key, group)) for key, group in members.items()]
    return sorted(cells, key=lambda c: c.key.order())


def swept_cells(cells: list[StudyCell]) -> list[CellResult]:
    """The cells with only the axes that vary across them as settings; all three when none varies.

    >>> key = CellKey(1, 0.0, 1)
    >>> one = CellResult(key._asdict(), (0,), (False,), (None,), (20,), (5.0,))
    >>> other = dataclasses.replace(one, settings=CellKey(256, 0.0, 1)._asdict())
    >>> [c.settings for c in swept_cells([StudyCell(key, one), StudyCell(key, other)])]
    [{'init_batches': 1}, {'init_batches': 256}]
    """
    axes = [axis for axis in CellKey._fields if len({c.result.settings[axis] for c in cells}) > 1]
    kept = axes or list(CellKey._fields)
    return [
        dataclasses.replace(c.result, settings={axis: c.result.settings[axis] for axis in kept})
        for c in cells
    ]


def interval_of(result: CellResult) -> tuple[float, float]:
    """The Wilson 95 % interval of the cell's divergence rate."""
    return wilson_ci95(result.n_diverged, result.runs)


def _nulled(value: Any) -> Any:
    """The value with every non-finite float as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _nulled(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nulled(item) for item in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value


def study_summary(cells: list[CellResult], left_out: list[str]) -> dict[str, Any]:
    """What `summary.json` holds: the cells, every one-axis comparison, the axes' importance, and the
    runs left out.

    >>> cell = CellResult({"lam": 0.0}, (0,), (True,), (3,), (3,), (None,))
    >>> sorted(study_summary([cell], []))
    ['cells', 'comparisons', 'importance', 'not_counted']
    """
    return _nulled(
        {
            "cells": [cell_summary(c) for c in cells],
            "comparisons": comparisons(cells),
            "importance": importance(cells),
            "not_counted": list(left_out),
        }
    )


def _mean_best(cell: dict[str, Any]) -> float | None:
    values = [v for v in cell["best_bpd"] if v is not None]
    return float(np.mean(values)) if values else None


def summary_csv(summary: dict[str, Any]) -> str:
    """One row per cell: its settings, runs, diverged with the Wilson interval, mean best bpd, seeds.

    >>> cell = CellResult({"lam": 0.0}, (0, 1), (True, False), (3, None), (3, 9), (None, 5.0))
    >>> print(summary_csv(study_summary([cell], [])).strip().splitlines()[1])  # doctest: +ELLIPSIS
    0.0,2,1,0.0945...,0.9054...,5.0,0 1
    """
    cells = summary["cells"]
    axes = list(cells[0]["settings"]) if cells else []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [*axes, "runs", "diverged", "diverged_ci95_low", "diverged_ci95_high", "mean_best_bpd", "seeds"]
    )
    for cell in cells:
        low, high = cell["diverged_ci95"]
        mean = _mean_best(cell)
        seeds = " ".join(str(s) for s in cell["seeds"])
        writer.writerow(
            [*(cell["settings"][a] for a in axes), cell["runs"], cell["diverged"], low, high, mean, seeds]
        )
    return out.getvalue()


def summary_json(summary: dict[str, Any]) -> str:
    """`summary.json`'s text; refuses NaN rather than write JSON that is not JSON."""
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"
