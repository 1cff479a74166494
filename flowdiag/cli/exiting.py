"""How the `flowdiag` process ends after a file that could not be written: one line, its exit code,
no crash.

When HDF5 fails to close a file (a full disk: closing must write the file's metadata), the library
keeps the file open (h5py#914); every h5py object of it then reports "Can't decrement id ref count"
as it is freed, and at interpreter exit HDF5's own shutdown closes the file again and crashes
(a segmentation fault, exit 139). The failed write has already been reported as one line (a
UserError naming the path and the fix), so those reports are dropped, and a process that still
holds such a file ends at once with its own exit code instead of running that shutdown.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _hdf5_finalizer_error(error: BaseException | None) -> bool:
    """An h5py object freed after its file failed to close: already reported as the write error."""
    return isinstance(error, RuntimeError) and "decrement id ref count" in str(error)


def drop_hdf5_finalizer_errors() -> None:
    """Keep `_hdf5_finalizer_error`s off stderr, handing everything else on. h5py's finalizer reports
    through both hooks: Cython prints the traceback (sys.excepthook), then the unraisable note.
    Call it once the app runs: typer installs its own excepthook when called. Idempotent."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def unraisable_hook(report: Any) -> None:
        if not _hdf5_finalizer_error(report.exc_value):
            unraisable(report)

    def exception_hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        if not _hdf5_finalizer_error(error):
            excepthook(kind, error, traceback)

    if not getattr(unraisable, _OURS, False):
        setattr(unraisable_hook, _OURS, True)
        sys.unraisablehook = unraisable_hook
    if not getattr(excepthook, _OURS, False):
        setattr(exception_hook, _OURS, True)
        sys.excepthook = exception_hook


_OURS = "_flowdiag_drops_hdf5_finalizer_errors"


def hdf5_files_left_open() -> int:
    """How many HDF5 files the library still holds open (0 unless h5py is loaded and a close failed:
    flowdiag opens its run files only for the length of a flush or a read)."""
    h5py = sys.modules.get("h5py")
    if h5py is None:
        return 0
    return len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE))


def exit_past_hdf5(code: int) -> None:
    """With an HDF5 file left open, end the process now with `code` (streams flushed), skipping the
    interpreter's shutdown, where HDF5 would crash; otherwise return."""
    if not hdf5_files_left_open():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code(end: SystemExit) -> int:
    """The status a SystemExit ends the process with."""
    if end.code is None:
        return 0
    return end.code if isinstance(end.code, int) else 1
