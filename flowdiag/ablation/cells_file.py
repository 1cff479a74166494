"""OUT/cells.json: each cell's state as the runner last saw it, for `flowdiag watch`, which must not
read Optuna's database (or import optuna).

Format 1: {"format": 1, "study": name, "kind": "ablation" | "tune-lambda", "updated": unix time,
"running": trials RUNNING in the study, "cells": {run folder name: waiting | running | done |
interrupted | failed}}.

Every process that changes a cell's state (the launcher at start-up and at the end, each worker
when it claims or finishes a trial) rewrites the whole file from the study. A lock serializes
read-then-write, so the last file written holds the latest reading; the file itself is replaced
atomically (temp file, fsync, rename, fsync of the folder), so a reader sees the old or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from flowdiag.runtime.files import CELLS_FILE

FORMAT = 1
LOCK_FILE = ".cells.lock"  # beside the cells file; never read

Snapshot = tuple[dict[str, str], int]  # cells -> state, RUNNING trials


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: writers may interleave; each file is still whole
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole: a temp file in the same folder, flushed and fsynced, renamed over it,
    then the folder fsynced so that the rename itself survives a crash."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o644)  # mkstemp makes it private; it is as readable as the run files
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def publish(out: Path, study: str, kind: str, read: Callable[[], Snapshot]) -> None:
    """Read the study's cells (under the lock) and write the cells file.

    The file only informs `watch`: a write that fails (a full disk) is said on stderr and the cells
    go on; the study holds the truth.
    """
    if not out.is_dir():
        return
    try:
        _publish(out, study, kind, read)
    except OSError as error:
        print(f"warning: cannot write {out / CELLS_FILE} ({error.strerror}); watch may lag", file=sys.stderr)


def _publish(out: Path, study: str, kind: str, read: Callable[[], Snapshot]) -> None:
    with _locked(out):
        cells, running = read()
        body = {
            "format": FORMAT,
            "study": study,
            "kind": kind,
            "updated": time.time(),
            "running": running,
            "cells": cells,
        }
        write_atomically(out / CELLS_FILE, json.dumps(body, indent=1) + "\n")
