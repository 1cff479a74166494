"""A new run file: its whole layout made under a hidden name, then put in place in one step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from flowdiag.record.store import inverse_rows
from flowdiag.record.store.layout import (
    _COMMITTED,
    _FORWARDS,
    _LAYER_ARRAYS,
    _RESERVE_MARGIN,
    _SCALARS,
    _START_TIME,
    _STRING,
    _WALL_TIME,
    FORMAT_VERSION,
    LAYER_KINDS,
    _check_run,
    _create_text,
    _growing,
    _reason,
    _reserve,
    _text_width,
)
from flowdiag.runtime.errors import UserError


@dataclass(frozen=True)
class RunHeader:
    """What a new run file says before its first row."""

    config_json: str
    version: str
    names: list[str]  # the flow layers, forward order
    kinds: list[str]
    pixels: list[int]  # h·w each layer runs at, -1 unknown
    total_steps: int  # -1 unknown
    start_time: float  # unix time the run started


def create_run_file(path: Path, header: RunHeader, *, overwrite: bool) -> None:
    """Write a run file with no rows. A kill meanwhile leaves at most a hidden partial file next to
    `path`, never a run file that does not open; without `overwrite` an existing file stays untouched."""
    # Checked before touching anything, so a refused overwrite leaves the old file byte for byte.
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: refusing to overwrite it; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {path} ({_reason(error)}): choose another --out") from None
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        _reserve_new(partial)
        with h5py.File(partial, "w") as f:
            _layout(f, header)
        _verify(partial)
        _put_in_place(partial, path, overwrite)
    except FileExistsError:  # created by someone else since the check above
        raise UserError(f"{path} already exists: refusing to overwrite it; choose another --out") from None
    except (OSError, RuntimeError, UserError) as error:
        reason = _reason(error) if isinstance(error, OSError) else "its layout did not read back"
        raise UserError(f"cannot create {path} ({reason}): free disk space or choose another --out") from None
    finally:
        partial.unlink(missing_ok=True)


def _layout(f: h5py.File, header: RunHeader) -> None:
    names = header.names
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["flowdiag_version"] = header.version
    f.attrs["config"] = header.config_json
    width = _text_width(names)
    _create_text(f, "status", "running", width)
    _create_text(f, "phase", "init", width)
    f.attrs["total_steps"] = int(header.total_steps)
    f.attrs[_START_TIME] = float(header.start_time)
    f.attrs["nan_onset_step"] = -1
    _create_text(f, "nan_onset_layer", "", width)
    f.attrs["nan_onset_rank"] = -1
    f.attrs[_COMMITTED] = np.zeros(4, np.int64)
    steps = f.create_group("steps")
    _growing(steps, "step", np.int64)
    for name in _SCALARS:
        _growing(steps, name, np.float64)
    _growing(steps, _WALL_TIME.split("/")[1], np.float64)
    _growing(steps, _FORWARDS.split("/")[1], np.int32)
    layers = f.create_group("layers")
    layers.create_dataset("name", data=names, dtype=_STRING)
    layers.create_dataset("kind", data=header.kinds, dtype=_STRING)
    layers.create_dataset("pixels", data=np.asarray(header.pixels, dtype=np.int64))
    for name, dtype in _LAYER_ARRAYS.items():
        _growing(layers, name, dtype, n_columns=len(names))
    f.create_group("init")  # filled by write_init; made now so that the root's links never change
    evals = f.create_group("eval")
    _growing(evals, "step", np.int64)
    _growing(evals, "bpd", np.float64)
    inverse_rows.create(f, names, header.kinds, width)


def _reserve_new(partial: Path) -> None:
    """Fail on a full disk before HDF5 writes anything (see layout._reserve): an empty run file of a few
    hundred layers takes well under the margin. h5py's "w" gives the room back as it starts the file."""
    partial.touch()
    _reserve(partial, _RESERVE_MARGIN)


def _verify(partial: Path) -> None:
    """A write error HDF5 met while making the file may have gone unreported: read it back first."""
    with h5py.File(partial, "r", locking=False) as f:
        _check_run(partial, f)


def _put_in_place(partial: Path, path: Path, overwrite: bool) -> None:
    """Give `partial` the name `path` in one step; without `overwrite`, only if `path` does not exist."""
    if overwrite:
        os.replace(partial, path)
        return
    try:
        os.link(partial, path)  # FileExistsError if it exists: the check and the naming are one step
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name, then put the file there
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(partial, path)


def check_settings(
    names: list[str], kinds: list[str], pixels: list[int], flush_every: int, flush_seconds: float
) -> None:
    """A writer's layers and flush settings, checked before a file exists (ValueError)."""
    if flush_every < 1:
        raise ValueError(f"flush_every must be at least 1, got {flush_every}")
    if not flush_seconds > 0:
        raise ValueError(f"flush_seconds must be positive, got {flush_seconds}")
    if not names or len(names) != len(kinds) or len(pixels) != len(names):
        raise ValueError(
            f"need one kind and one h·w per layer and at least one layer; got {len(names)} names, "
            f"{len(kinds)} kinds, {len(pixels)} h·w"
        )
    unknown = sorted(set(kinds) - set(LAYER_KINDS))
    if unknown:
        raise ValueError(f"unknown layer kinds {unknown}; expected one of {LAYER_KINDS}")
