"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a one-line message and exit code 2; everything else is a bug and keeps
its traceback. A file that cannot be written (a full disk, a folder that went away) is one of
these too: the run stops where its files agree with each other, and the message says how to go on.
"""

from __future__ import annotations

import errno
from pathlib import Path

# A full disk, a spent quota, a file past the size limit: freeing space (or room) is the fix.
_FULL = tuple(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name))


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


def write_error(path: Path, error: OSError, holds: str | None = None) -> UserError:
    """The one line for a file that could not be written: which file, why, what it still holds (a run
    file that keeps its committed rows), and how to go on.

    >>> import errno
    >>> full = OSError(errno.ENOSPC, "No space left on device")
    >>> print(write_error(Path("run.h5"), full, holds="the steps up to 50"))  # doctest: +NORMALIZE_WHITESPACE
    cannot write run.h5 (No space left on device; the file holds the steps up to 50, each exact):
    free space on that disk, then rerun the same command with --resume
    """
    why = error.strerror or str(error) or type(error).__name__
    if holds is not None:
        why += f"; the file holds {holds}, each exact"
    if error.errno in _FULL:
        fix = "free space on that disk, then rerun the same command with --resume"
    else:
        fix = "check that its folder exists and is writable, then rerun the same command with --resume"
    return UserError(f"cannot write {path} ({why}): {fix}")


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`, itself or along its causes (torch's writer raises a RuntimeError
    whose context is the file's OSError); None when the file system is not what failed."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
