"""The step and the small grid with one competing CPU-bound process, against the same work idle.

With one intra-op thread per process, a busy core should cost a process little more than its share;
with OpenMP threads spinning against it, flowdiag got 2x to 100x slower. This shows which holds."""

from __future__ import annotations

import statistics
from pathlib import Path

from flowdiag.bench.competitor import competing_process
from flowdiag.bench.results import HOOKS_HDF5, CompetitionResult, GridTiming
from flowdiag.bench.small_grid import GridJob, time_grid
from flowdiag.bench.steps import run_block
from flowdiag.settings.config import RunConfig
from flowdiag.train.data import ImageData


def step_idle_and_competing(
    config: RunConfig, data: ImageData, steps: int, blocks: int, workdir: Path
) -> tuple[float, float]:
    """Median step (hooks + HDF5) idle and with the competitor, blocks alternating between the two."""
    samples: dict[bool, list[float]] = {False: [], True: []}
    for block in range(blocks):
        for competing in (False, True) if block % 2 == 0 else (True, False):
            folder = workdir / f"competition-{block}-{'busy' if competing else 'idle'}"
            if competing:
                with competing_process():
                    times, _ = run_block(config, data, HOOKS_HDF5, steps, folder)
            else:
                times, _ = run_block(config, data, HOOKS_HDF5, steps, folder)
            samples[competing] += times
    return statistics.median(samples[False]), statistics.median(samples[True])


def measure_competition(
    config: RunConfig,
    data: ImageData,
    steps: int,
    blocks: int,
    workdir: Path,
    *,
    grid: tuple[GridJob, tuple[int, ...], tuple[str, ...]] | None = None,
    grid_idle: GridTiming | None = None,
) -> CompetitionResult:
    """`grid`: (job, worker counts, extra options) to run with the competitor too, None to skip it;
    `grid_idle`: the idle timing already measured (the workers part), else it is measured here."""
    step_idle, step_busy = step_idle_and_competing(config, data, steps, blocks, workdir)
    grid_busy = None
    if grid is not None:
        job, counts, extra = grid
        if grid_idle is None:
            grid_idle = time_grid(job, counts, workdir, "idle", extra)
        with competing_process():
            grid_busy = time_grid(job, counts, workdir, "competing", extra)
    return CompetitionResult(step_idle, step_busy, grid_idle if grid is not None else None, grid_busy)
