"""The run file's layout (dataset names, dtypes, chunks) and the HDF5 helpers both sides share."""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from flowdiag.runtime.errors import UserError

STATUSES = ("running", "completed", "diverged", "interrupted", "failed")
LAYER_KINDS = ("actnorm", "invconv", "coupling", "split", "other")  # the adapters' LayerKind, in the file
PHASES = ("init", "train")  # the ActNorm init, then the steps (it stays "train" once the run ended)
# 2: layers/pixels, steps/wall_time and the total_steps / phase attributes.
# 3: layers/ran (which layers ran in the step) and steps/forwards (training forwards a row covers).
# Files of versions 1 and 2 still read.
FORMAT_VERSION = 3

_SCALARS = ("loss", "bpd", "penalty", "grad_norm", "lr")  # steps/<name>, float64, (T,)
_WALL_TIME = "steps/wall_time"  # seconds since the run started, resumed runs continuing the clock
_FORWARDS = "steps/forwards"  # int32: training forwards the row covers (gradient accumulation: several)
# layers/<name>, (T, N). `ran` is False where a layer did not run in the step (a partial forward, a
# skipped branch): its max_abs and logdet are then NaN, and it is neither finite nor non-finite.
_LAYER_ARRAYS = {"max_abs": np.float32, "logdet": np.float32, "nonfinite": np.bool_, "ran": np.bool_}
# What every version has; later versions add the optional ones (`_step_datasets` says which a file has).
_STEP_DATASETS = (
    "steps/step",
    *(f"steps/{s}" for s in _SCALARS),
    *(f"layers/{a}" for a in _LAYER_ARRAYS if a != "ran"),
)
_OPTIONAL_STEP_DATASETS = (_WALL_TIME, _FORWARDS, "layers/ran")

_EVAL_DATASETS = ("eval/step", "eval/bpd")
_INIT_FLOATS = ("log_scale_min", "log_scale_max", "min_input_var")
_INIT_INTS = ("n_values", "pixels")  # pixels: h·w of the ActNorm's input (-1 unknown, format 1)
_REQUIRED_ATTRS = ("config", "status", "nan_onset_step", "nan_onset_layer")
# Unix time the run started (optional: files from before it have none). Export adds steps/wall_time to it,
# so a run imported long after it ran keeps its own dates.
_START_TIME = "start_time"
_REQUIRED = (*_STEP_DATASETS, *_EVAL_DATASETS, "layers/name", "layers/kind")

# Each flush writes its rows, makes HDF5 write everything out (f.flush()), and only then raises the
# counts in this attribute, int64 (step rows, eval rows, inverse rows, init entries). A reader reads no
# more than it says: a kill inside a flush that starts a new chunk could leave a dataset's length on disk
# ahead of its chunk index (rows read as zeros) or of the file's recorded end (unreadable): 2 of 200 such
# kills in a stress test, none of 300 with the counts.
_COMMITTED = "committed"
STEPS, EVALS, INVERSE, INIT = 0, 1, 2, 3
# Attributes a flush changes are written in place (`_update`): integers, and text at a fixed width. A
# variable-length string lives in the file's global heap and moves at each change, which a kill inside
# that flush left pointing past the file's end: 9 of 250 kills left the status, phase, onset or init
# unreadable, none of 300 at a fixed width (the init: see RunWriter._replace_init).
_MIN_TEXT_WIDTH = 64

# Growing datasets are chunked but not compressed, so that a SIGKILL at any moment leaves a readable file.
# A compressed chunk changes size when a flush rewrites it, so HDF5 moves it and frees the old space, and
# the same open may hand that space to another dataset's chunk before the index that still points there
# is written. In a stress test, 14 of 160 kills mid-flush left a dataset reading another's bytes and half
# of 360 left an unreadable file; uncompressed, none of 320 did. An uncompressed chunk is rewritten in
# place, so its index entry never moves. gzip saved only 11 %: 791 against 889 kB at 2,000 digits steps.
# At 300,000 steps × 288 layers (2,948 bytes a step, 885 MB) the 64-row chunks cost reads little: a
# pass over every row a block at a time took 0.46 s, against 0.34 s with 4,096-row 1-D and 256-row 2-D
# chunks, and a 50-row flush 2.9 ms against 3.2 ms; not worth re-running the crash measurements for.
# float16 per-layer series would save 1,152 bytes a step but cannot hold what matters: in diverging
# runs 7 to 25 % of the finite max |output| values near the onset were past its 65,504 (up to 1e13).
_CHUNK_ROWS = 64
_STRING = h5py.string_dtype("utf-8")
# What a flush reserves on disk beyond its rows (`_reserve`): room for the chunk index, the object
# headers and HDF5's 2 kB allocation blocks. A 50-row flush of 288 layers needs about 150 kB for its rows.
_RESERVE_MARGIN = 64 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# A reader that opened with HDF5's default locking holds a shared lock for as long as it reads;
# the writer waits for it rather than failing the run: 5 tries, the wait doubling, ~0.75 s in all.
_LOCK_TRIES = 5
_LOCK_WAIT_S = 0.05


def _reason(error: BaseException) -> str:
    """The short reason for an OSError or an h5py error (whose messages run to several clauses, the
    system's own reason inside: "... errno = 28, error message = 'No space left on device', ...")."""
    number = getattr(error, "errno", None)
    if number:
        return os.strerror(number)
    text = str(error)
    found = re.search(r"error message = '([^']+)'", text)
    if found:
        return found.group(1)
    return text.splitlines()[0] if text else type(error).__name__


def _as_os_error(error: BaseException) -> OSError:
    """The error as an OSError with its errno, read from an h5py message where h5py gives none (so a
    full disk inside HDF5 is still told as a full disk)."""
    number = getattr(error, "errno", None)
    if not number:
        found = re.search(r"errno = (\d+)", str(error))
        number = int(found.group(1)) if found else None
    return OSError(number, _reason(error))


def _unreadable(path: Path) -> str:
    return (
        f"{path} is not a readable HDF5 file (truncated or corrupt): "
        "re-run the training or point at another file"
    )


def _is_lock_error(error: OSError) -> bool:
    # Match HDF5's own wording: a bare "lock" would also match "sblock" in a truncated file's message.
    return isinstance(error, BlockingIOError) or "unable to lock file" in str(error).lower()


def _open_for_append(path: Path) -> h5py.File:
    """Open an existing file read-write ("r+": a deleted file must not be silently re-created empty).

    Without a chunk cache (rdcc_nbytes=0) each dataset write reaches the file inside the call that makes
    it, so a failed write raises there: with the cache, HDF5 wrote the chunks when the dataset object was
    freed, and h5py drops errors raised while freeing. On a full disk the writer then counted rows that
    never reached it (every step read back as 0), and the process ended with a segfault.
    """
    wait = _LOCK_WAIT_S
    for attempt in range(_LOCK_TRIES):
        try:
            return h5py.File(path, "r+", rdcc_nbytes=0)
        except OSError as error:
            if not _is_lock_error(error):
                raise
            if attempt == _LOCK_TRIES - 1:
                raise UserError(
                    f"{path} is locked by another process: is another run writing to the same --out?"
                ) from None
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def _reserve(path: Path, nbytes: int) -> None:
    """Claim `nbytes` of disk past the file's end before HDF5 writes there: on a full disk this raises
    OSError (ENOSPC) here, before a byte is written, rather than inside HDF5, which reports some write
    errors only while freeing objects (ignored) and can leave its own state broken. HDF5 allocates new
    space at the file's end and gives back what it did not use when it closes the file."""
    fallocate = getattr(os, "posix_fallocate", None)  # not on macOS: HDF5 meets a full disk itself there
    if fallocate is None:
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        fallocate(fd, os.fstat(fd).st_size, nbytes)
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise
        # A file system that cannot reserve (EINVAL, EOPNOTSUPP) still takes the writes.
    finally:
        os.close(fd)


def flush_room(n_layers: int, n_rows: int, n_evals: int, n_inverse: int, init: bool) -> int:
    """Bytes a flush may add to the file: its rows and whatever new chunks they start, at most (what
    `_reserve` claims first). Attributes alone are rewritten in place: 0."""
    if not (n_rows or n_evals or n_inverse or init):
        return 0
    step_row = 8 * 8 + 4 + n_layers * 10  # per _STEP_DATASETS' types (`bytes_per_step`)
    inverse_row = 8 * 3 + n_layers * 5 + 16 * n_layers
    room = (n_rows + 2 * _CHUNK_ROWS) * step_row if n_rows else 0
    room += (n_evals + 2 * _CHUNK_ROWS) * 16 if n_evals else 0
    room += (n_inverse + 2 * _CHUNK_ROWS) * inverse_row if n_inverse else 0
    room += 256 * (n_layers + 1) if init else 0
    return room + _RESERVE_MARGIN


def _flush_file(f: h5py.File) -> None:
    """Have HDF5 write out everything written so far (data, chunk index, file end): what the counts
    then say is on disk."""
    f.flush()


def _append(dataset: h5py.Dataset, start: int, block: np.ndarray) -> None:
    # Resize to start + n rather than grow by n: rows a killed flush left past `start` are overwritten.
    dataset.resize(start + len(block), axis=0)
    dataset[start:] = block


def _growing(group: h5py.Group, name: str, dtype: Any, n_columns: int | None = None) -> None:
    shape, maxshape, chunks = (0,), (None,), (_CHUNK_ROWS,)
    if n_columns is not None:
        shape, maxshape, chunks = (0, n_columns), (None, n_columns), (_CHUNK_ROWS, n_columns)
    group.create_dataset(name, shape=shape, maxshape=maxshape, chunks=chunks, dtype=dtype)


def _common_length(f: h5py.File, names: Sequence[str]) -> int:
    """Rows every dataset has: a reader that caught a flush half done sees only complete rows."""
    return min(f[name].shape[0] for name in names)


def _complete_rows(f: h5py.File, names: Sequence[str], part: int) -> int:
    """Rows of one part (STEPS, EVALS or INVERSE) that a flush finished writing: the common length, no
    more than the `committed` count (files from before it have only the common length)."""
    rows = _common_length(f, names)
    if _COMMITTED in f.attrs:
        rows = min(rows, int(f.attrs[_COMMITTED][part]))
    return rows


def _init_entries(f: h5py.File) -> int:
    """ActNorms the init record holds: 0 before the init, or while a flush was writing it."""
    if "init/name" not in f:
        return 0
    if _COMMITTED in f.attrs:
        return int(f.attrs[_COMMITTED][INIT])
    return len(f["init/name"])


def _create_text(f: h5py.File, name: str, value: str, width: int) -> None:
    """A text attribute a flush may change later: fixed-width UTF-8, so that `_update` writes it in place."""
    f.attrs.create(name, np.bytes_(value.encode()), dtype=h5py.string_dtype("utf-8", width))


def _update(f: h5py.File, name: str, value: str | int | Sequence[int]) -> None:
    """Change an attribute in place, its type and its place in the file kept (h5py's `attrs[name] = ...`
    makes a new one and deletes the old). A variable-length string, which files from before fixed widths
    have, or text past the width, is replaced instead."""
    if not isinstance(value, str):
        f.attrs.modify(name, value)
        return
    encoded = value.encode()
    stored = h5py.check_string_dtype(f.attrs.get_id(name).dtype) if name in f.attrs else None
    if stored is not None and stored.length is not None and len(encoded) <= stored.length:
        f.attrs.modify(name, encoded)
    else:
        f.attrs[name] = value


def _text(value: Any) -> str:
    """A text attribute as str, whether stored fixed-width (bytes) or variable-length (str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_width(names: Sequence[str]) -> int:
    """The width of a run file's changeable text attributes: room for any layer's name."""
    return max(_MIN_TEXT_WIDTH, *(len(name.encode()) for name in names))


def _step_datasets(f: h5py.File) -> tuple[str, ...]:
    """The per-step datasets this file has (version 1 has no wall clock, version 2 no forwards or ran)."""
    return (*_STEP_DATASETS, *(name for name in _OPTIONAL_STEP_DATASETS if name in f))


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [str(s) for s in dataset.asstr()[()]]


def _rows_through(steps: np.ndarray, last: int) -> int:
    """How many rows to keep: everything before the first step past `last` (steps grow within a run)."""
    past = np.flatnonzero(steps > last)
    return int(past[0]) if past.size else len(steps)


def _check_run(path: Path, f: h5py.File) -> None:
    if "flowdiag_version" not in f.attrs:
        raise UserError(
            f"{path} is an HDF5 file but not a flowdiag run (no flowdiag_version attribute): "
            "point at a run.h5 written by flowdiag"
        )
    found = int(f.attrs.get("format_version", FORMAT_VERSION))
    if found > FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {found}, newer than this flowdiag reads ({FORMAT_VERSION}): "
            "upgrade flowdiag"
        )
    missing = [n for n in _REQUIRED if n not in f] + [a for a in _REQUIRED_ATTRS if a not in f.attrs]
    if missing:
        raise UserError(f"{path} is an incomplete flowdiag run (no {missing[0]}): re-run the training")
