"""The live log to an MLflow run (`mlflow.start_run()`, or any `mlflow.entities.Run`), through the
client of the current tracking URI.

Measured (mlflow-skinny 3.17, sqlite store, one CPU thread): one `log_batch` takes 34 ms whether it holds
one step's 6 metrics or ten steps' 60 (72 ms for 300), and a file store 1.3 ms. Sent each step, the log
would cost more than a small model's step, and MLflow's queue thread works under the GIL beside the
training loop: sent every 10 steps it still cost a y0ast-style Glow's 38 ms step on one core 3.6 ms. So
every step's scalars are kept here and sent as one batch at most every `send_seconds` (5 s: the UI is
never later than that), asynchronously, and waited for when the run ends. MLflow has no histograms:
each level's largest |output| and summed log-det go as two metrics instead (flowdiag/level0/max_abs,
flowdiag/level0/logdet_sum: a metric's name is a path in a file store, so none is inside another's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from flowdiag.record.live_log import LevelValues, LiveLog
from flowdiag.record.live_values import PREFIX
from flowdiag.record.run_state import RunState

_PER_BATCH = 1000  # MLflow's limit of metrics in one log_batch


class MlflowLog(LiveLog):
    send_seconds = 5.0  # at most one batch this often (and one at the end)

    def __init__(self, run: Any, every: int, pixels: Callable[[], list[int | None]]) -> None:
        super().__init__(every, pixels)
        from mlflow import MlflowClient  # the user handed us an MLflow run: mlflow is installed
        from mlflow.entities import Metric

        self._metric = Metric
        self.client = MlflowClient()
        self.run_id: str = run.info.run_id
        self._pending: list[Any] = []
        self._sent_at = time.monotonic()
        self._sent: list[Any] = []  # the asynchronous operations, waited for at the end

    def write(self, step: int, scalars: dict[str, float], per_level: list[LevelValues] | None) -> None:
        now = int(time.time() * 1000)
        values = dict(scalars)
        for level in per_level or ():
            if level.log10_max_abs.size:
                values[f"{PREFIX}{level.name}/max_abs"] = float(10.0 ** level.log10_max_abs.max())
            if level.logdet.size:
                values[f"{PREFIX}{level.name}/logdet_sum"] = float(np.sum(level.logdet))
        self._pending.extend(self._metric(key, value, now, step) for key, value in values.items())
        if time.monotonic() - self._sent_at >= self.send_seconds:
            self._send()

    def _send(self) -> None:
        self._sent_at = time.monotonic()
        for start in range(0, len(self._pending), _PER_BATCH):
            batch = self._pending[start : start + _PER_BATCH]
            operation = self.client.log_batch(self.run_id, metrics=batch, synchronous=False)
            if operation is not None:
                self._sent.append(operation)
        self._pending = []

    def close(self, status: str, state: RunState) -> None:
        self._send()
        self.client.set_tag(self.run_id, f"{PREFIX}status", status)
        if state.diverged:
            self.client.set_tag(self.run_id, f"{PREFIX}nan_onset_step", str(state.onset_step))
            self.client.set_tag(self.run_id, f"{PREFIX}nan_onset_layer", state.onset_layer)
        for operation in self._sent:
            operation.wait()
        self._sent = []
