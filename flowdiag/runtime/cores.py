"""How many worker processes: the cores this process may use, and `--workers`. Free of torch, so that a
bad `--workers` is refused before anything heavy loads."""

from __future__ import annotations

import os

from flowdiag.runtime.errors import UserError


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_workers(text: str) -> int | None:
    """`--workers`: None for auto, else the positive count given.

    >>> parse_workers("auto"), parse_workers("3")
    (None, 3)
    """
    if text.strip().lower() == "auto":
        return None
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise UserError(f"--workers {text!r}: pass auto or a positive integer, e.g. --workers 2")
    return workers


def resolve_workers(text: str, jobs_left: int, per_worker: int = 1) -> int:
    """`--workers auto` (min(jobs left, cores / processes per job), at least one) or a positive integer."""
    given = parse_workers(text)
    if given is None:
        return max(1, min(jobs_left, cpu_count() // per_worker))
    return given
