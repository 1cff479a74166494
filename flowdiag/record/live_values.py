"""What a step gives the tools people log to (Lightning's loggers, TensorBoard, MLflow, W&B, an Optuna
trial): a handful of scalars, and the per-layer values grouped by level. Defined once here, so every
integration shows the same numbers under the same names; all of it is host arithmetic on the row the
Monitor already copied (no device work, no sync).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from flowdiag.record.run_state import StepRecord

PREFIX = "flowdiag/"
# The step's scalars, in this order; a value the step does not have (NaN: no penalty given, no layer
# ran) is left out rather than logged as NaN.
MAX_ABS = PREFIX + "max_abs"  # largest |output| over the layers that ran; inf once any is non-finite
LOGDET_MIN = PREFIX + "logdet_min"  # the log-det range over the layers that ran and stayed finite
LOGDET_MAX = PREFIX + "logdet_max"
GRAD_NORM = PREFIX + "grad_norm"
PENALTY = PREFIX + "penalty"  # Σ (h·w·log|det W|)² over the 1x1 convs, without λ
NONFINITE = PREFIX + "nonfinite_layers"  # how many layers held inf or NaN
STEP = PREFIX + "step"  # the x-axis where a tool needs one of its own (W&B)


def peak_of(record: StepRecord) -> float:
    """The largest |output| over the layers that ran in the step: inf once any of them is non-finite,
    NaN when none ran."""
    if record.nonfinite.any():
        return math.inf
    ran = record.max_abs[_ran(record)]
    return float(ran.max()) if ran.size else math.nan


def _ran(record: StepRecord) -> np.ndarray:
    return np.ones(len(record.max_abs), bool) if record.ran is None else record.ran


def step_scalars(record: StepRecord) -> dict[str, float]:
    """The handful every integration logs each step (see the names above), NaNs left out."""
    finite = _ran(record) & ~record.nonfinite & np.isfinite(record.logdet)
    logdets = record.logdet[finite]
    values = {
        MAX_ABS: peak_of(record),
        LOGDET_MIN: float(logdets.min()) if logdets.size else math.nan,
        LOGDET_MAX: float(logdets.max()) if logdets.size else math.nan,
        GRAD_NORM: float(record.grad_norm),
        PENALTY: float(record.penalty),
        NONFINITE: float(record.nonfinite.sum()),
    }
    return {name: value for name, value in values.items() if not math.isnan(value)}


class Level(NamedTuple):
    """The layers that run at one spatial size: one level of a multi-scale flow."""

    name: str  # level0 at the largest h·w, then down; `layers` for a flow without a spatial size
    columns: np.ndarray  # indices into the Monitor's layer list


def levels(pixels: list[int | None]) -> list[Level]:
    """Layers grouped by the h·w they run at, largest first (a multi-scale flow's levels); layers whose
    size is unknown (tabular, sequence and transformer flows) form one group of their own."""
    sizes = sorted({p for p in pixels if p is not None}, reverse=True)
    found = [
        Level(f"level{i}", np.array([j for j, p in enumerate(pixels) if p == size], dtype=np.int64))
        for i, size in enumerate(sizes)
    ]
    unknown = np.array([j for j, p in enumerate(pixels) if p is None], dtype=np.int64)
    if unknown.size:
        found.append(Level("layers" if not sizes else "other", unknown))
    return found


def level_values(record: StepRecord, level: Level) -> tuple[np.ndarray, np.ndarray]:
    """(log10 max |output|, log-det) of the level's layers that ran and stayed finite in the step:
    what a histogram of the level shows."""
    keep = level.columns[(_ran(record) & ~record.nonfinite)[level.columns]]
    magnitude = record.max_abs[keep]
    with np.errstate(divide="ignore"):  # an all-zero output is -inf: left out below
        log_magnitude = np.log10(magnitude)
    logdet = record.logdet[keep]
    return log_magnitude[np.isfinite(log_magnitude)], logdet[np.isfinite(logdet)]
