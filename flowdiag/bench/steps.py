"""The trainer step (`Trainer.one_step`: forward, backward, optimizer) in three modes, timed in
rounds: each round one fresh process and one trainer, the modes taking turns every few steps:

- no hooks: `diagnostics=False` and the run file's writes dropped;
- hooks: the per-layer hooks and the packed row copied to the host every step, writes dropped;
- hooks + HDF5: as `flowdiag train` runs, the real writer with the run's own flush settings.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from flowdiag.bench.processes import in_fresh_process, sync
from flowdiag.bench.results import HOOKS_HDF5, MODES, NO_HOOKS, ModeTiming, StepTiming
from flowdiag.record.store import bytes_per_step
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import RunConfig
from flowdiag.train.data import ImageData
from flowdiag.train.trainer import Trainer

WARMUP_STEPS = 5  # first-call allocations and the writer's first rows: not the steady state
SUB_BLOCK = 5  # steps of one mode before the next mode's turn


def open_trainer(config: RunConfig, data: ImageData, mode: str, folder: Path) -> Trainer:
    """A trainer ready for step 1 (initialized), recording as `mode` says."""
    trainer = Trainer(config, folder, data=data)
    trainer.open()  # the init is written; the mode decides what the steps write
    set_mode(trainer, mode)
    return trainer


def set_mode(trainer: Trainer, mode: str) -> None:
    trainer.monitor.set_mode(hooks=mode != NO_HOOKS, write=mode == HOOKS_HDF5)


def step_times(trainer: Trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        sync(trainer.device)
        start = time.perf_counter()
        trainer.one_step()
        sync(trainer.device)
        times.append(time.perf_counter() - start)
    return times


def _block(
    config_json: str, data: ImageData, mode: str, steps: int, folder: str
) -> tuple[list[float], float]:
    """In a fresh process: warm up, time `steps` steps; returns the times and HDF5 bytes per step."""
    trainer = open_trainer(RunConfig.from_json(config_json), data, mode, Path(folder))
    step_times(trainer, WARMUP_STEPS)
    trainer.monitor.flush()
    times = step_times(trainer, steps)
    trainer.monitor.close()  # untimed: what the timed steps left in the buffer
    return times, bytes_per_step(trainer.out_dir / RUN_FILE) if mode == HOOKS_HDF5 else math.nan


def _round(
    config_json: str, data: ImageData, modes: tuple[str, ...], steps: int, folder: str
) -> list[tuple[list[float], float]]:
    """In one fresh process, one trainer: `steps` steps of every mode, the modes taking turns every
    SUB_BLOCK steps. The same process and weights for all modes, so what differs is the recording
    alone (between processes the step time varied by ±15 % here, more than the hooks cost), and
    short turns cancel the drift within the process (measured: ±5 % between 20-step blocks)."""
    trainer = open_trainer(RunConfig.from_json(config_json), data, HOOKS_HDF5, Path(folder))
    step_times(trainer, WARMUP_STEPS)
    trainer.monitor.flush()
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for start in range(0, steps, SUB_BLOCK):
        for mode in modes:
            set_mode(trainer, mode)
            times[mode] += step_times(trainer, min(SUB_BLOCK, steps - start))
    trainer.monitor.close()  # untimed: what the timed steps left in the buffer
    row = bytes_per_step(trainer.out_dir / RUN_FILE)
    return [(times[mode], row if mode == HOOKS_HDF5 else math.nan) for mode in modes]


def run_block(
    config: RunConfig, data: ImageData, mode: str, steps: int, folder: Path
) -> tuple[list[float], float]:
    """One block of `mode` in a fresh process: step times, and HDF5 bytes per step (NaN without HDF5)."""
    return in_fresh_process(_block, config.to_json(), data, mode, steps, str(folder))


def time_steps(
    config: RunConfig, data: ImageData, steps: int, blocks: int, workdir: Path, modes: tuple[str, ...] = MODES
) -> StepTiming:
    """Median step per mode over `blocks` rounds, each round a fresh process running every mode once
    in a rotated order, so no mode always runs first or last; and each round's median per mode, for
    overheads paired within a round."""
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    medians: dict[str, list[float]] = {mode: [] for mode in modes}
    row_bytes: list[float] = []
    for block in range(blocks):
        shift = block % len(modes)
        order = modes[shift:] + modes[:shift]
        results = in_fresh_process(
            _round, config.to_json(), data, order, steps, str(workdir / f"round-{block}")
        )
        for mode, (times, row) in zip(order, results, strict=True):
            samples[mode] += times
            medians[mode].append(statistics.median(times))
            if mode == HOOKS_HDF5:
                row_bytes.append(row)
    timings = tuple(ModeTiming(mode, tuple(samples[mode]), tuple(medians[mode])) for mode in modes)
    return StepTiming(timings, sum(row_bytes) / len(row_bytes) if row_bytes else math.nan)
