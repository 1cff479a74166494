"""One run's progress as data: where it is, how well it did, and whether and where it diverged.

The Monitor advances it at every step, the trainer at every evaluation; the checkpoint stores it whole,
so a resumed run knows its onset, its peaks and its best evaluation exactly as the run that stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


class StepRecord(NamedTuple):
    """One training step as recorded: the step's scalars and every flow layer's values (host copies),
    over all the training forwards since the previous step (several under gradient accumulation)."""

    step: int
    loss: float
    bpd: float
    penalty: float
    grad_norm: float
    lr: float
    max_abs: np.ndarray  # (N,) max |output| per flow layer over the step's forwards; NaN where not run
    logdet: np.ndarray  # (N,) mean log-det per flow layer over every sample of those forwards
    nonfinite: np.ndarray  # (N,) bool: the layer ran and its output or log-det held inf or NaN
    ran: np.ndarray | None = None  # (N,) bool: the layer ran in the step (None: not recorded)
    forwards: int = 1  # training forwards the row covers


@dataclass
class RunState:
    step: int = 0  # steps done; step 1 is the first forward pass after the init
    last_bpd: float = math.nan
    best_eval: float = math.inf
    evals_without_improvement: int = 0
    last_eval_step: int = -1  # the step of the latest held-out evaluation; -1: none yet
    onset_step: int = -1  # first step with a non-finite loss, gradient or layer output; -1: none
    onset_layer: str = ""  # first non-finite layer in forward order, or `loss` / `backward`
    onset_rank: int = -1  # data-parallel runs: the (lowest) rank that saw it
    inverse_onset_step: int = -1  # first evaluation whose inverse (sampling) went non-finite; -1: none
    inverse_onset_layer: str = ""
    step2_peak: float = math.nan  # max |output| over all flow layers at step 2 (after one update), Fig. 5
    early_peak: float = math.nan  # the same over steps 1 and 2: a run that overflowed at step 1 has no step 2

    @property
    def diverged(self) -> bool:
        return self.onset_step >= 0

    def advance(self, record: StepRecord, onset: str | None) -> None:
        """Take in one recorded step; `onset` is its first non-finite layer (None: all finite)."""
        self.step = record.step
        self.last_bpd = record.bpd
        if record.step <= 2:
            with np.errstate(invalid="ignore"):
                peak = float(np.max(record.max_abs)) if record.max_abs.size else math.nan
            self.early_peak = peak if math.isnan(self.early_peak) else max(self.early_peak, peak)
            if record.step == 2:
                self.step2_peak = peak
        if onset is not None and self.onset_step < 0:
            self.onset_step, self.onset_layer = record.step, onset

    def take_eval(self, bpd: float) -> None:
        """An evaluation at the current step: the best so far, and how many in a row did not improve."""
        self.last_eval_step = self.step
        if bpd < self.best_eval:
            self.best_eval, self.evals_without_improvement = bpd, 0
        else:
            self.evals_without_improvement += 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
