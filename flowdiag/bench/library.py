"""`flowdiag.Monitor` on a library's flow: a normflows multiscale Glow on the bench's data, its training
step (zero_grad, forward_kld, backward, [monitor.step], Adam) timed without and with the Monitor."""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from pathlib import Path

import torch

from flowdiag.bench.processes import in_fresh_process, sync
from flowdiag.bench.results import LibraryOverhead
from flowdiag.bench.zoo import normflows_glow
from flowdiag.glow.model import dequantize
from flowdiag.record.monitor import Monitor
from flowdiag.runtime.environment import resolve_device
from flowdiag.settings.config import RunConfig
from flowdiag.stabilize.cumulative_init import cumulative_init
from flowdiag.train.data import ImageData

MODEL = "normflows multiscale Glow"
INIT_BATCHES = 16  # Algorithm 1 over 16 minibatches: without it, batch-1 runs go NaN within steps
WARMUP_STEPS = 5


def _library_child(
    config_json: str, data: ImageData, steps: int, blocks: int, folder: str
) -> LibraryOverhead:
    config = RunConfig.from_json(config_json)
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    m = config.model
    model = normflows_glow(m.n_levels, m.n_steps, data.channels, data.image_size, m.hidden).to(device)
    generator = torch.Generator().manual_seed(config.train.seed)

    def batch() -> torch.Tensor:
        index = torch.randint(len(data.train), (config.train.batch_size,), generator=generator)
        return dequantize(data.train[index].to(device), config.data.n_bits)

    cumulative_init(model, [batch() for _ in range(INIT_BATCHES)])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)

    def one_step(monitor: Monitor | None) -> None:
        x = batch()
        optimizer.zero_grad(set_to_none=True)
        loss = model.forward_kld(x)
        loss.backward()
        if monitor is not None:
            monitor.step(loss)
        optimizer.step()

    def timed(monitor: Monitor | None) -> list[float]:
        for _ in range(WARMUP_STEPS):
            one_step(monitor)
        times = []
        for _ in range(steps):
            sync(device)
            began = time.perf_counter()
            one_step(monitor)
            sync(device)
            times.append(time.perf_counter() - began)
        return times

    samples: dict[bool, list[float]] = {False: [], True: []}
    n_layers = 0
    for block in range(blocks):
        for attached in (False, True) if block % 2 == 0 else (True, False):
            if not attached:
                samples[False] += timed(None)
                continue
            flush = {"flush_every": config.train.flush_every, "flush_seconds": config.train.flush_seconds}
            with Monitor(model, Path(folder) / f"block{block}", **flush) as monitor:
                samples[True] += timed(monitor)
                n_layers = len(monitor.layer_names)
    return LibraryOverhead(
        MODEL,
        True,
        n_layers=n_layers,
        off_s=statistics.median(samples[False]),
        on_s=statistics.median(samples[True]),
    )


def normflows_installed() -> bool:
    return importlib.util.find_spec("normflows") is not None


def library_overhead(
    config: RunConfig, data: ImageData, steps: int, blocks: int, workdir: Path
) -> LibraryOverhead:
    """The Monitor's overhead on the normflows Glow, blocks with and without it alternating, in one
    fresh process (the model and its optimizer carry on across blocks); or, without normflows, a
    result that says how to install it."""
    if not normflows_installed():
        return LibraryOverhead(MODEL, False, note="normflows is not installed: pip install 'flowdiag[libs]'")
    result = in_fresh_process(_library_child, config.to_json(), data, steps, blocks, str(workdir / "library"))
    if not (math.isfinite(result.off_s) and math.isfinite(result.on_s)):
        raise RuntimeError(f"the library bench measured no steps: {result}")
    return result
