"""The cumulative ActNorm init over M minibatches against M plain forward passes: time and peak memory."""

from __future__ import annotations

import multiprocessing
import resource
import time

import torch

from flowdiag.bench.processes import in_fresh_process, sync
from flowdiag.bench.results import InitCost
from flowdiag.glow.model import Glow, dequantize
from flowdiag.runtime.environment import resolve_device
from flowdiag.settings.config import RunConfig
from flowdiag.stabilize.cumulative_init import cumulative_init
from flowdiag.train.data import ImageData


def _measure(config_json: str, data: ImageData, m: int, mode: str) -> tuple[float, int]:
    """Seconds and peak bytes of the cumulative init over M minibatches (`init`), or of M plain no-grad
    forward passes through an already initialized model (`forward`). Peak bytes: on CUDA the max
    allocated, on CPU the growth of this process's peak RSS (0 when it stayed below its start-up peak)."""
    config = RunConfig.from_json(config_json)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
        cumulative_init(model, batches[:1])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    with torch.no_grad():
        if mode == "init":
            cumulative_init(model, batches)
        else:
            for x in batches:
                model(x)
    sync(device)
    seconds = time.perf_counter() - began
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated(device)
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) * 1024


def _measure_apart(config: RunConfig, data: ImageData, m: int, mode: str) -> tuple[float, int]:
    # CPU: spawned, because a forked child inherits its parent's peak RSS, which would hide the growth.
    cpu = resolve_device(config.train.device).type == "cpu"
    context = multiprocessing.get_context("spawn") if cpu else None
    return in_fresh_process(_measure, config.to_json(), data, m, mode, context=context)


def init_cost(config: RunConfig, data: ImageData, m: int) -> InitCost:
    """Each measurement in its own fresh process, so its peak memory belongs to it alone."""
    init_s, init_peak = _measure_apart(config, data, m, "init")
    forward_s, forward_peak = _measure_apart(config, data, m, "forward")
    return InitCost(m, init_s, forward_s, int(init_peak), int(forward_peak))
