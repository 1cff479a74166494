"""A run file read a block of steps at a time: its head (attributes, layers, counts) without its rows,
then any range of step rows. A long run (300,000 steps × 288 layers is 880 MB) is never read whole:
reports, watch and export hold one block, and what they keep is reduced from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from flowdiag.record.store import inverse_rows
from flowdiag.record.store.inverse_rows import InverseRecord
from flowdiag.record.store.layout import (
    _EVAL_DATASETS,
    _FORWARDS,
    _INIT_FLOATS,
    _INIT_INTS,
    _LAYER_ARRAYS,
    _SCALARS,
    _START_TIME,
    _WALL_TIME,
    EVALS,
    LAYER_KINDS,
    STEPS,
    _check_run,
    _complete_rows,
    _init_entries,
    _reason,
    _step_datasets,
    _strings,
    _text,
    _unreadable,
)
from flowdiag.runtime.errors import UserError

# A block's memory: 16 MB is about 5,500 rows of 288 layers (2.9 kB a row), read in 6 ms.
BLOCK_BYTES = 16 * 2**20
_FAILURES = (OSError, RuntimeError, KeyError, ValueError)  # what h5py raises on a damaged file


class RunHead(NamedTuple):
    """Everything a run file says apart from its rows: read in milliseconds at any run length."""

    path: Path
    version: str
    config: dict[str, Any]
    status: str
    phase: str  # "init" while the ActNorm init runs, then "train"
    total_steps: int  # the steps the run was set to make; -1 unknown
    nan_onset_step: int
    nan_onset_layer: str
    nan_onset_rank: int  # data-parallel runs: the rank that first saw the onset; -1 otherwise
    layer_names: list[str]
    layer_kinds: list[str]
    layer_pixels: np.ndarray  # (N,) h·w each layer runs at; -1 where unknown
    n_rows: int  # complete step rows
    last_step: int  # the step of the last row; 0 when there is none
    start_time: float  # unix time the run started; NaN in files from before it was recorded

    def layer_index(self, kind: str) -> np.ndarray:
        """Column indices of the layers of one kind, in forward order."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")
        return np.array([i for i, k in enumerate(self.layer_kinds) if k == kind], dtype=np.intp)


class StepBlock(NamedTuple):
    """Consecutive step rows from row `start`: per-step arrays (n,), per-layer arrays (n, N)."""

    start: int
    step: np.ndarray
    loss: np.ndarray
    bpd: np.ndarray
    penalty: np.ndarray
    grad_norm: np.ndarray
    lr: np.ndarray
    wall_time: np.ndarray  # seconds since the run started; NaN in files from before format 2
    forwards: np.ndarray  # training forwards each row covers; 1 before format 3
    max_abs: np.ndarray
    logdet: np.ndarray
    nonfinite: np.ndarray
    ran: np.ndarray  # which layers ran; before format 3, those with a measurement or a flag


def block_rows(n_layers: int, budget_bytes: int = BLOCK_BYTES, multiple: int = 1) -> int:
    """Rows per block for a memory budget, a multiple of `multiple` (a reducer's bucket)."""
    per_row = 8 * 8 + 4 + n_layers * sum(np.dtype(t).itemsize for t in _LAYER_ARRAYS.values())
    rows = max(budget_bytes // per_row, 1)
    return max(rows // multiple, 1) * multiple


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """h5py's failures while reading become the one-line UserError a damaged file deserves."""
    try:
        yield
    except PermissionError as error:
        raise UserError(f"cannot read {path} ({_reason(error)}): check its permissions") from None
    # What a damaged file raises depends on where the damage is: a bad type message gives ValueError.
    except _FAILURES:
        raise UserError(_unreadable(path)) from None


class RunFile:
    """An open run file (`open_run`): its head, then its rows a block at a time."""

    def __init__(self, path: Path, f: h5py.File) -> None:
        self.path = path
        self._f = f
        with _reading(path):
            _check_run(path, f)
            self.head = _head(path, f)

    def rows(self, start: int, stop: int) -> StepBlock:
        """Rows [start, stop) of the complete rows."""
        f, t = self._f, self.head.n_rows
        start, stop = max(0, min(start, t)), max(0, min(stop, t))
        stop = max(stop, start)
        with _reading(self.path):
            return StepBlock(
                start,
                f["steps/step"][start:stop],
                *(f[f"steps/{name}"][start:stop] for name in _SCALARS),
                wall_time=f[_WALL_TIME][start:stop] if _WALL_TIME in f else np.full(stop - start, np.nan),
                forwards=f[_FORWARDS][start:stop] if _FORWARDS in f else np.ones(stop - start, np.int32),
                max_abs=f["layers/max_abs"][start:stop],
                logdet=f["layers/logdet"][start:stop],
                nonfinite=f["layers/nonfinite"][start:stop],
                ran=_ran(f, start, stop),
            )

    def blocks(self, rows: int | None = None, start: int = 0) -> Iterator[StepBlock]:
        """The rows from `start` on, `rows` at a time (default: BLOCK_BYTES' worth)."""
        rows = rows or block_rows(len(self.head.layer_names))
        for first in range(start, self.head.n_rows, rows):
            yield self.rows(first, first + rows)

    def tail(self, rows: int) -> StepBlock:
        """The last `rows` rows (fewer when the run has fewer)."""
        return self.rows(self.head.n_rows - rows, self.head.n_rows)

    def evals(self) -> tuple[np.ndarray, np.ndarray]:
        """(eval/step, eval/bpd): one row per held-out evaluation, a few hundred at most."""
        with _reading(self.path):
            e = _complete_rows(self._f, _EVAL_DATASETS, EVALS)
            return self._f["eval/step"][:e], self._f["eval/bpd"][:e]

    def inverse(self) -> InverseRecord:
        with _reading(self.path):
            return inverse_rows.read(self._f, len(self.head.layer_names))

    def init(self) -> dict[str, np.ndarray | list[str]] | None:
        """The ActNorm init record (keys as RunRecord.init); None before the init."""
        with _reading(self.path):
            if not _init_entries(self._f):
                return None
            group = self._f["init"]
            init: dict[str, np.ndarray | list[str]] = {"name": _strings(group["name"])}
            for key in (*_INIT_FLOATS, *_INIT_INTS):
                init[key] = group[key][()] if key in group else np.full(len(init["name"]), -1, np.int64)
            return init


@contextmanager
def open_run(path: Path) -> Iterator[RunFile]:
    """Open a run file for reading, also while its run is still writing it; never locks, so a reader
    never makes the writer wait. Bad files raise a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: check the path, or train a run there first")
    if path.is_dir():
        raise UserError(f"{path} is a folder: point at the run file (run.h5) inside it")
    with _reading(path):
        f = h5py.File(path, "r", locking=False)
    try:
        yield RunFile(path, f)
    finally:
        with _reading(path):
            f.close()


def read_head(path: Path) -> RunHead:
    """The head of a run file alone."""
    with open_run(path) as run:
        return run.head


def read_evals(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(eval/step, eval/bpd) of a run file, without reading its step rows."""
    with open_run(path) as run:
        return run.evals()


def _head(path: Path, f: h5py.File) -> RunHead:
    try:
        config = json.loads(str(f.attrs["config"]))
    except json.JSONDecodeError:
        raise UserError(
            f"{path} has a config attribute that is not valid JSON: re-run the training"
        ) from None
    names = _strings(f["layers/name"])
    t = _complete_rows(f, _step_datasets(f), STEPS)
    return RunHead(
        path=path,
        version=str(f.attrs["flowdiag_version"]),
        config=config if isinstance(config, dict) else {},
        status=_text(f.attrs["status"]),
        phase=_text(f.attrs.get("phase", "train")),
        total_steps=int(f.attrs.get("total_steps", -1)),
        nan_onset_step=int(f.attrs["nan_onset_step"]),
        nan_onset_layer=_text(f.attrs["nan_onset_layer"]),
        nan_onset_rank=int(f.attrs.get("nan_onset_rank", -1)),
        layer_names=names,
        layer_kinds=_strings(f["layers/kind"]),
        layer_pixels=f["layers/pixels"][()] if "layers/pixels" in f else np.full(len(names), -1, np.int64),
        n_rows=t,
        last_step=int(f["steps/step"][t - 1]) if t else 0,
        start_time=float(f.attrs.get(_START_TIME, math.nan)),
    )


def _ran(f: h5py.File, start: int, stop: int) -> np.ndarray:
    """layers/ran, or for a file from before it, the layers that hold a measurement or a flag."""
    if "layers/ran" in f:
        return f["layers/ran"][start:stop]
    with np.errstate(invalid="ignore"):
        return np.isfinite(f["layers/max_abs"][start:stop]) | f["layers/nonfinite"][start:stop]
