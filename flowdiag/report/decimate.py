"""Decimation that keeps every event: what a figure of 300,000 steps draws. Pure.

Rows are cut into buckets of consecutive rows. A curve keeps, per bucket, the rows of its smallest and
its largest finite value and of its first non-finite one (an envelope, at most three points a bucket),
so a one-step spike and the first NaN survive at their exact step and value; a reservoir sample, as
TensorBoard keeps, can drop both. A layer map keeps, per bucket and layer, the largest finite max
|output|, the log-det farthest from 0, and whether any row flagged the layer or ran it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# Buckets per run: a curve draws at most 3 × 500 points, a layer map 500 columns (about the pixels a
# report's panel has, so that no column is dropped when it is drawn).
MAX_BUCKETS = 500


def bucket_rows(n_rows: int, max_buckets: int = MAX_BUCKETS) -> int:
    """Rows per bucket so that `n_rows` make at most `max_buckets` buckets (1: every row kept)."""
    return max(1, math.ceil(n_rows / max_buckets))


def _padded(values: np.ndarray, bucket: int, fill: float | bool) -> np.ndarray:
    """`values` (n, ...) padded with `fill` to whole buckets, shaped (buckets, bucket, ...)."""
    n = len(values)
    short = -n % bucket
    if short:
        pad = np.full((short, *values.shape[1:]), fill, dtype=values.dtype)
        values = np.concatenate([values, pad])
    return values.reshape(-1, bucket, *values.shape[1:])


class Candidates(NamedTuple):
    """Per bucket and column, the rows an envelope keeps: (buckets, 3, C) each, `kept` False where a
    bucket has no such row (no finite value, no non-finite one)."""

    rows: np.ndarray  # row index within the block
    kept: np.ndarray


def envelope_rows(values: np.ndarray, bucket: int) -> Candidates:
    """For `values` (n, C): per bucket of `bucket` rows, the rows of the smallest and the largest finite
    value and of the first non-finite one. A short last bucket counts only its own rows."""
    valid = _padded(np.ones(len(values), bool), bucket, False)[:, :, None]
    block = _padded(np.asarray(values, dtype=np.float64), bucket, np.nan)
    finite = np.isfinite(block) & valid
    odd = ~np.isfinite(block) & valid
    lowest = np.where(finite, block, np.inf).argmin(axis=1)
    highest = np.where(finite, block, -np.inf).argmax(axis=1)
    first_odd = odd.argmax(axis=1)
    has_finite, has_odd = finite.any(axis=1), odd.any(axis=1)
    offsets = (np.arange(block.shape[0]) * bucket)[:, None, None]
    rows = np.stack([lowest, highest, first_odd], axis=1) + offsets
    kept = np.stack([has_finite, has_finite, has_odd], axis=1)
    return Candidates(rows, kept)


class Series(NamedTuple):
    """A decimated curve: the rows kept, in step order."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64, non-finite kept


class EnvelopeBuilder:
    """The envelope of C columns over a run read block by block; blocks start on bucket boundaries."""

    def __init__(self, columns: int, bucket: int) -> None:
        self.bucket = bucket
        self.columns = columns
        self._steps: list[np.ndarray] = []  # (buckets, 3, C) per block
        self._values: list[np.ndarray] = []
        self._kept: list[np.ndarray] = []

    def add(self, steps: np.ndarray, values: np.ndarray) -> None:
        """A block: steps (n,), values (n, C)."""
        if not len(steps) or not self.columns:
            return
        values = np.asarray(values, dtype=np.float64)
        found = envelope_rows(values, self.bucket)  # every row index points at a real row of the block
        self._steps.append(np.asarray(steps)[found.rows])
        self._values.append(values[found.rows, np.arange(self.columns)])
        self._kept.append(found.kept)

    def series(self) -> list[Series]:
        """One Series per column."""
        if not self.columns:
            return []
        if not self._steps:
            empty = Series(np.zeros(0, np.int64), np.zeros(0))
            return [empty] * self.columns
        steps = np.concatenate(self._steps).transpose(2, 0, 1).reshape(self.columns, -1)
        values = np.concatenate(self._values).transpose(2, 0, 1).reshape(self.columns, -1)
        kept = np.concatenate(self._kept).transpose(2, 0, 1).reshape(self.columns, -1)
        out = []
        for j in range(self.columns):
            chosen, order = np.unique(steps[j][kept[j]], return_index=True)
            out.append(Series(chosen.astype(np.int64), values[j][kept[j]][order].astype(np.float64)))
        return out


class PooledLayers(NamedTuple):
    """Per bucket (B) and layer (N): what a layer × step map draws."""

    first_step: np.ndarray  # (B,) the bucket's first step
    last_step: np.ndarray  # (B,)
    max_abs: np.ndarray  # (B, N) largest finite max |output|; NaN where no row had one
    logdet: np.ndarray  # (B, N) the finite log-det farthest from 0; NaN where none
    nonfinite: np.ndarray  # (B, N) some row flagged the layer
    ran: np.ndarray  # (B, N) the layer ran in some row


def pool_layers(
    steps: np.ndarray,
    max_abs: np.ndarray,
    logdet: np.ndarray,
    nonfinite: np.ndarray,
    ran: np.ndarray,
    bucket: int,
) -> PooledLayers:
    """One block's rows pooled per bucket; a short last bucket pools its own rows."""
    step_buckets = _padded(np.asarray(steps), bucket, -1)
    last = np.where(step_buckets >= 0, step_buckets, np.iinfo(np.int64).min).max(axis=1)
    peak = _padded(np.asarray(max_abs, dtype=np.float32), bucket, np.nan)
    with np.errstate(invalid="ignore"):
        finite_peak = np.where(np.isfinite(peak), peak, -np.inf).max(axis=1)
    log = _padded(np.asarray(logdet, dtype=np.float32), bucket, np.nan)
    finite_log = np.where(np.isfinite(log), log, 0.0)
    far = np.take_along_axis(finite_log, np.abs(finite_log).argmax(axis=1)[:, None, :], axis=1)[:, 0]
    return PooledLayers(
        first_step=step_buckets[:, 0],
        last_step=last,
        max_abs=np.where(np.isfinite(finite_peak), finite_peak, np.nan).astype(np.float32),
        logdet=np.where(np.isfinite(log).any(axis=1), far, np.nan).astype(np.float32),
        nonfinite=_padded(np.asarray(nonfinite, dtype=bool), bucket, False).any(axis=1),
        ran=_padded(np.asarray(ran, dtype=bool), bucket, False).any(axis=1),
    )


def joined(parts: list[PooledLayers], n_layers: int) -> PooledLayers:
    """The pooled blocks of a run, in order, as one."""
    if not parts:
        none = np.zeros(0, np.int64)
        empty = np.zeros((0, n_layers), np.float32)
        flags = np.zeros((0, n_layers), bool)
        return PooledLayers(none, none, empty, empty, flags, flags)
    return PooledLayers(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def pool_extremes(values: np.ndarray, ran: np.ndarray, bucket: int, far: bool = False) -> np.ndarray:
    """Per bucket and column of `values` (n, N), over the rows where the column ran: the first
    non-finite value if there is one (the event), else the largest finite value (`far`: the finite
    value farthest from 0); NaN where the column ran in no row of the bucket. One row a bucket gives
    the values themselves, NaN where a layer did not run."""
    block = _padded(np.asarray(values, dtype=np.float64), bucket, np.nan)
    ran_rows = _padded(np.asarray(ran, dtype=bool), bucket, False)
    finite = np.isfinite(block) & ran_rows
    odd = ~np.isfinite(block) & ran_rows
    scores = np.where(finite, np.abs(block) if far else block, -np.inf)
    best = np.take_along_axis(block, scores.argmax(axis=1)[:, None, :], axis=1)[:, 0]
    first_odd = np.take_along_axis(block, odd.argmax(axis=1)[:, None, :], axis=1)[:, 0]
    return np.where(odd.any(axis=1), first_odd, np.where(finite.any(axis=1), best, np.nan))


def pool_any(flags: np.ndarray, bucket: int) -> np.ndarray:
    """Per bucket and column of `flags` (n, N): whether any row of the bucket is True."""
    return _padded(np.asarray(flags, dtype=bool), bucket, False).any(axis=1)


def bucket_ends(n_rows: int, bucket: int) -> np.ndarray:
    """The last row of each bucket of `n_rows` rows (a short last bucket ends at the last row)."""
    return np.minimum(np.arange(bucket - 1, n_rows + bucket - 1, bucket), n_rows - 1)
