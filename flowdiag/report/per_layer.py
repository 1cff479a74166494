"""Data for the per-layer figures: coupling peaks at one step (paper Fig. 5) and layer × step maps.

Pure. Non-finite values are kept as they are: an inf or NaN output is the finding, not noise. A layer
that did not run in a step (`ran` False) is a gap, never a non-finite value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowdiag.report.digest import RunDigest
from flowdiag.report.runs import is_diverged, onset_step, run_settings


def log10_abs(values: np.ndarray) -> np.ndarray:
    """log10 with inf -> inf, NaN -> NaN and 0 -> -inf, without numpy's warnings."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(np.asarray(values, dtype=np.float64))


def signed_log10(values: np.ndarray) -> np.ndarray:
    """sign(x)·log10(1 + |x|): log-dets span both signs and many decades."""
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sign(x) * np.log10(1.0 + np.abs(x))


class CouplingPeakLine(NamedTuple):
    label: str
    group: str
    layer_names: list[str]  # the couplings, forward order: layer 1 is nearest the input
    log10_max_abs: np.ndarray  # (K,) at the chosen step; inf / NaN kept; all NaN without a row
    nonfinite: np.ndarray  # (K,) the layers/nonfinite flags at that step
    ran: np.ndarray  # (K,) False: the coupling did not run in that step (a gap, not a blow-up)
    has_row: bool  # False: the run never recorded the step (it diverged or stopped before it)
    shown_step: int  # the step plotted: `step`, or the run's last one when it ended before (0: none)
    last_step: int  # the run's last recorded step, to say why a row is missing (0: none)
    recorded: bool  # False: diagnostics were off, the columns hold no measurements


class CouplingPeaks(NamedTuple):
    step: int
    lines: list[CouplingPeakLine]


def coupling_peak_line(run: RunDigest, label: str) -> CouplingPeakLine:
    """The couplings' max |output| at the digest's Fig. 5 step (or the last row of a run that ended
    before it), from that row whole."""
    couplings = run.head.layer_index("coupling")
    row = run.fig5_row
    if row is None:
        values = np.full(len(couplings), np.nan)
        flags = np.zeros(len(couplings), dtype=bool)
        ran = np.ones(len(couplings), dtype=bool)
    else:
        values = log10_abs(row.max_abs[couplings])
        flags = np.asarray(row.nonfinite[couplings], dtype=bool)
        ran = np.asarray(row.ran[couplings], dtype=bool)
    shown_step = row.step if row is not None else 0
    return CouplingPeakLine(
        label=label,
        group=run_settings(run.head).cell.label(),
        layer_names=[run.head.layer_names[i] for i in couplings],
        log10_max_abs=values,
        nonfinite=flags,
        ran=ran,
        has_row=shown_step == run.fig5_step,
        shown_step=shown_step,
        last_step=run.head.last_step,
        recorded=run.recorded,
    )


def coupling_peaks(runs: list[RunDigest], labels: list[str]) -> CouplingPeaks:
    step = runs[0].fig5_step if runs else 2
    return CouplingPeaks(step, [coupling_peak_line(r, lab) for r, lab in zip(runs, labels, strict=True)])


class LayerHeatmap(NamedTuple):
    label: str
    first_step: np.ndarray  # (B,) each column's first step (a column pools consecutive steps)
    last_step: np.ndarray  # (B,)
    layer_names: list[str]  # (N,) forward order
    layer_kinds: list[str]
    log10_max_abs: np.ndarray  # (N, B): layers on rows, as drawn; the column's largest finite value
    logdet_signed_log10: np.ndarray  # (N, B): signed_log10 of the column's log-det farthest from 0
    nonfinite: np.ndarray  # (N, B) bool: some step of the column flagged the layer
    ran: np.ndarray  # (N, B) bool: False where the layer ran in no step of the column (a gap)
    onset_step: int  # -1: none


def layer_heatmap(run: RunDigest, label: str) -> LayerHeatmap:
    if run.layers is None:
        raise ValueError(f"the digest of {run.head.path} no longer holds its layer map")
    pooled = run.layers
    return LayerHeatmap(
        label=label,
        first_step=pooled.first_step,
        last_step=pooled.last_step,
        layer_names=list(run.head.layer_names),
        layer_kinds=list(run.head.layer_kinds),
        log10_max_abs=log10_abs(pooled.max_abs).T,
        logdet_signed_log10=signed_log10(pooled.logdet).T,
        nonfinite=pooled.nonfinite.T,
        ran=pooled.ran.T,
        onset_step=run.head.nan_onset_step,
    )


def heatmap_rank(run: RunDigest, index: int) -> tuple[int, int, int] | None:
    """Where a run stands for a layer map: diverged first (earliest onset first), then the rest in
    order; None for a run without per-layer records (nothing to draw)."""
    if not run.recorded or not run.head.n_rows:
        return None
    if is_diverged(run.head):
        return 0, onset_step(run.head), index
    return 1, 0, index


def select_heatmap_runs(runs: list[RunDigest], cap: int = 12) -> list[int]:
    """The runs that get a layer map, best first (`heatmap_rank`), at most `cap`."""
    ranked = [(rank, i) for i, run in enumerate(runs) if (rank := heatmap_rank(run, i)) is not None]
    return [i for _, i in sorted(ranked)[:cap]]
