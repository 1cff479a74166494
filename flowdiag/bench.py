"""`flowdiag bench`: what diagnostics and the cumulative init cost on this device and model size.

- step time with diagnostics off and on (median over blocks that alternate off/on, each block in a
  fresh process), and the overhead in %;
- cumulative ActNorm init time and peak memory for several M, against M plain forward passes;
- HDF5 bytes per recorded step.
Benchmarks are commands, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flowdiag.config import RunConfig
from flowdiag.data import ImageData, load_dataset
from flowdiag.environment import resolve_device
from flowdiag.files import RUN_FILE
from flowdiag.init import cumulative_actnorm_init
from flowdiag.model import Glow, dequantize
from flowdiag.trainer import Trainer


@dataclass(frozen=True)
class StepTiming:
    median_off_s: float
    median_on_s: float

    @property
    def overhead_percent(self) -> float:
        return 100.0 * (self.median_on_s - self.median_off_s) / self.median_off_s


@dataclass(frozen=True)
class InitCost:
    m: int
    init_s: float
    forward_s: float  # M plain no-grad forward passes
    init_peak_bytes: int  # CUDA: max allocated; CPU: growth of the process's peak RSS
    forward_peak_bytes: int


@dataclass(frozen=True)
class BenchResult:
    device: str
    n_parameters: int
    steps: StepTiming
    init: list[InitCost]
    hdf5_bytes_per_step: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_times(trainer: Trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(trainer.device)
        start = time.perf_counter()
        trainer.one_step()
        _sync(trainer.device)
        times.append(time.perf_counter() - start)
    return times


def _timed_block(
    config_json: str, data: ImageData, steps: int, workdir: str, queue: multiprocessing.Queue
) -> None:
    """One block in a fresh process: warm up, time `steps` steps, report times and HDF5 growth."""
    config = RunConfig.from_json(config_json)
    trainer = Trainer(config, Path(workdir), data=data)
    trainer.open()
    _step_times(trainer, 5)  # warm-up, not counted
    trainer.monitor.flush()
    size_before = (trainer.out_dir / RUN_FILE).stat().st_size
    times = _step_times(trainer, steps)
    trainer.monitor.close()
    queue.put((times, (trainer.out_dir / RUN_FILE).stat().st_size - size_before))


def time_steps(
    config: RunConfig, data: ImageData, steps: int, blocks: int, workdir: Path
) -> tuple[StepTiming, float]:
    """Median step time off/on, and HDF5 bytes per step of the diagnostics-on runs.

    Each block runs in its own fresh process, off and on alternating: in one long-lived process
    step times drift upward from trainer to trainer (measured: 49 ms, then 83 ms for the same
    configuration), which would bill the drift to whichever setting ran second.
    """
    context = multiprocessing.get_context("spawn")
    samples: dict[bool, list[float]] = {False: [], True: []}
    grown = 0
    for block in range(blocks):
        for diagnostics in (False, True) if block % 2 == 0 else (True, False):
            cfg = replace(
                config,
                train=replace(
                    config.train, diagnostics=diagnostics, flush_every=steps + 5, flush_seconds=1e9
                ),
            )
            queue = context.Queue()
            folder = str(workdir / f"block{block}_diagnostics_{diagnostics}")
            process = context.Process(target=_timed_block, args=(cfg.to_json(), data, steps, folder, queue))
            process.start()
            times, size = queue.get()
            process.join()
            samples[diagnostics] += times
            if diagnostics:
                grown += size
    timing = StepTiming(statistics.median(samples[False]), statistics.median(samples[True]))
    return timing, grown / (steps * blocks)


def _measure(config: RunConfig, data: ImageData, m: int, mode: str) -> tuple[float, int]:
    """Seconds and CUDA peak bytes of the cumulative init over M minibatches (`init`), or of M plain
    no-grad forward passes through an already initialized model (`forward`)."""
    device = resolve_device(config.train.device)
    torch.manual_seed(0)
    model = Glow(config.model).to(device)
    order = torch.randperm(len(data.train))
    b = config.train.batch_size
    batches = []
    for i in range(m):
        start = (i * b) % len(order)
        batches.append(dequantize(data.train[order[start : start + b]].to(device), config.data.n_bits))
    if mode == "forward":
        cumulative_actnorm_init(model, batches[:1])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    with torch.no_grad():
        if mode == "init":
            cumulative_actnorm_init(model, batches)
        else:
            for x in batches:
                model(x)
    _sync(device)
    seconds = time.perf_counter() - began
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _cpu_worker(config_json: str, data: ImageData, m: int, mode: str, queue: multiprocessing.Queue) -> None:
    """One measurement in a fresh process, so its peak RSS belongs to that measurement alone."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, _ = _measure(RunConfig.from_json(config_json), data, m, mode)
    queue.put((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) * 1024))


def _measure_anywhere(config: RunConfig, data: ImageData, m: int, mode: str) -> tuple[float, int]:
    if resolve_device(config.train.device).type == "cuda":
        return _measure(config, data, m, mode)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_cpu_worker, args=(config.to_json(), data, m, mode, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def init_cost(config: RunConfig, data: ImageData, m: int) -> InitCost:
    init_s, init_peak = _measure_anywhere(config, data, m, "init")
    forward_s, forward_peak = _measure_anywhere(config, data, m, "forward")
    return InitCost(m, init_s, forward_s, int(init_peak), int(forward_peak))


def run_bench(
    config: RunConfig, *, steps: int = 20, blocks: int = 4, init_ms: tuple[int, ...] = (1, 16, 256)
) -> BenchResult:
    data = load_dataset(config.data)
    model_cfg = replace(config.model, in_channels=data.channels, image_size=data.image_size)
    config = replace(config, model=model_cfg)
    with tempfile.TemporaryDirectory(prefix="flowdiag-bench-") as tmp:
        timing, bytes_per_step = time_steps(config, data, steps, blocks, Path(tmp))
    n_parameters = sum(p.numel() for p in Glow(model_cfg).parameters())
    costs = [init_cost(config, data, m) for m in init_ms]
    return BenchResult(str(resolve_device(config.train.device)), n_parameters, timing, costs, bytes_per_step)
