"""`Monitor(..., trial=trial)`: a run's stability kept on the user's own Optuna trial, as user attributes
under the names `flowdiag ablate` gives its trials, so the same readers (Optuna Dashboard, the report's
study tables, `StabilityPruner`) read a user's own study.

Why attributes and not `trial.report`: intermediate values are the user's objective curve, one value per
step, which their own pruner compares across trials; reporting max |output| there would take the steps
their validation reports use (Optuna keeps the first value of a step) and feed the wrong curve to
their pruner. An attribute is read by `trial.should_prune()` all the same (the pruner is given the
trial as stored).

Cost: a study on SQLite takes about 2.4 ms a write (measured: 200 `set_user_attr` calls, optuna 5.0),
as much as a small Glow's step on a CPU. So a step writes nothing, except: the onset at once (the
pruner must see it before the next step), and every `every` steps the peak when it grew. The rest is
written when the run ends. Optuna is imported only to recognize a pruned trial, when it is one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flowdiag.record.live_values import peak_of
from flowdiag.record.run_state import RunState, StepRecord
from flowdiag.runtime.errors import UserError

# The trial attributes of a run, defined once: `flowdiag ablate` writes them too (ablation/attempt.py),
# so `flowdiag report` and `watch` read a user's own study as they read an ablation.
STATUS = "status"
ONSET_STEP = "nan_onset_step"
ONSET_LAYER = "nan_onset_layer"
RUN_FILE = "hdf5_path"
STEPS = "steps"
FINAL_BPD = "final_bpd"
BEST_BPD = "best_bpd"
STEP2_PEAK = "step2_peak_max_abs"
EARLY_PEAK = "early_peak_max_abs"
# Only here: the largest |output| any layer reached so far (inf once non-finite), what the pruner reads.
PEAK = "peak_max_abs"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class TrialRecord:
    """A Monitor listener writing a run's stability to an Optuna trial (see the module docstring)."""

    def __init__(self, trial: Any, run_file: Path, every: int) -> None:
        if not callable(getattr(trial, "set_user_attr", None)):
            raise UserError(
                f"Monitor(trial=...) takes the optuna.Trial an objective is given, not {type(trial).__name__}"
            )
        self.trial, self.every = trial, every
        self.peak = -math.inf  # over every step so far
        self._written_peak = -math.inf
        self._onset_written = False
        trial.set_user_attr(RUN_FILE, str(run_file.resolve()))
        trial.set_user_attr(STATUS, "running")

    def __call__(self, record: StepRecord, onset: str | None) -> None:
        peak = peak_of(record)
        if not math.isnan(peak):
            self.peak = max(self.peak, peak)
        if onset is not None and not self._onset_written:
            self._onset_written = True
            self.trial.set_user_attr(ONSET_STEP, record.step)
            self.trial.set_user_attr(ONSET_LAYER, onset)
            self._write_peak()
        elif record.step % self.every == 0 and self.peak > self._written_peak:
            self._write_peak()

    def _write_peak(self) -> None:
        if self.peak > -math.inf:
            self.trial.set_user_attr(PEAK, self.peak)  # inf is valid JSON to Optuna's storages
            self._written_peak = self.peak

    def close(self, status: str, state: RunState) -> None:
        """The run's end: every attribute `flowdiag ablate` records for a finished run."""
        attrs = {
            STATUS: status,
            ONSET_STEP: state.onset_step,
            ONSET_LAYER: state.onset_layer,
            STEPS: state.step,
            FINAL_BPD: _finite_or_none(state.last_bpd),
            BEST_BPD: _finite_or_none(state.best_eval),
            STEP2_PEAK: _finite_or_none(state.step2_peak),
            EARLY_PEAK: _finite_or_none(state.early_peak),
        }
        for name, value in attrs.items():
            self.trial.set_user_attr(name, value)
        if self.peak > self._written_peak:
            self._write_peak()


def pruned_status(exc_type: type[BaseException], state: RunState) -> str | None:
    """The run status for a `with Monitor(...)` block left by `optuna.TrialPruned`: `diverged` after an
    onset, else `interrupted` (stopped early, nothing non-finite); None for any other exception."""
    from optuna.exceptions import TrialPruned  # only with a trial attached: optuna is in use

    if not issubclass(exc_type, TrialPruned):
        return None
    return "diverged" if state.diverged else "interrupted"
