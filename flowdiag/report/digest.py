"""A run reduced to what the report needs, in one pass over its rows a block at a time.

The events (onset, first threshold crossing, each 1x1 conv's first and last log-det, the peak before
the onset, the row at the Fig. 5 step) come from every row; the curves and the layer map from
`decimate`, which keeps every spike and every first non-finite value. A digest holds a few MB whatever
the run's length: a report of many runs reads one at a time and keeps only their digests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flowdiag.record.store import RunHead, RunRecord, StepBlock, open_run
from flowdiag.record.store.inverse_rows import InverseRecord
from flowdiag.record.store.scan import BLOCK_BYTES, block_rows
from flowdiag.report.decimate import EnvelopeBuilder, PooledLayers, Series, bucket_rows, joined, pool_layers
from flowdiag.report.runs import onset_step

DEFAULT_THRESHOLD = 1e4
# The 1x1 convs' log-det curves: 96 of them in Glow at K = 32, drawn in one panel, so fewer buckets
# (the envelope still keeps each bucket's extremes): 96 × 1,500 points took 0.6 s to draw.
CONV_BUCKETS = 100


class Crossing(NamedTuple):
    """First step at which some layer's max |output| exceeded the threshold or was flagged non-finite."""

    step: int
    layer: str  # the first such layer in forward order: the one nearest the input
    max_abs: float  # its value (inf / NaN kept)


class LayerRow(NamedTuple):
    """One step's row of the per-layer arrays, whole."""

    step: int
    max_abs: np.ndarray  # (N,)
    nonfinite: np.ndarray  # (N,)
    ran: np.ndarray  # (N,)


class RunDigest(NamedTuple):
    head: RunHead
    threshold: float  # what `crossing` was measured against
    eval_step: np.ndarray  # (E,)
    eval_bpd: np.ndarray
    inverse: InverseRecord
    init: dict[str, np.ndarray | list[str]] | None
    final_bpd: float  # NaN: no row
    most_forwards: int  # the most training forwards one row covers (1: no gradient accumulation)
    recorded: bool  # False: diagnostics were off, no layer holds a measurement or a flag
    crossing: Crossing | None
    conv_first: np.ndarray  # (C,) each invconv's first finite h·w·Σlog|u|; NaN if none
    conv_last: np.ndarray  # (C,) its last finite one
    peak_before_onset: float  # largest finite max |output| in the rows before the onset; NaN: none
    onset_bpd: float  # bpd at the onset, else the last finite one before it; NaN without onset
    fig5_step: int
    fig5_row: LayerRow | None  # the row at fig5_step; the last row if the run ended before it
    bpd: Series  # decimated training bpd
    penalty: Series
    conv_logdet: tuple[Series, ...]  # per invconv, forward order
    layers: PooledLayers | None  # the layer × step map; None once the report dropped it


class _Reducer:
    """Folds a run's blocks into a RunDigest; blocks start on bucket boundaries."""

    def __init__(self, head: RunHead, threshold: float, fig5_step: int) -> None:
        self.head, self.threshold, self.fig5_step = head, threshold, fig5_step
        self.bucket = bucket_rows(head.n_rows)
        # A whole number of buckets, so that blocks of conv buckets are blocks of buckets too.
        self.conv_bucket = math.ceil(bucket_rows(head.n_rows, CONV_BUCKETS) / self.bucket) * self.bucket
        self.convs = head.layer_index("invconv")
        self.onset = onset_step(head)
        self.crossing: Crossing | None = None
        self.recorded = False
        self.peak = -math.inf
        self.onset_bpd = self.final_bpd = math.nan
        self.most_forwards = 1
        self.conv_first = np.full(len(self.convs), np.nan)
        self.conv_last = np.full(len(self.convs), np.nan)
        self.fig5_row: LayerRow | None = None
        self.last_row: LayerRow | None = None
        self.curves = EnvelopeBuilder(2, self.bucket)  # bpd, penalty
        self.conv_curves = EnvelopeBuilder(len(self.convs), self.conv_bucket)
        self.pooled: list[PooledLayers] = []

    def add(self, b: StepBlock) -> None:
        if not len(b.step):
            return
        self._events(b)
        self._conv_span(b.logdet[:, self.convs].astype(np.float64))
        self._rows_kept(b)
        self.curves.add(b.step, np.column_stack([b.bpd, b.penalty]))
        self.conv_curves.add(b.step, b.logdet[:, self.convs])
        self.pooled.append(pool_layers(b.step, b.max_abs, b.logdet, b.nonfinite, b.ran, self.bucket))
        self.final_bpd = float(b.bpd[-1])
        self.most_forwards = max(self.most_forwards, int(b.forwards.max()))

    def _events(self, b: StepBlock) -> None:
        finite = np.isfinite(b.max_abs)
        self.recorded = self.recorded or bool(finite.any() or b.nonfinite.any())
        if self.crossing is None:
            # Non-finite by the writer's flag, not by isnan: a layer that did not run holds NaN too.
            with np.errstate(invalid="ignore"):
                crossed = np.asarray(b.nonfinite, dtype=bool) | (b.max_abs > self.threshold)
            rows = np.flatnonzero(crossed.any(axis=1))
            if rows.size:
                row = int(rows[0])
                column = int(np.flatnonzero(crossed[row])[0])
                name = self.head.layer_names[column]
                self.crossing = Crossing(int(b.step[row]), name, float(b.max_abs[row, column]))
        if self.onset > 0:
            before = (b.step < self.onset)[:, None] & finite
            if before.any():
                self.peak = max(self.peak, float(b.max_abs[before].max()))
        if self.onset >= 0:
            upto = np.flatnonzero((b.step <= self.onset) & np.isfinite(b.bpd))
            if upto.size:
                self.onset_bpd = float(b.bpd[upto[-1]])

    def _conv_span(self, logdet: np.ndarray) -> None:
        finite = np.isfinite(logdet)
        seen = finite.any(axis=0)
        first = finite.argmax(axis=0)
        last = len(logdet) - 1 - finite[::-1].argmax(axis=0)
        columns = np.arange(logdet.shape[1])
        fresh = seen & np.isnan(self.conv_first)
        self.conv_first[fresh] = logdet[first[fresh], columns[fresh]]
        self.conv_last[seen] = logdet[last[seen], columns[seen]]

    def _rows_kept(self, b: StepBlock) -> None:
        at = np.flatnonzero(b.step == self.fig5_step)
        if at.size:
            self.fig5_row = _row(b, int(at[-1]))
        self.last_row = _row(b, len(b.step) - 1)

    def digest(
        self,
        evals: tuple[np.ndarray, np.ndarray],
        inverse: InverseRecord,
        init: dict[str, np.ndarray | list[str]] | None,
    ) -> RunDigest:
        fig5 = self.fig5_row
        if fig5 is None and self.last_row is not None and self.last_row.step < self.fig5_step:
            fig5 = self.last_row  # a run that overflowed before the step is the interesting one
        bpd, penalty = self.curves.series()
        return RunDigest(
            head=self.head,
            threshold=self.threshold,
            eval_step=evals[0],
            eval_bpd=evals[1],
            inverse=inverse,
            init=init,
            final_bpd=self.final_bpd,
            most_forwards=self.most_forwards,
            recorded=self.recorded,
            crossing=self.crossing,
            conv_first=self.conv_first,
            conv_last=self.conv_last,
            peak_before_onset=self.peak if math.isfinite(self.peak) else math.nan,
            onset_bpd=self.onset_bpd,
            fig5_step=self.fig5_step,
            fig5_row=fig5,
            bpd=bpd,
            penalty=penalty,
            conv_logdet=tuple(self.conv_curves.series()),
            layers=joined(self.pooled, len(self.head.layer_names)),
        )


def _row(b: StepBlock, i: int) -> LayerRow:
    return LayerRow(int(b.step[i]), b.max_abs[i].copy(), b.nonfinite[i].copy(), b.ran[i].copy())


def digest_run(
    path: Path, threshold: float = DEFAULT_THRESHOLD, fig5_step: int = 2, block_bytes: int = BLOCK_BYTES
) -> RunDigest:
    """Read a run file a block at a time and reduce it; memory stays at one block and the digest."""
    with open_run(path) as run:
        reducer = _Reducer(run.head, threshold, fig5_step)
        n_layers = len(run.head.layer_names)
        for block in run.blocks(block_rows(n_layers, block_bytes, multiple=reducer.conv_bucket)):
            reducer.add(block)
        return reducer.digest(run.evals(), run.inverse(), run.init())


def digest_record(record: RunRecord, threshold: float = DEFAULT_THRESHOLD, fig5_step: int = 2) -> RunDigest:
    """The digest of a run already in memory: the same reduction, over one block."""
    reducer = _Reducer(record.head, threshold, fig5_step)
    reducer.add(record.rows)
    return reducer.digest((record.eval_step, record.eval_bpd), record.inverse, record.init)


def digest_of(
    source: Path | RunRecord | RunDigest, threshold: float = DEFAULT_THRESHOLD, fig5_step: int = 2
) -> RunDigest:
    """A digest from a run file, a RunRecord, or a digest already made (returned as is)."""
    if isinstance(source, RunDigest):
        return source
    if isinstance(source, RunRecord):
        return digest_record(source, threshold, fig5_step)
    return digest_run(Path(source), threshold, fig5_step)
