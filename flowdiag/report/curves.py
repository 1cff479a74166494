"""Data for the figures over training steps: bpd (paper Fig. 4) and the log-det penalty.

Pure: each function takes run digests and returns their decimated curves (`decimate`: every spike and
first non-finite value kept at its step), nothing drawn.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from flowdiag.report.decimate import Series
from flowdiag.report.digest import RunDigest
from flowdiag.report.runs import is_diverged, onset_step, run_settings

# A y range wider than this factor reads better on a log axis: a diverging run's bpd climbs by
# orders of magnitude before it turns NaN and would flatten every healthy curve to a line.
LOG_RANGE_FACTOR = 50.0


class BpdCurve(NamedTuple):
    label: str  # the run
    group: str  # its M × λ × batch-size cell: runs of one cell share a colour
    steps: np.ndarray
    bpd: np.ndarray  # training bpd, decimated, non-finite values kept
    diverged: bool
    onset_step: int  # -1: no onset
    onset_bpd: float  # bpd at the onset, else the last finite one before it (every row); NaN if none


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


def bpd_curve(run: RunDigest, label: str) -> BpdCurve:
    diverged = is_diverged(run.head)
    return BpdCurve(
        label=label,
        group=run_settings(run.head).cell.label(),
        steps=run.bpd.steps,
        bpd=run.bpd.values,
        diverged=diverged,
        onset_step=onset_step(run.head) if diverged else -1,
        onset_bpd=run.onset_bpd if diverged else math.nan,
    )


def bpd_curves(runs: list[RunDigest], labels: list[str]) -> BpdFigureData:
    curves = [bpd_curve(run, label) for run, label in zip(runs, labels, strict=True)]
    # The envelope keeps each bucket's smallest and largest value: the range is the full data's.
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
    lam: float | None  # None: not given
    penalty: Series  # Σ over convs of (h·w·Σlog|u|)², before λ
    conv_names: list[str]
    conv_logdet: tuple[Series, ...]  # the layers/logdet columns of the invconvs, forward order


def penalty_curves(run: RunDigest, label: str) -> PenaltyCurves:
    convs = run.head.layer_index("invconv")
    return PenaltyCurves(
        label=label,
        lam=run_settings(run.head).lam,
        penalty=run.penalty,
        conv_names=[run.head.layer_names[i] for i in convs],
        conv_logdet=run.conv_logdet,
    )


def select_penalty_runs(runs: list[RunDigest]) -> tuple[list[int], list[int]]:
    """(every run with a curve to draw, λ ascending then M, seed; the runs that ended at step 1).

    A run that stopped at its first step has one point and no drift: it gets a line in the text,
    not two empty panels. Settings not given sort last.
    """

    def order(i: int) -> tuple[tuple[bool, float], ...]:
        s = run_settings(runs[i].head)
        return tuple((v is None, v or 0) for v in (s.lam, s.init_batches, s.seed))

    ordered = sorted(range(len(runs)), key=order)
    drawn = [i for i in ordered if runs[i].head.n_rows >= 2]
    return drawn, [i for i in ordered if runs[i].head.n_rows < 2]
