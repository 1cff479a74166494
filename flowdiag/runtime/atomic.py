"""Files put in place whole: a crash, a kill or a full disk never leaves half a file or a stray one.

The content is written beside the target under a temporary name, flushed and fsynced, renamed over
the target, and the folder fsynced, so that after a power cut the folder holds either the old file
or the new one, complete. A write that fails removes its temporary file and, where the cause is the
file system (a full disk, a folder that went away), raises a one-line UserError that names the
path and the fix; the target keeps what it held.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from flowdiag.runtime.errors import os_error_in, write_error


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(handle)` on a temporary file beside `path`, then put it in place whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException as error:  # a signal mid-write too: no temporary file stays behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = os_error_in(error)
        if cause is None or not isinstance(error, Exception):
            raise
        raise write_error(path, cause) from None


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it is on disk (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: folders are not opened; its renames are durable by other means
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
