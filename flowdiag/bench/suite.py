"""`run_bench`: the chosen parts of `flowdiag bench`, on one configuration, in one temporary folder."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from flowdiag.bench import small_grid
from flowdiag.bench.competition import measure_competition
from flowdiag.bench.extra_costs import data_parallel, inverse_cost
from flowdiag.bench.init_cost import init_cost
from flowdiag.bench.library import foreign_overhead, library_overhead
from flowdiag.bench.parts import MODEL_PARTS, BenchSettings
from flowdiag.bench.results import BenchResult, WorkersResult
from flowdiag.bench.scale import measure_scale
from flowdiag.bench.steps import time_steps
from flowdiag.bench.sync_check import check_syncs
from flowdiag.bench.workers import worker_startup
from flowdiag.glow.model import Glow, validate_model_config
from flowdiag.runtime.cores import cpu_count
from flowdiag.runtime.environment import configure_threads, resolve_device
from flowdiag.settings.config import RunConfig, validate_config
from flowdiag.train.data import load_dataset


def run_bench(config: RunConfig, settings: BenchSettings | None = None) -> BenchResult:
    """Measure the parts `settings.parts` names on `config`'s model, data and device.

    This process never touches CUDA: every measurement on the device runs in a child, so children
    fork (`process_context`) and the worker start-up it reports is the one `flowdiag ablate` gets.
    The scale part needs no model: alone, it loads neither the data nor the model.
    """
    s = settings or BenchSettings()
    s.check()
    validate_config(config)
    with tempfile.TemporaryDirectory(prefix="flowdiag-bench-") as tmp:
        work = Path(tmp)
        if set(s.parts) & set(MODEL_PARTS):
            result = _model_parts(config, s, work)
        else:
            result = BenchResult("-", 0, 0, configure_threads(config.train.threads), s.parts)
        if "scale" in s.parts:
            (work / "scale").mkdir()
            scale = measure_scale(
                s.scale_steps, s.scale_layers, s.scale_folder_runs, s.scale_folder_steps, work / "scale"
            )
            result = replace(result, scale=scale)
    return result


def _model_parts(config: RunConfig, s: BenchSettings, work: Path) -> BenchResult:
    device = resolve_device(config.train.device)
    # As `ablate`'s launcher: one thread pool setting before any fork (children inherit it).
    threads = configure_threads(config.train.threads)
    data = load_dataset(config.data)
    config = replace(
        config, model=replace(config.model, in_channels=data.channels, image_size=data.image_size)
    )
    validate_model_config(config.model)
    n_parameters = sum(p.numel() for p in Glow(config.model).parameters())
    result = BenchResult(str(device), n_parameters, config.train.batch_size, threads, s.parts)
    job = small_grid.main_job(s.grid_steps) if s.grid_steps > 0 else None
    counts = small_grid.worker_counts(cpu_count())
    extra = small_grid.passthrough_args(config)
    if "steps" in s.parts:
        steps = time_steps(config, data, s.timed_steps, s.blocks, work)
        result = replace(result, steps=steps, sync=check_syncs(config, data, work))
    if "init" in s.parts:
        result = replace(result, init=tuple(init_cost(config, data, m) for m in s.init_ms))
    if "workers" in s.parts:
        startup = worker_startup(config, data, s.startup_repeats, work)
        grid = small_grid.time_grid(job, counts, work, "idle", extra) if job is not None else None
        result = replace(result, workers=WorkersResult(startup, grid))
    if "competition" in s.parts:
        competition = measure_competition(
            config,
            data,
            s.timed_steps,
            s.blocks,
            work,
            grid=(job, counts, extra) if job is not None else None,
            grid_idle=result.workers.grid if result.workers is not None else None,
        )
        result = replace(result, competition=competition)
    if "library" in s.parts:
        library = library_overhead(config, data, s.timed_steps, s.blocks, work)
        foreign = foreign_overhead(config, data, s.timed_steps, s.blocks, work)
        result = replace(result, library=library, foreign=foreign)
    if "inverse" in s.parts:
        result = replace(result, inverse=inverse_cost(config, data, s.timed_steps, work))
    if "ddp" in s.parts:
        result = replace(result, data_parallel=data_parallel(config, data, s.nproc, s.ddp_steps, work))
    return result
