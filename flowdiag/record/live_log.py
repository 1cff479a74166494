"""`Monitor(..., log_to=...)`: the base of the live loggers (TensorBoard, MLflow, W&B), one file each.

Every step the handful of scalars (`live_values.step_scalars`); every `every` steps, and at the first
non-finite step, the per-layer values of each level (`live_values.levels`) as histograms where the
tool has them. A logger gets host numbers from the row the Monitor already copied: it adds no device
work. The logger object is the user's: flushed when the run ends, never closed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from flowdiag.record.live_values import level_values, levels, step_scalars
from flowdiag.record.run_state import RunState, StepRecord


class LevelValues(NamedTuple):
    name: str  # level0, level1, ... (live_values.levels)
    log10_max_abs: np.ndarray  # the level's layers that ran and stayed finite
    logdet: np.ndarray


class LiveLog(ABC):
    """One tool's live log of a run: `write` each step, `close` once at the end."""

    def __init__(self, every: int, pixels: Callable[[], list[int | None]]) -> None:
        self.every = every
        self._pixels = pixels  # known after the first forward, for libraries that tell only then
        self._onset_seen = False

    def __call__(self, record: StepRecord, onset: str | None) -> None:
        first_onset = onset is not None and not self._onset_seen
        self._onset_seen = self._onset_seen or onset is not None
        per_level = None
        if record.step % self.every == 0 or first_onset:
            per_level = [LevelValues(g.name, *level_values(record, g)) for g in levels(self._pixels())]
        self.write(record.step, step_scalars(record), per_level)

    @abstractmethod
    def write(self, step: int, scalars: dict[str, float], per_level: list[LevelValues] | None) -> None:
        """Log one step's scalars, and the levels' values when given."""

    @abstractmethod
    def close(self, status: str, state: RunState) -> None:
        """The run's end: its status and onset, and whatever the logger still holds, sent."""
