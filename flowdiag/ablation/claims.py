"""Which process runs a trial: the claim record a worker writes on its trial, and whether the process
it names is certainly gone.

Optuna's heartbeat tells, after a grace period, that a trial's worker stopped beating; on the machine
that ran it we can tell at once. The record names the host, its boot and the process (pid and start
time, so a reused pid is not taken for the worker): a rerun on the same machine fails a dead
worker's trial immediately instead of waiting for its heartbeat to go stale.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

CLAIM_ATTR = "worker"  # the trial user attribute holding the record


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: liveness is then left to the heartbeat
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so count from its end.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def this_worker() -> dict[str, Any]:
    """The claim record of the calling process."""
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": os.getpid(),
        "start": _start_ticks(os.getpid()),
    }


def worker_gone(record: Any) -> bool:
    """True only when the record names a process of this machine, since its last boot, that no longer
    runs (or was a process with another start time). Anything unsure is False: left to the heartbeat."""
    if not isinstance(record, dict) or not record.get("boot"):
        return False
    mine = this_worker()
    if record.get("host") != mine["host"]:
        return False
    if record["boot"] != mine["boot"]:
        return True  # this machine rebooted since: every process of that boot is gone
    pid, start = record.get("pid"), record.get("start")
    if not isinstance(pid, int) or start is None:
        return False
    return _start_ticks(pid) != start
