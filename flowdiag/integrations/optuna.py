"""`StabilityPruner`: prune a trial of a user's own Optuna study once its flow went unstable.

    study = optuna.create_study(pruner=StabilityPruner(max_abs=1e4, wrapped=optuna.pruners.MedianPruner()))

    def objective(trial):
        ...
        with flowdiag.Monitor(model, f"runs/{trial.number}", trial=trial) as monitor:
            for x in loader:
                ...
                monitor.step(loss)
                if trial.should_prune():
                    raise optuna.TrialPruned()

The Monitor keeps the trial's onset and peak |output| as user attributes (record/trial_record.py); the
pruner reads them from the trial as the storage holds it, so it works in every worker process of a
shared study. Everything else is left to `wrapped`, which sees the trial's own reported values.
"""

from __future__ import annotations

import math

import optuna
from optuna.pruners import BasePruner

from flowdiag.record.trial_record import ONSET_STEP, PEAK
from flowdiag.runtime.errors import UserError


class StabilityPruner(BasePruner):
    """Prune once the trial's Monitor saw a non-finite value, or a layer output larger than `max_abs`
    in absolute value (the default, inf: only non-finite values); otherwise ask `wrapped` (any Optuna
    pruner), or keep the trial.

    The peak reaches the trial every `Monitor(log_every=...)` steps, the onset at once.
    """

    def __init__(self, max_abs: float = math.inf, wrapped: BasePruner | None = None) -> None:
        if not max_abs > 0:
            raise UserError(f"StabilityPruner(max_abs=...) must be a positive number, got {max_abs}")
        if wrapped is not None and not isinstance(wrapped, BasePruner):
            raise UserError(
                f"StabilityPruner(wrapped=...) takes an Optuna pruner, got {type(wrapped).__name__}"
            )
        self.max_abs = float(max_abs)
        self.wrapped = wrapped

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """True when the trial is unstable (see the class docstring), else what `wrapped` says."""
        if self.unstable(trial):
            return True
        return self.wrapped.prune(study, trial) if self.wrapped is not None else False

    def unstable(self, trial: optuna.trial.FrozenTrial) -> bool:
        """The trial's Monitor saw a non-finite value, or a peak |output| above `max_abs`."""
        attrs = trial.user_attrs
        onset = attrs.get(ONSET_STEP)
        peak = attrs.get(PEAK)
        return (isinstance(onset, int) and onset >= 0) or (
            isinstance(peak, int | float) and peak > self.max_abs
        )
