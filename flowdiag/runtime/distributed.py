"""Data parallelism on torch.distributed: ranks, Algorithm 1 across them, and the per-step record.

`flowdiag train` under `torchrun` (or `launch` below, which tests and `ablate --nproc-per-cell` use)
runs one rank per process: DistributedDataParallel over `nccl` on GPUs, `gloo` on CPU; no
communication of our own beyond the collectives here.
- Algorithm 1 across ranks: every rank accumulates its ActNorm sums over its own M minibatches, one
  all-reduce adds them (float64), and every replica finalizes the same sigma and tau: the init sees
  M x world minibatches for the memory of one.
- The record: the one per-step row is reduced across ranks before the one host copy (max of max
  |output|, mean of loss and log-dets, and which ranks saw a non-finite value); rank 0 writes it.
- A rank that dies makes the others' next collective fail within the process group's timeout, and
  the run ends `failed` instead of hanging.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flowdiag.runtime.errors import UserError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks()


def from_environment() -> Ranks:
    """What torchrun (or `launch`) says about this process; a plain run is rank 0 of 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers: start ranks with torchrun"
        ) from None
    return Ranks(rank, world, local) if world > 1 else SINGLE


def start(ranks: Ranks, device: torch.device, timeout_s: float) -> None:
    """Join the process group (a no-op for a single process). MASTER_ADDR/MASTER_PORT come from torchrun."""
    if not ranks.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, rank=ranks.rank, world_size=ranks.world, timeout=timedelta(seconds=timeout_s)
    )


# What a collective says when another rank died or went silent (gloo, NCCL and the TCP store).
_LOST_PEER = (
    "timed out",
    "timeout",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "communicator was aborted",
    "connection refused",
)


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank is gone or silent, rather
    than an error of this rank's own (a bug, a full disk, a CUDA fault): only the first is relabelled
    "another rank stopped answering"."""
    if isinstance(error, dist.DistNetworkError | dist.DistStoreError):
        return True
    if not isinstance(error, dist.DistError) and "gloo" not in str(error).lower():
        return False  # a RuntimeError of this rank's own computation, not of a collective
    return any(pattern in str(error).lower() for pattern in _LOST_PEER)


def first_line(error: BaseException, width: int = 160) -> str:
    """An error's first line, cut to `width` characters: what fits in a one-line message."""
    lines = str(error).strip().splitlines()
    return lines[0][:width] if lines else type(error).__name__


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


Pool = Callable[[list[Tensor]], None]  # sums accumulators over data-parallel ranks, in place


def pool(tensors: list[Tensor]) -> None:
    """Sum `tensors` over every rank, in place (ActNorm accumulators: float64 sums, int64 counts)."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def no_pool(tensors: list[Tensor]) -> None:
    """This process's accumulators alone: a single process, or ranks that initialize independently."""


def reduce_layer_row(
    ranks: Ranks, scalars: Tensor, low: Tensor, high: Tensor, logdet: Tensor, local: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step's row across ranks, on the device, in two collectives.

    scalars (mean: loss, bpd, penalty; the gradient norm is the same on every rank after DDP's
    all-reduce), per-layer output min and max (max |output| over ranks), per-layer log-det (mean).
    A non-finite value on any rank survives: NaN would not through max, so non-finite entries are
    counted per layer and turn the result non-finite. Returns the same layout with low = -max |output|
    and high = max |output|, plus (world,) flags: which ranks saw a non-finite value in what is their
    own, the layers and the first `local` scalars (the gradient, all-reduced by DDP, is everyone's).
    """
    bad = ~(torch.isfinite(low) & torch.isfinite(high) & torch.isfinite(logdet))
    flags = torch.zeros(ranks.world, dtype=scalars.dtype, device=scalars.device)
    flags[ranks.rank] = (bad.any() | ~torch.isfinite(scalars[:local]).all()).to(scalars.dtype)
    summed = torch.cat(
        [scalars, torch.nan_to_num(logdet, nan=0.0, posinf=0.0, neginf=0.0), bad.to(scalars.dtype), flags]
    )
    magnitude = torch.maximum(high, -low).nan_to_num(nan=math.inf)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(magnitude, op=dist.ReduceOp.MAX)
    k, n = scalars.numel(), logdet.numel()
    scalars = summed[:k] / ranks.world
    bad_anywhere = summed[k + n : k + 2 * n] > 0
    logdet = torch.where(bad_anywhere, torch.full_like(logdet, math.nan), summed[k : k + n] / ranks.world)
    magnitude = torch.where(
        bad_anywhere & torch.isfinite(magnitude), torch.full_like(magnitude, math.inf), magnitude
    )
    return scalars, -magnitude, magnitude, logdet, summed[k + 2 * n :]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (checkpoints: each rank's RNG state), on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    fn(*args)
    # The rank's work is done and its files closed: end here, as a forked process does, without the
    # interpreter's shutdown, where torch's Gloo teardown once aborted a finished rank (SIGABRT,
    # "terminate called without an active exception": 1 clean-clone suite run of about 15).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> list[int]:
    """Run `fn(*args)` as `nproc` ranks on this machine, what torchrun does (tests, `ablate
    --nproc-per-cell`); returns their exit codes. Every rank runs to its own end: a rank that dies is
    not a reason to kill the others, whose process-group timeout ends them as `failed`."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a rank starts with no torch state inherited
    port = free_port()
    processes = [
        context.Process(target=_rank_entry, args=(rank, nproc, port, fn, args)) for rank in range(nproc)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return [int(process.exitcode or 0) for process in processes]


class _LogDensity(torch.nn.Module):
    """The model's log-density as a module's forward: DistributedDataParallel syncs gradients for what
    runs through its forward, and Glow trains on `log_prob`, not on `forward`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.log_prob(x)


def data_parallel(model: torch.nn.Module, device: torch.device) -> Callable[[Tensor], Tensor]:
    """`model.log_prob` under DDP: gradients averaged over ranks in buckets during the backward.

    Buffers are not re-broadcast each step: ActNorm's are identical on every rank after the pooled
    init and never change in training.
    """
    from torch.nn.parallel import DistributedDataParallel

    # The folded coupling convs give 1x1 conv weights (C, C, 1, 1) gradients whose strides differ from
    # the bucket's only along the size-1 dimensions: the same memory layout, so nothing to warn about.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # Newer torch names `broadcast_buffers=False` deprecated in favour of `forward_sync_buffers`, which
    # older releases lack; the buffers here never need a sync, so the old name says it on every torch.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_LogDensity(model), device_ids=ids, broadcast_buffers=False)
