"""Data for the figures over training steps: bpd (paper Fig. 4) and the log-det penalty.

Pure: each function takes run records and returns arrays copied out of them, nothing drawn.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from flowdiag.record.store import RunRecord
from flowdiag.report.runs import is_diverged, onset_step, run_settings

# A y range wider than this factor reads better on a log axis: a diverging run's bpd climbs by
# orders of magnitude before it turns NaN and would flatten every healthy curve to a line.
LOG_RANGE_FACTOR = 50.0


class BpdCurve(NamedTuple):
    label: str  # the run
    group: str  # its M × λ × batch-size cell: runs of one cell share a colour
    steps: np.ndarray
    bpd: np.ndarray  # training bpd, non-finite values kept
    diverged: bool
    onset_step: int  # -1: no onset
    onset_bpd: float  # where to put the X: bpd at the onset, else the last finite one before it; NaN if none


class BpdFigureData(NamedTuple):
    curves: list[BpdCurve]
    log_y: bool
    # The y range the finite runs need: a diverged run's climb to 1e25 would flatten every healthy
    # curve to one line. Diverged runs are drawn clipped, their onset marked on the top edge.
    y_range: tuple[float, float] | None


def use_log_scale(values: np.ndarray, factor: float = LOG_RANGE_FACTOR) -> bool:
    finite = values[np.isfinite(values)]
    if not finite.size or finite.min() <= 0:
        return False
    return bool(finite.max() / finite.min() > factor)


def _onset_bpd(steps: np.ndarray, bpd: np.ndarray, step: int) -> float:
    upto = steps <= step
    finite = np.flatnonzero(upto & np.isfinite(bpd))
    return float(bpd[finite[-1]]) if finite.size else math.nan


def bpd_curve(run: RunRecord, label: str) -> BpdCurve:
    diverged = is_diverged(run)
    onset = onset_step(run) if diverged else -1
    steps, bpd = np.asarray(run.step), np.asarray(run.bpd, dtype=np.float64)
    return BpdCurve(
        label=label,
        group=run_settings(run).cell.label(),
        steps=steps,
        bpd=bpd,
        diverged=diverged,
        onset_step=onset,
        onset_bpd=_onset_bpd(steps, bpd, onset) if onset >= 0 else math.nan,
    )


def bpd_curves(runs: list[RunRecord], labels: list[str]) -> BpdFigureData:
    curves = [bpd_curve(run, label) for run, label in zip(runs, labels, strict=True)]
    healthy = [c.bpd for c in curves if not c.diverged] or [c.bpd for c in curves]
    values = np.concatenate(healthy) if healthy else np.array([])
    finite = values[np.isfinite(values)]
    log_y = use_log_scale(finite)
    if not finite.size:
        return BpdFigureData(curves, log_y, None)
    low, high = float(finite.min()), float(finite.max())
    if log_y:
        return BpdFigureData(curves, log_y, (low / 1.1, high * 1.1))
    pad = max(0.05 * (high - low), 0.05)
    return BpdFigureData(curves, log_y, (low - pad, high + pad))


class PenaltyCurves(NamedTuple):
    """What λ acts on, for one run: the penalty and each 1x1 conv's h·w·Σlog|u| over steps."""

    label: str
    lam: float
    steps: np.ndarray
    penalty: np.ndarray  # Σ over convs of (h·w·Σlog|u|)², before λ
    conv_names: list[str]
    conv_logdet: np.ndarray  # (T, C): the layers/logdet columns of the invconvs, forward order


def penalty_curves(run: RunRecord, label: str) -> PenaltyCurves:
    convs = run.layer_index("invconv")
    return PenaltyCurves(
        label=label,
        lam=run_settings(run).lam,
        steps=np.asarray(run.step),
        penalty=np.asarray(run.penalty, dtype=np.float64),
        conv_names=[run.layer_names[i] for i in convs],
        conv_logdet=np.asarray(run.logdet[:, convs], dtype=np.float64),
    )


def select_penalty_runs(runs: list[RunRecord]) -> tuple[list[int], list[int]]:
    """(every run with a curve to draw, λ ascending then M, seed; the runs that ended at step 1).

    A run that stopped at its first step has one point and no drift: it gets a line in the text,
    not two empty panels.
    """
    order = sorted(
        range(len(runs)),
        key=lambda i: (
            run_settings(runs[i]).lam,
            run_settings(runs[i]).init_batches,
            run_settings(runs[i]).seed,
        ),
    )
    drawn = [i for i in order if len(runs[i].step) >= 2]
    return drawn, [i for i in order if len(runs[i].step) < 2]
