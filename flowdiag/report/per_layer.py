"""Data for the per-layer figures: coupling peaks at one step (paper Fig. 5) and layer × step maps.

Pure. Non-finite values are kept as they are: an inf or NaN output is the finding, not noise.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowdiag.record.store import RunRecord
from flowdiag.report.runs import has_layer_records, is_diverged, onset_step, row_at_step, run_settings


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
    has_row: bool  # False: the run never recorded the step (it diverged or stopped before it)
    shown_step: int  # the step plotted: `step`, or the run's last one when it ended before (0: none)
    last_step: int  # the run's last recorded step, to say why a row is missing (0: none)
    recorded: bool  # False: diagnostics were off, the columns hold no measurements


class CouplingPeaks(NamedTuple):
    step: int
    lines: list[CouplingPeakLine]


def coupling_peak_line(run: RunRecord, label: str, step: int) -> CouplingPeakLine:
    couplings = run.layer_index("coupling")
    row = row_at_step(run, step)
    shown_step = step if row is not None else 0
    if row is None and len(run.step) and int(run.step[-1]) < step:
        # A run that overflowed before `step` is the interesting one: show its last row instead.
        row, shown_step = len(run.step) - 1, int(run.step[-1])
    if row is None:
        values = np.full(len(couplings), np.nan)
        flags = np.zeros(len(couplings), dtype=bool)
    else:
        values = log10_abs(run.max_abs[row, couplings])
        flags = np.asarray(run.nonfinite[row, couplings], dtype=bool)
    return CouplingPeakLine(
        label=label,
        group=run_settings(run).cell.label(),
        layer_names=[run.layer_names[i] for i in couplings],
        log10_max_abs=values,
        nonfinite=flags,
        has_row=shown_step == step,
        shown_step=shown_step,
        last_step=int(run.step[-1]) if len(run.step) else 0,
        recorded=has_layer_records(run),
    )


def coupling_peaks(runs: list[RunRecord], labels: list[str], step: int = 2) -> CouplingPeaks:
    return CouplingPeaks(
        step, [coupling_peak_line(r, lab, step) for r, lab in zip(runs, labels, strict=True)]
    )


class LayerHeatmap(NamedTuple):
    label: str
    steps: np.ndarray  # (T,)
    layer_names: list[str]  # (N,) forward order
    layer_kinds: list[str]
    log10_max_abs: np.ndarray  # (N, T): layers on rows, as drawn
    logdet_signed_log10: np.ndarray  # (N, T): signed_log10(layers/logdet)
    nonfinite: np.ndarray  # (N, T) bool
    onset_step: int  # -1: none


def layer_heatmap(run: RunRecord, label: str) -> LayerHeatmap:
    return LayerHeatmap(
        label=label,
        steps=np.asarray(run.step),
        layer_names=list(run.layer_names),
        layer_kinds=list(run.layer_kinds),
        log10_max_abs=log10_abs(run.max_abs).T,
        logdet_signed_log10=signed_log10(run.logdet).T,
        nonfinite=np.asarray(run.nonfinite, dtype=bool).T,
        onset_step=run.nan_onset_step,
    )


def select_heatmap_runs(runs: list[RunRecord], cap: int = 12) -> list[int]:
    """Diverged runs first (earliest onset first), then the rest in order; runs without records skipped."""
    recorded = [i for i, r in enumerate(runs) if has_layer_records(r) and len(r.step)]
    diverged = sorted((i for i in recorded if is_diverged(runs[i])), key=lambda i: onset_step(runs[i]))
    others = [i for i in recorded if not is_diverged(runs[i])]
    return (diverged + others)[:cap]
