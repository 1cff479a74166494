"""One run's TensorBoard events, written from its file a block of rows at a time.

Global scalars (loss, bpd, penalty, grad norm, learning rate, and the largest |output| over all layers)
go in at every step. Per-layer series (max |output|, log-det) and the histograms of log10 max |output|
(all layers, and per level: the layers that share an h·w) go in once per `stride` steps, pooled over
them (`decimate.pool_extremes`: the first non-finite value, else the largest): a spike or a NaN within
a stride still shows, at the stride's last step. `auto_stride` keeps a run's per-layer events within
LAYER_BUDGET_BYTES, so a 300,000-step run of 288 layers exports to well under 200 MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flowdiag.record.store import RunFile, StepBlock
from flowdiag.record.store.scan import block_rows
from flowdiag.report.decimate import bucket_ends, pool_any, pool_extremes
from flowdiag.report.event_file import MAX_VALUES, EventFile

SCALARS = ("loss", "bpd", "penalty", "grad_norm", "lr")
PEAK_TAG = "train/max_abs"  # the largest |output| over all layers, at every step
LAYER_SERIES = ("max_abs", "logdet")  # layers/<series>/<layer>
HISTOGRAM_TAG = "layers/log10_max_abs"  # all layers; per level: HISTOGRAM_TAG/<h>x<w>
# The per-layer events' share of a run's event files. Measured: a value costs its tag and about 12
# bytes (value, framing), so 288 layers' two series take ~29 kB a pooled step.
LAYER_BUDGET_BYTES = 100 * 2**20
# Histograms per tag at most: each costs a millisecond to make and a kB or two of events, and
# TensorBoard's histogram view shows a few hundred. Short runs get one per step (or per stride).
MAX_HISTOGRAMS = 500
Progress = Callable[[int, int], None]  # (rows done, rows in all) after each block


class TensorBoard(NamedTuple):
    """What export needs of the tensorboard package (and torch's builders of its summaries)."""

    event: Any  # the Event protobuf message
    summary: Any  # the Summary protobuf message
    histogram: Any  # the HistogramProto message
    builders: Any  # report.tb_summaries: the text and hparams summaries


def auto_stride(n_rows: int, layer_names: list[str]) -> int:
    """The smallest stride that keeps the per-layer series within LAYER_BUDGET_BYTES (1 for short runs)."""
    per_row = sum(2 * (len(f"layers/max_abs/{name}") + 12) for name in layer_names)
    most_rows = max(1, LAYER_BUDGET_BYTES // max(per_row, 1))
    return max(1, math.ceil(n_rows / most_rows))


def row_peaks(block: StepBlock) -> np.ndarray:
    """Per row, the largest |output| over the layers that ran: the first flagged layer's value (inf or
    NaN) in a row that flagged one; NaN in a row where no layer ran or diagnostics were off. (A row
    pooled over its layers as a bucket pools rows.)"""
    n_layers = block.max_abs.shape[1]
    if not n_layers:
        return np.full(len(block.step), np.nan)
    return pool_extremes(block.max_abs.T, block.ran.T, n_layers)[0]


def level_columns(layer_pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Layers grouped by the h·w they run at (a Glow level), named "8x8" (or "64px"); empty when the
    file does not say or every layer runs at one size."""
    pixels = np.asarray(layer_pixels)
    sizes = sorted({int(p) for p in pixels if p > 0}, reverse=True)
    if len(sizes) < 2:
        return {}
    named = {}
    for size in sizes:
        side = math.isqrt(size)
        named[f"{side}x{side}" if side * side == size else f"{size}px"] = np.flatnonzero(pixels == size)
    return named


def log10_finite(values: np.ndarray) -> np.ndarray:
    """log10 of the finite, positive values: what a histogram can bin."""
    v = np.asarray(values, dtype=np.float64)
    return np.log10(v[np.isfinite(v) & (v > 0)])


HISTOGRAM_BINS = 30


def histogram(tb: TensorBoard, values: np.ndarray) -> Any:
    """A HistogramProto of `values` (finite): 30 equal bins between their min and max."""
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
    return tb.histogram(
        min=float(values.min()), max=float(values.max()), num=float(values.size), sum=float(values.sum()),
        sum_squares=float(np.square(values).sum()), bucket_limit=edges[1:].tolist(), bucket=counts.tolist(),
    )  # fmt: skip


class EventRows:
    """Writes the step rows of one run into its event file, a block at a time."""

    def __init__(
        self, tb: TensorBoard, events: EventFile, run: RunFile, stride: int, base: float | None
    ) -> None:
        self.tb, self.events, self.run, self.stride = tb, events, run, stride
        self.base_time = base  # unix time of wall_time 0; None: the events are stamped now
        # A histogram every `every` pooled steps: a whole number of strides, at most MAX_HISTOGRAMS.
        self.every = max(1, math.ceil(run.head.n_rows / stride / MAX_HISTOGRAMS))
        head = run.head
        self.layer_tags = {
            series: [f"layers/{series}/{name}" for name in head.layer_names] for series in LAYER_SERIES
        }
        self.levels = level_columns(head.layer_pixels)
        self.eval_step, self.eval_bpd = run.evals()
        self.eval_times = np.full(len(self.eval_step), np.nan)

    def write(self, progress: Progress | None = None) -> int:
        """Every row's events, then the evaluations'; returns the rows written."""
        head = self.run.head
        done = 0
        for block in self.run.blocks(block_rows(len(head.layer_names), multiple=self.stride)):
            self._block(block, self._times(block))
            self.events.flush()
            done += len(block.step)
            if progress is not None:
                progress(done, head.n_rows)
        value = self.tb.summary.Value
        for i, (step, bpd) in enumerate(zip(self.eval_step, self.eval_bpd, strict=True)):
            wall = float(self.eval_times[i]) if math.isfinite(self.eval_times[i]) else None
            self.events.add(
                self.tb.summary(value=[value(tag="eval/bpd", simple_value=float(bpd))]), step, wall
            )
        return done

    def _times(self, block: StepBlock) -> np.ndarray | None:
        if self.base_time is None or not np.isfinite(block.wall_time).all():
            return None
        times = self.base_time + np.asarray(block.wall_time, dtype=np.float64)
        inside = (self.eval_step >= block.step[0]) & (self.eval_step <= block.step[-1])
        rows = np.minimum(np.searchsorted(block.step, self.eval_step[inside]), len(block.step) - 1)
        self.eval_times[inside] = times[rows]
        return times

    def _block(self, block: StepBlock, times: np.ndarray | None) -> None:
        value, summary = self.tb.summary.Value, self.tb.summary
        scalars = np.column_stack([*(getattr(block, name) for name in SCALARS), row_peaks(block)]).tolist()
        tags = [f"train/{name}" for name in SCALARS] + [PEAK_TAG]
        walls = [None] * len(block.step) if times is None else times.tolist()
        for step, row, wall in zip(block.step.tolist(), scalars, walls, strict=True):
            values = [value(tag=tag, simple_value=v) for tag, v in zip(tags, row, strict=True)]
            self.events.add(summary(value=values), step, wall)
        pooled_max = pool_extremes(block.max_abs, block.ran, self.stride)
        pooled_log = pool_extremes(block.logdet, block.ran, self.stride, far=True)
        ran = pool_any(block.ran, self.stride)
        for j, row in enumerate(bucket_ends(len(block.step), self.stride).tolist()):
            step, wall = int(block.step[row]), walls[row]
            columns = np.flatnonzero(ran[j])
            values = [
                value(tag=self.layer_tags[series][k], simple_value=float(pooled[j, k]))
                for series, pooled in (("max_abs", pooled_max), ("logdet", pooled_log))
                for k in columns
            ]
            for first in range(0, len(values), MAX_VALUES):  # short records: see event_file
                self.events.add(summary(value=values[first : first + MAX_VALUES]), step, wall)
            if (block.start // self.stride + j) % self.every == 0:
                self._histograms(pooled_max[j], step, wall)

    def _histograms(self, peaks: np.ndarray, step: int, wall: float | None) -> None:
        value, summary = self.tb.summary.Value, self.tb.summary
        groups = {HISTOGRAM_TAG: peaks, **{f"{HISTOGRAM_TAG}/{k}": peaks[c] for k, c in self.levels.items()}}
        histograms = []
        for tag, group in groups.items():
            logs = log10_finite(group)
            if logs.size:
                histograms.append(value(tag=tag, histo=histogram(self.tb, logs)))
        if histograms:
            self.events.add(summary(value=histograms), step, wall)


def base_time(run: RunFile, source: Path) -> float | None:
    """Unix time of the run's wall_time 0: the start the file records, else (older files) the file's
    last write minus the clock at its last row; None for a file without a wall clock."""
    head = run.head
    if math.isfinite(head.start_time):
        return head.start_time
    if not head.n_rows:
        return None
    last = float(run.tail(1).wall_time[-1])
    return source.stat().st_mtime - last if math.isfinite(last) else None
