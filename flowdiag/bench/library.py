"""`flowdiag.Monitor` on flows flowdiag does not own, on the bench's data: a normflows multiscale Glow
and a hand-written Glow in y0ast's style (`threaded_glow`, found by adapter="auto" as the accumulated
convention). Each training step (zero_grad, forward, backward, [monitor.step], Adam) is timed without
and with the Monitor, in blocks that alternate, in one fresh process per model."""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from flowdiag.bench.processes import in_fresh_process, sync
from flowdiag.bench.results import LibraryOverhead
from flowdiag.bench.threaded_glow import ThreadedGlow
from flowdiag.bench.zoo import normflows_glow
from flowdiag.glow.model import dequantize
from flowdiag.record.monitor import Monitor
from flowdiag.runtime.environment import resolve_device
from flowdiag.settings.config import RunConfig
from flowdiag.stabilize.cumulative_init import cumulative_init
from flowdiag.train.data import ImageData

MODEL = "normflows multiscale Glow"
FOREIGN = "hand-written Glow (y0ast style)"
INIT_BATCHES = 16  # Algorithm 1 over 16 minibatches: without it, batch-1 runs go NaN within steps
WARMUP_STEPS = 5
Loss = Callable[[nn.Module, Tensor], Tensor]


def _normflows_loss(model: nn.Module, x: Tensor) -> Tensor:
    return model.forward_kld(x)  # type: ignore[operator]


def _threaded_loss(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)[1].mean()  # bits per dimension, as y0ast's training loop


def _build(name: str, config: RunConfig, data: ImageData) -> tuple[nn.Module, Loss]:
    m = config.model
    if name == MODEL:
        return normflows_glow(
            m.n_levels, m.n_steps, data.channels, data.image_size, m.hidden
        ), _normflows_loss
    # Levels the image size allows: each halves it, as the bench's own Glow.
    levels = min(m.n_levels, int(math.log2(data.image_size)))
    return ThreadedGlow(data.channels, levels, m.n_steps, m.hidden), _threaded_loss


def _timed_blocks(
    model: nn.Module,
    loss_of: Loss,
    batch: Callable[[], Tensor],
    config: RunConfig,
    steps: int,
    blocks: int,
    folder: str,
) -> tuple[list[float], list[float], int]:
    """Step times without and with the Monitor, blocks alternating; and the layers it records."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)

    def one_step(monitor: Monitor | None) -> None:
        x = batch()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, x)
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

    off: list[float] = []
    on: list[float] = []
    n_layers = 0
    flush = {"flush_every": config.train.flush_every, "flush_seconds": config.train.flush_seconds}
    for block in range(blocks):
        for attached in (False, True) if block % 2 == 0 else (True, False):
            if not attached:
                off += timed(None)
                continue
            with Monitor(model, Path(folder) / f"block{block}", **flush) as monitor:
                on += timed(monitor)
                n_layers = len(monitor.layer_names)
    return off, on, n_layers


def _library_child(
    name: str, config_json: str, data: ImageData, steps: int, blocks: int, folder: str
) -> LibraryOverhead:
    config = RunConfig.from_json(config_json)
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    model, loss_of = _build(name, config, data)
    model = model.to(device)
    generator = torch.Generator().manual_seed(config.train.seed)

    def batch() -> Tensor:
        index = torch.randint(len(data.train), (config.train.batch_size,), generator=generator)
        return dequantize(data.train[index].to(device), config.data.n_bits)

    cumulative_init(model, [batch() for _ in range(INIT_BATCHES)])
    off, on, n_layers = _timed_blocks(model, loss_of, batch, config, steps, blocks, folder)
    return LibraryOverhead(
        name, True, n_layers=n_layers, off_s=statistics.median(off), on_s=statistics.median(on)
    )


def normflows_installed() -> bool:
    return importlib.util.find_spec("normflows") is not None


def _measured(
    name: str, config: RunConfig, data: ImageData, steps: int, blocks: int, folder: Path
) -> LibraryOverhead:
    result = in_fresh_process(_library_child, name, config.to_json(), data, steps, blocks, str(folder))
    if not (math.isfinite(result.off_s) and math.isfinite(result.on_s)):
        raise RuntimeError(f"the library bench measured no steps: {result}")
    return result


def library_overhead(
    config: RunConfig, data: ImageData, steps: int, blocks: int, workdir: Path
) -> LibraryOverhead:
    """The Monitor's overhead on the normflows Glow, blocks with and without it alternating, in one
    fresh process (the model and its optimizer carry on across blocks); or, without normflows, a
    result that says how to install it."""
    if not normflows_installed():
        return LibraryOverhead(MODEL, False, note="normflows is not installed: pip install 'flowdiag[libs]'")
    return _measured(MODEL, config, data, steps, blocks, workdir / "library")


def foreign_overhead(
    config: RunConfig, data: ImageData, steps: int, blocks: int, workdir: Path
) -> LibraryOverhead:
    """The same on the hand-written Glow (no library needed), at the configuration's batch size, K, L
    and width: `flowdiag bench --parts library --steps-per-level 8` gives the README's K = 8 figure."""
    return _measured(FOREIGN, config, data, steps, blocks, workdir / "foreign")
