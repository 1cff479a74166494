"""Data for the figures over training steps: bpd (paper Fig. 4) and the log-det penalty.

Pure: each function takes run digests and returns their decimated curves (`decimate`: every spike and
first non-finite value kept at its step), nothing drawn. Fig. 4's smoothed curves are for the eye only:
where a run diverged, and every number a caption or table prints, come from the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from flowdiag.report.decimate import Series
from flowdiag.report.digest import RunDigest
from flowdiag.report.layer_naming import head_layer_labels
from flowdiag.report.outcome import RunEnd, end_with_place, run_end
from flowdiag.report.runs import onset_step, run_settings

# A y range wider than this factor reads better on a log axis: a diverging run's bpd climbs by
# orders of magnitude before it turns NaN and would flatten every healthy curve to a line.
LOG_RANGE_FACTOR = 50.0
# Fig. 4's smoothing window, as a fraction of the longest run's steps: at batch 1 a step's bpd
# swings by ±0.4 bits/dim (the main job), which hides the 0.1 to 0.2 bits/dim between its runs; a
# mean of 10 % of the run (20 steps of 200) shows them and keeps a trend over a fifth of the run.
SMOOTH_FRACTION = 0.1
# Past this many marks a lane lists its first steps and a count.
_LISTED_STEPS = 5


class BpdCurve(NamedTuple):
    """One run's line in Fig. 4, and how the run ended."""

    label: str  # the run
    group: str  # its M × λ × batch-size cell: runs of one cell share a colour
    steps: np.ndarray
    bpd: np.ndarray  # training bpd, decimated, non-finite values kept
    smoothed: np.ndarray  # `trailing_mean` of `bpd`, for the eye only; NaN where bpd is not finite
    end: RunEnd  # how the run ended: only a completed run's bpd is a result
    end_text: str  # "diverged at step 7 in the loss", "interrupted at step 197 of 1500"
    diverged: bool
    onset_step: int  # -1: no onset
    onset_bpd: float  # bpd at the onset, else the last finite one before it (every row); NaN if none


class BpdFigureData(NamedTuple):
    """Paper Fig. 4's data: every run's curve, the axis and the smoothing window."""

    curves: list[BpdCurve]
    log_y: bool
    # The y range the finite runs need: a diverged run's climb to 1e25 would flatten every healthy
    # curve to one line. Diverged runs are drawn clipped; each has its own lane above the axes.
    y_range: tuple[float, float] | None
    window: int  # the smoothing window, in steps (1: not smoothed)


def use_log_scale(values: np.ndarray, factor: float = LOG_RANGE_FACTOR) -> bool:
    """Whether the finite positive values span more than `factor` (a log axis reads them better)."""
    finite = values[np.isfinite(values)]
    if not finite.size or finite.min() <= 0:
        return False
    return bool(finite.max() / finite.min() > factor)


def trailing_mean(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """Per point, the mean of the finite values at steps in (step - window, step]: each smoothed value
    uses only what had happened by its own step, so a spike or a climb never shows before it happened,
    and where a run diverged stays where it was. NaN where the value itself is not finite (the curve
    breaks there, as the raw one does)."""
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if not len(steps) or window <= 1:
        return np.where(np.isfinite(values), values, np.nan)
    start = np.searchsorted(steps, steps - window, side="right")
    count = np.arange(len(steps)) - start + 1  # points in each window, the point itself included
    # Exact means (no running sums: a 1e24 step would swallow the steps after it); a window holds a
    # few dozen points, as the curves are decimated to at most 1,500.
    offsets = np.arange(int(count.max()))
    rows = np.minimum(start[:, None] + offsets[None, :], len(steps) - 1)
    inside = offsets[None, :] < count[:, None]
    window_values = values[rows]
    usable = inside & np.isfinite(window_values)
    total = np.where(usable, window_values, 0.0).sum(axis=1)
    mean = total / np.maximum(usable.sum(axis=1), 1)
    return np.where(np.isfinite(values), mean, np.nan)


def smoothing_window(runs: Sequence[RunDigest]) -> int:
    """The trailing window for every curve of a figure, in steps: `SMOOTH_FRACTION` of the longest run."""
    longest = max((run.head.last_step for run in runs), default=0)
    return max(1, math.ceil(SMOOTH_FRACTION * longest))


def bpd_curve(run: RunDigest, label: str, window: int = 1) -> BpdCurve:
    """A run's decimated training bpd, smoothed over `window` steps, and where it ended."""
    end = run_end(run.head)
    diverged = end.kind == "diverged"
    return BpdCurve(
        label=label,
        group=run_settings(run.head).cell.label(),
        steps=run.bpd.steps,
        bpd=run.bpd.values,
        smoothed=trailing_mean(run.bpd.steps, run.bpd.values, window),
        end=end,
        end_text=end_with_place(run.head),
        diverged=diverged,
        onset_step=onset_step(run.head) if diverged else -1,
        onset_bpd=run.onset_bpd if diverged else math.nan,
    )


def bpd_curves(runs: list[RunDigest], labels: list[str]) -> BpdFigureData:
    """Fig. 4's curves, one smoothing window for all, and the y range the runs with a result need."""
    window = smoothing_window(runs)
    curves = [bpd_curve(run, label, window) for run, label in zip(runs, labels, strict=True)]
    # The envelope keeps each bucket's smallest and largest value: the range is the full data's.
    healthy = [c.bpd for c in curves if not c.diverged] or [c.bpd for c in curves]
    values = np.concatenate(healthy) if healthy else np.array([])
    finite = values[np.isfinite(values)]
    log_y = use_log_scale(finite)
    if not finite.size:
        return BpdFigureData(curves, log_y, None, window)
    low, high = float(finite.min()), float(finite.max())
    if log_y:
        return BpdFigureData(curves, log_y, (low / 1.1, high * 1.1), window)
    pad = max(0.05 * (high - low), 0.05)
    return BpdFigureData(curves, log_y, (low - pad, high + pad), window)


class EndLane(NamedTuple):
    """One row above Fig. 4 for runs that ended without a result: an X at each diverged run's onset,
    a bar where an interrupted or failed run stopped, and the text beside them."""

    key: str  # the legend key the marks are coloured by: the run, or its cell past MAX_RUN_LEGEND runs
    kind: str  # diverged | interrupted | failed
    steps: tuple[int, ...]  # where each run of the lane ended, ascending
    text: str


def _lane_text(key: str, kind: str, members: list[BpdCurve], of: int) -> str:
    if len(members) == 1 and members[0].label == key:
        return f"{key}: {members[0].end_text}"
    steps = sorted(c.end.step for c in members)
    listed = ", ".join(str(s) for s in steps[:_LISTED_STEPS]) + (", …" if len(steps) > _LISTED_STEPS else "")
    return f"{key}: {len(members)} of {of} runs {kind} (step{'s' * (len(steps) > 1)} {listed})"


def end_lanes(curves: Sequence[BpdCurve], keys: Sequence[str]) -> list[EndLane]:
    """A lane per run (or per cell, when runs are coloured by cell) and way of ending without a result,
    in the order of the curves: no run's mark can hide under another's."""
    groups: dict[tuple[str, str], list[BpdCurve]] = {}
    sizes: dict[str, int] = {}
    for curve, key in zip(curves, keys, strict=True):
        sizes[key] = sizes.get(key, 0) + 1
        if curve.end.kind in ("diverged", "interrupted", "failed"):
            groups.setdefault((key, curve.end.kind), []).append(curve)
    return [
        EndLane(
            key, kind, tuple(sorted(c.end.step for c in members)), _lane_text(key, kind, members, sizes[key])
        )
        for (key, kind), members in groups.items()
    ]


class PenaltyCurves(NamedTuple):
    """What λ acts on, for one run: the penalty and each 1x1 conv's h·w·Σlog|u| over steps."""

    label: str
    lam: float | None  # None: not given
    penalty: Series  # Σ over convs of (h·w·Σlog|u|)², before λ
    conv_names: list[str]
    conv_logdet: tuple[Series, ...]  # the layers/logdet columns of the invconvs, forward order


def penalty_curves(run: RunDigest, label: str) -> PenaltyCurves:
    """What λ acts on in one run: its penalty and each 1x1 conv's log-det over steps."""
    convs = run.head.layer_index("invconv")
    return PenaltyCurves(
        label=label,
        lam=run_settings(run.head).lam,
        penalty=run.penalty,
        conv_names=[head_layer_labels(run.head)[i] for i in convs],
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
