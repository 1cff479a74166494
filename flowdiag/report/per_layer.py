"""Data for the per-layer figures: coupling peaks at one step (paper Fig. 5) and layer × step maps.

Pure. Non-finite values are kept as they are: an inf or NaN output is the finding, not noise. A layer
that did not run in a step (`ran` False) is a gap, never a non-finite value. Every map of a report
shares one colour scale (`output_scale`), so that equal colours mean equal values from map to map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from flowdiag.report.digest import RunDigest
from flowdiag.report.layer_naming import head_layer_labels
from flowdiag.report.outcome import end_with_place
from flowdiag.report.runs import is_diverged, onset_step, run_settings

# A map's colours span at least this many decades of max |output|: healthy layers that wander
# between 1.5 and 6 (log10 0.2 to 0.8) would otherwise fill the whole colour map, and look as hot
# as a run that reached 1e13 looks in its own map.
MIN_DECADES = 3.0
# The log-det maps (sign · log10(1 + |log-det|)) reach at least ±1, a log-det of ±9 nats.
MIN_LOGDET_REACH = 1.0
# What a map's cell shows: a value on the colour scale, a non-finite flag (a colour outside the
# scale), or nothing (the layer did not run, or holds no measurement: a gap).
MEASURED, NONFINITE, GAP = 0, 1, 2


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
    """One run's couplings at the Fig. 5 step."""

    label: str
    group: str
    layer_names: list[str]  # the couplings as the report names them (`layer_naming`), forward order
    log10_max_abs: np.ndarray  # (K,) at the chosen step; inf / NaN kept; all NaN without a row
    nonfinite: np.ndarray  # (K,) the layers/nonfinite flags at that step
    ran: np.ndarray  # (K,) False: the coupling did not run in that step (a gap, not a blow-up)
    has_row: bool  # False: the run never recorded the step (it diverged or stopped before it)
    shown_step: int  # the step plotted: `step`, or the run's last one when it ended before (0: none)
    last_step: int  # the run's last recorded step, to say why a row is missing (0: none)
    recorded: bool  # False: diagnostics were off, the columns hold no measurements


class CouplingPeaks(NamedTuple):
    """Paper Fig. 5's data: every run's couplings at one step."""

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
        layer_names=[head_layer_labels(run.head)[i] for i in couplings],
        log10_max_abs=values,
        nonfinite=flags,
        ran=ran,
        has_row=shown_step == run.fig5_step,
        shown_step=shown_step,
        last_step=run.head.last_step,
        recorded=run.recorded,
    )


def coupling_peaks(runs: list[RunDigest], labels: list[str]) -> CouplingPeaks:
    """Every run's couplings at the digests' Fig. 5 step."""
    step = runs[0].fig5_step if runs else 2
    return CouplingPeaks(step, [coupling_peak_line(r, lab) for r, lab in zip(runs, labels, strict=True)])


class LayerHeatmap(NamedTuple):
    """One run's layer × step map: layers on rows, pooled steps on columns."""

    label: str
    first_step: np.ndarray  # (B,) each column's first step (a column pools consecutive steps)
    last_step: np.ndarray  # (B,)
    layer_names: list[str]  # (N,) forward order, as the report names them (`layer_naming`)
    layer_kinds: list[str]
    log10_max_abs: np.ndarray  # (N, B): layers on rows, as drawn; the column's largest finite value
    logdet_signed_log10: np.ndarray  # (N, B): signed_log10 of the column's log-det farthest from 0
    nonfinite: np.ndarray  # (N, B) bool: some step of the column flagged the layer
    ran: np.ndarray  # (N, B) bool: False where the layer ran in no step of the column (a gap)
    onset_step: int  # -1: none
    end_text: str  # how the run ended: "completed, 200 steps", "diverged at step 7 in ..."
    # (step, row) of the first max |output| over the digest's threshold or non-finite, from every
    # row (a one-step spike is a pixel of a 300,000-step map: it is circled); None: none.
    crossing: tuple[int, int] | None


def layer_heatmap(run: RunDigest, label: str) -> LayerHeatmap:
    """The layer × step map a digest kept; ValueError if the report dropped it."""
    if run.layers is None:
        raise ValueError(f"the digest of {run.head.path} no longer holds its layer map")
    pooled = run.layers
    return LayerHeatmap(
        label=label,
        first_step=pooled.first_step,
        last_step=pooled.last_step,
        layer_names=head_layer_labels(run.head),
        layer_kinds=list(run.head.layer_kinds),
        log10_max_abs=log10_abs(pooled.max_abs).T,
        logdet_signed_log10=signed_log10(pooled.logdet).T,
        nonfinite=pooled.nonfinite.T,
        ran=pooled.ran.T,
        onset_step=run.head.nan_onset_step,
        end_text=end_with_place(run.head),
        crossing=_crossing_cell(run),
    )


def _crossing_cell(run: RunDigest) -> tuple[int, int] | None:
    c = run.crossing
    if c is None or c.layer not in run.head.layer_names:
        return None
    return c.step, run.head.layer_names.index(c.layer)


def cell_states(values: np.ndarray, nonfinite: np.ndarray, ran: np.ndarray) -> np.ndarray:
    """Per cell of a map: NONFINITE where a step flagged the layer, GAP where it ran in no step or
    holds no finite value (never drawn as a value, nor as a blow-up), else MEASURED."""
    states = np.full(np.shape(values), MEASURED, dtype=np.int8)
    states[~(np.asarray(ran, dtype=bool) & np.isfinite(values))] = GAP
    states[np.asarray(nonfinite, dtype=bool)] = NONFINITE
    return states


class ColourScale(NamedTuple):
    """One colour scale for every map of a report (the maps' values, on one quantity).

    Linear from `low` to `mark` over the first half of the colours and from `mark` to `high` over the
    second (linear throughout when the mark is not inside the range): a report whose sampling blew
    up to 1e30 would otherwise leave the training maps' 1e4 crossings in the darkest eighth, and
    wherever the extremes lie, a value past the diagnosis threshold is in the warm half.
    """

    low: float  # the value at the colour map's first colour
    high: float  # at its last
    data_low: float  # the smallest value any map holds; NaN when the maps hold none
    data_high: float
    mark: float  # the value at the middle colour, marked on the bar (the diagnosis threshold); NaN: none

    @property
    def has_knee(self) -> bool:
        return math.isfinite(self.mark) and self.low < self.mark < self.high

    def position(self, values: np.ndarray | float) -> np.ndarray:
        """Where each value sits on the colour map, 0 to 1 (clipped)."""
        v = np.clip(np.asarray(values, dtype=np.float64), self.low, self.high)
        if not self.has_knee:
            return (v - self.low) / (self.high - self.low)
        below = 0.5 * (v - self.low) / (self.mark - self.low)
        above = 0.5 + 0.5 * (v - self.mark) / (self.high - self.mark)
        return np.where(v <= self.mark, below, above)

    def ticks(self, per_side: int = 6) -> list[float]:
        """Whole numbers for the bar, at most `per_side` each side of the mark; the ends and the mark
        always, and no tick within half a step of them (two labels would overlap)."""
        sides = [(self.low, self.mark), (self.mark, self.high)] if self.has_knee else [(self.low, self.high)]
        ticks: set[float] = set()
        for start, end in sides:
            step = max(1, math.ceil((end - start) / per_side))
            inner = np.arange(math.ceil(start), math.floor(end) + 1, step, dtype=np.float64)
            clear = (inner - start >= step / 2) & (end - inner >= step / 2)
            ticks.update(float(t) for t in inner[clear])
            ticks.update((float(start), float(end)))
        return sorted(ticks)


def _measured(maps: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    parts = [np.asarray(values, np.float64)[np.asarray(states) == MEASURED] for values, states in maps]
    return np.concatenate(parts) if parts else np.zeros(0)


def output_scale(maps: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float) -> ColourScale:
    """The log10 max |output| scale of every map in a report, from (values, `cell_states`) pairs:
    whole decades from min(lowest, 0) to max(highest, log10 `threshold`), and at least MIN_DECADES
    wide, so that noise is never stretched across the colours and a map reaching the diagnosis
    threshold looks hot in any report."""
    values = _measured(maps)
    mark = math.log10(threshold) if threshold > 0 and math.isfinite(threshold) else math.nan
    data_low, data_high = (float(values.min()), float(values.max())) if values.size else (math.nan, math.nan)
    low = float(min(math.floor(data_low), 0)) if values.size else 0.0
    high = float(max(math.ceil(data_high) if values.size else low, mark if math.isfinite(mark) else low))
    return ColourScale(low, max(high, low + MIN_DECADES), data_low, data_high, mark)


def logdet_scale(maps: Iterable[tuple[np.ndarray, np.ndarray]]) -> ColourScale:
    """The signed-log log-det scale of every map in a report: symmetric about 0, whole units, at
    least MIN_LOGDET_REACH."""
    values = _measured(maps)
    reach = float(max(math.ceil(float(np.abs(values).max())) if values.size else 0.0, MIN_LOGDET_REACH))
    data_low, data_high = (float(values.min()), float(values.max())) if values.size else (math.nan, math.nan)
    return ColourScale(-reach, reach, data_low, data_high, 0.0)


def _span(low: float, high: float) -> str:
    return f"{low:.2f} to {high:.2f}" if math.isfinite(low) else "no value"


def scale_caption(output: ColourScale, logdet: ColourScale | None = None) -> str:
    """What a map's colours mean, with their ranges, for its caption."""
    text = (
        f"Colour: log10 max |output| from {output.low:g} to {output.high:g} (max |output| 1e{output.low:g} "
        f"to 1e{output.high:g}), the same scale in every map of this report; the maps hold "
        f"{_span(output.data_low, output.data_high)}."
    )
    if output.has_knee:
        text += (
            f" The black line, mid-bar, is the diagnosis threshold (max |output| {10**output.mark:g}): "
            "values below it take the first half of the colours, values above it the second."
        )
    elif math.isfinite(output.mark):
        text += f" The black line on the bar is the diagnosis threshold, max |output| {10**output.mark:g}."
    if logdet is not None:
        text += (
            f" Log-det: sign · log10(1 + |log-det|) from {logdet.low:g} to {logdet.high:g}, white at 0 "
            f"(the maps hold {_span(logdet.data_low, logdet.data_high)})."
        )
    return text + " Red: inf/NaN; hatched: the layer did not run (or holds no value) in those steps."


def map_scales(
    maps: Iterable[LayerHeatmap],
    threshold: float,
    more_outputs: Iterable[tuple[np.ndarray, np.ndarray]] = (),
) -> tuple[ColourScale, ColourScale]:
    """(max |output|, log-det) scales shared by the layer × step maps and by `more_outputs`, other
    maps of log10 max |output| as (values, `cell_states`) (the inverse's)."""
    maps = list(maps)
    outputs = [(m.log10_max_abs, cell_states(m.log10_max_abs, m.nonfinite, m.ran)) for m in maps]
    logdets = [(m.logdet_signed_log10, cell_states(m.logdet_signed_log10, m.nonfinite, m.ran)) for m in maps]
    return output_scale([*outputs, *more_outputs], threshold), logdet_scale(logdets)


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
