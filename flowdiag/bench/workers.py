"""How long a worker process takes from start until it is ready to train (imports done, first trainer
constructed), with the start method flowdiag uses and with spawn."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from flowdiag.bench.processes import in_fresh_process
from flowdiag.bench.results import WorkerStartup
from flowdiag.runtime.environment import process_context
from flowdiag.settings.config import RunConfig
from flowdiag.train.data import ImageData
from flowdiag.train.trainer import Trainer


def _ready(config_json: str, data: ImageData | None, folder: str) -> float:
    """A worker's start: (spawn: the imports of this module, the trainer's), the data, one trainer.
    Returns the wall clock when it is ready: time.time() is one clock for every process here."""
    Trainer(RunConfig.from_json(config_json), Path(folder), data=data)
    return time.time()


def startup_times(
    config: RunConfig, data: ImageData, method: str, repeats: int, workdir: Path
) -> tuple[float, ...]:
    context = multiprocessing.get_context(method)
    # As the ablation runner does: a forked worker inherits the data, a spawned one loads its own.
    shared = data if method == "fork" else None
    times = []
    for repeat in range(repeats):
        began = time.time()
        ready = in_fresh_process(
            _ready, config.to_json(), shared, str(workdir / f"worker-{method}-{repeat}"), context=context
        )
        times.append(ready - began)
    return tuple(times)


def worker_startup(
    config: RunConfig, data: ImageData, repeats: int, workdir: Path
) -> tuple[WorkerStartup, ...]:
    """flowdiag's start method first, then spawn for comparison (once, if flowdiag spawns anyway)."""
    used = process_context().get_start_method()
    methods = [used] + (["spawn"] if used != "spawn" else [])
    return tuple(
        WorkerStartup(method, startup_times(config, data, method, repeats, workdir), method == used)
        for method in methods
    )
