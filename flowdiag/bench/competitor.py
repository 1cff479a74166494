"""One competing CPU-bound process that the bench starts and stops itself: a pure-Python busy loop,
as a test suite or another job on a shared machine would be. It shows whether flowdiag's throughput
collapses when it has to share the cores (OpenMP threads spinning against a busy core did, 2x to 100x)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager

from flowdiag.runtime.environment import process_context


def _spin(started: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event) -> None:
    started.set()
    while not stop.is_set():
        for _ in range(100_000):  # ~ms of pure bytecode between checks: the core stays busy
            pass


@contextmanager
def competing_process(
    context: multiprocessing.context.BaseContext | None = None,
) -> Iterator[multiprocessing.process.BaseProcess]:
    """A busy process for the duration of the block; it is running when the block starts."""
    context = context or process_context()
    started, stop = context.Event(), context.Event()
    process = context.Process(target=_spin, args=(started, stop), daemon=True)
    process.start()
    try:
        if not started.wait(timeout=60):
            raise RuntimeError("the competing process did not start within 60 s")
        yield process
    finally:
        stop.set()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
