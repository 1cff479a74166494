"""Run one measurement in a fresh process and get its result back.

In one long-lived process step times drift upward from trainer to trainer (measured: 49 ms, then
83 ms for the same configuration), which would bill the drift to whichever setting ran second. So
every timed block runs in a process of its own. The bench's own process never touches CUDA, so
`process_context()` forks (no seconds of imports per block) and a child may still use the GPU.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import traceback
from collections.abc import Callable
from typing import Any

import torch

from flowdiag.runtime.environment import process_context


def sync(device: torch.device) -> None:
    """Wait for the device, so a timer around a step measures the step, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _child(target: Callable[..., Any], args: tuple[Any, ...], results: multiprocessing.Queue) -> None:
    try:
        results.put(("ok", target(*args)))
    except BaseException:  # a bug in the child: its traceback is the parent's error message
        results.put(("error", traceback.format_exc()))


def in_fresh_process(
    target: Callable[..., Any],
    *args: Any,
    context: multiprocessing.context.BaseContext | None = None,
) -> Any:
    """`target(*args)` in a new process (`process_context()` unless given); returns what it returns.

    `target` must be a module-level function and its result picklable (spawn pickles both)."""
    context = context or process_context()
    results = context.Queue()
    process = context.Process(target=_child, args=(target, args, results), daemon=True)
    process.start()
    try:
        while True:
            try:
                status, value = results.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not process.is_alive():  # died without a word: killed, or out of memory
                    raise RuntimeError(
                        f"bench child process {target.__name__} ended with exit code {process.exitcode}"
                    ) from None
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    if status == "error":
        raise RuntimeError(f"bench child process {target.__name__} failed:\n{value}")
    return value
