"""Where and how a run executes: the device, CPU threads and worker processes, and turning
SIGINT/SIGTERM into a clean stop.

Parallelism comes from processes, not threads. On the small models this project trains, a second
intra-op thread bought at most 1.47x on an idle 2-core machine (126 -> 86 ms per step at 3x32x32,
K = 8, L = 3, width 128), and with any other process running it made torch 2x to 100x slower
(OpenMP threads spinning against each other). So each process runs one intra-op thread unless told
otherwise, and N cells run as N processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from flowdiag.runtime.distributed import SINGLE, Ranks
from flowdiag.runtime.errors import UserError


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads; returns the number in force.

    requested > 0: that many. 0 (auto): what OMP_NUM_THREADS says when it holds a positive whole
    number, else one.
    """
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    from_env = int(text) if text.isdigit() and int(text) > 0 else 0
    torch.set_num_threads(requested or from_env or 1)
    return torch.get_num_threads()


def configure_launcher() -> None:
    """The process that launches workers only waits for them: one thread, whatever the environment
    says. An OpenMP thread pool that exists when a process forks leaves the child hanging at its first
    parallel region (seen: OMP_NUM_THREADS set, every forked worker stuck), so none may exist."""
    torch.set_num_threads(1)


def process_context() -> multiprocessing.context.BaseContext:
    """Fork where it is safe (Linux, CUDA not yet initialized): a forked worker inherits the parent's
    imports and data and is ready at once, where a spawned one spends seconds importing torch.
    """
    forkable = not torch.cuda.is_initialized() and torch.get_num_threads() == 1  # see configure_launcher
    if "fork" in multiprocessing.get_all_start_methods() and forkable:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def end_with_parent() -> None:
    """In a worker: be terminated when the launcher dies (Linux), so a killed `ablate` leaves no
    orphan training on; its trials' heartbeats stop and a rerun queues their cells again."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible here; use --device cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported: use auto, cpu or cuda[:N]")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"--device {name}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    return device


def place(device: str, threads: int = 0, ranks: Ranks = SINGLE) -> torch.device:
    """Where this process computes: torch's intra-op threads (`configure_threads`) and the device,
    one GPU per rank on a node (cuda:LOCAL_RANK where `device` names no index)."""
    configure_threads(threads)
    resolved = resolve_device(device)
    if ranks.enabled and resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", ranks.local_rank)
    return resolved


@contextmanager
def stop_on_signals() -> Iterator[dict[str, str]]:
    """SIGINT/SIGTERM end the run after the current step (status `interrupted`), never mid-write."""
    request: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        request["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
