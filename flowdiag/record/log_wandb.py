"""The live log to a W&B run (`wandb.init()`, online or offline).

Its x-axis is a metric of its own (`flowdiag/step`, W&B's `define_metric`), so the user's own
`run.log` calls keep W&B's step counter as they use it. Measured (wandb 0.31, offline, one CPU thread):
0.4 to 1.0 ms a step, histograms included; `run.log` hands them to W&B's own process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowdiag.record.live_log import LevelValues, LiveLog
from flowdiag.record.live_values import PREFIX, STEP
from flowdiag.record.run_state import RunState


class WandbLog(LiveLog):
    def __init__(self, run: Any, every: int, pixels: Callable[[], list[int | None]]) -> None:
        super().__init__(every, pixels)
        import wandb  # the user handed us a W&B run: wandb is installed

        self._histogram = wandb.Histogram
        self.run = run
        run.define_metric(STEP)
        run.define_metric(f"{PREFIX}*", step_metric=STEP)

    def write(self, step: int, scalars: dict[str, float], per_level: list[LevelValues] | None) -> None:
        payload: dict[str, Any] = {STEP: step, **scalars}
        for level in per_level or ():
            if level.log10_max_abs.size:
                payload[f"{PREFIX}{level.name}/log10_max_abs"] = self._histogram(level.log10_max_abs)
            if level.logdet.size:
                payload[f"{PREFIX}{level.name}/logdet"] = self._histogram(level.logdet)
        self.run.log(payload)

    def close(self, status: str, state: RunState) -> None:
        self.run.summary[f"{PREFIX}status"] = status
        self.run.summary[f"{PREFIX}nan_onset_step"] = state.onset_step
        self.run.summary[f"{PREFIX}nan_onset_layer"] = state.onset_layer
