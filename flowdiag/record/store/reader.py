"""RunRecord and read_run: a run file read back, every failure a one-line UserError."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True, eq=False)
class RunRecord:
    """A run file read into memory. Step arrays have length T, layer arrays shape (T, N)."""

    path: Path
    version: str
    config: dict[str, Any]
    status: str
    phase: str  # "init" while the ActNorm init runs, then "train"
    total_steps: int  # the steps the run was set to make; -1 unknown
    nan_onset_step: int
    nan_onset_layer: str
    nan_onset_rank: int  # data-parallel runs: the rank that first saw the onset; -1 otherwise
    step: np.ndarray
    loss: np.ndarray
    bpd: np.ndarray
    penalty: np.ndarray
    grad_norm: np.ndarray
    lr: np.ndarray
    wall_time: np.ndarray  # seconds since the run started; NaN in files from before format 2
    layer_names: list[str]
    layer_kinds: list[str]
    layer_pixels: np.ndarray  # (N,) h·w each layer runs at; -1 where unknown
    max_abs: np.ndarray
    logdet: np.ndarray
    nonfinite: np.ndarray
    ran: np.ndarray  # (T, N) which layers ran in each step; before format 3, those with a measurement
    forwards: np.ndarray  # (T,) training forwards each row covers; 1 before format 3
    eval_step: np.ndarray
    eval_bpd: np.ndarray
    inverse: InverseRecord  # the inverse checks, one row per evaluation (empty before format 2)
    # Keys name (list[str]), log_scale_min, log_scale_max, min_input_var, n_values, pixels (h·w of the
    # ActNorm's input, -1 where a format-1 file does not say); None before the init.
    init: dict[str, np.ndarray | list[str]] | None

    def layer_index(self, kind: str) -> np.ndarray:
        """Column indices of the layers of one kind, in forward order."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")
        return np.array([i for i, k in enumerate(self.layer_kinds) if k == kind], dtype=np.intp)


def read_run(path: Path) -> RunRecord:
    """Read a run file, also while its run is still writing it. Bad files raise a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: check the path, or train a run there first")
    if path.is_dir():
        raise UserError(f"{path} is a folder: point at the run file (run.h5) inside it")
    try:
        # locking=False: a reader must never make the writer wait, nor wait for it.
        with h5py.File(path, "r", locking=False) as f:
            return _read(path, f)
    except PermissionError as error:
        raise UserError(f"cannot read {path} ({_reason(error)}): check its permissions") from None
    # What a damaged file raises depends on where the damage is: a bad type message gives ValueError.
    except (OSError, RuntimeError, KeyError, ValueError):
        raise UserError(_unreadable(path)) from None


def _read(path: Path, f: h5py.File) -> RunRecord:
    _check_run(path, f)
    try:
        config = json.loads(str(f.attrs["config"]))
    except json.JSONDecodeError:
        raise UserError(
            f"{path} has a config attribute that is not valid JSON: re-run the training"
        ) from None
    t = _complete_rows(f, _step_datasets(f), STEPS)
    names = _strings(f["layers/name"])
    e = _complete_rows(f, _EVAL_DATASETS, EVALS)
    init: dict[str, np.ndarray | list[str]] | None = None
    if _init_entries(f):
        group = f["init"]
        init = {"name": _strings(group["name"])}
        for key in (*_INIT_FLOATS, *_INIT_INTS):
            init[key] = group[key][()] if key in group else np.full(len(init["name"]), -1, np.int64)
    return RunRecord(
        path=path,
        version=str(f.attrs["flowdiag_version"]),
        config=config,
        status=_text(f.attrs["status"]),
        phase=_text(f.attrs.get("phase", "train")),
        total_steps=int(f.attrs.get("total_steps", -1)),
        nan_onset_step=int(f.attrs["nan_onset_step"]),
        nan_onset_layer=_text(f.attrs["nan_onset_layer"]),
        nan_onset_rank=int(f.attrs.get("nan_onset_rank", -1)),
        step=f["steps/step"][:t],
        **{name: f[f"steps/{name}"][:t] for name in _SCALARS},
        wall_time=f[_WALL_TIME][:t] if _WALL_TIME in f else np.full(t, np.nan),
        layer_names=names,
        layer_kinds=_strings(f["layers/kind"]),
        layer_pixels=f["layers/pixels"][()] if "layers/pixels" in f else np.full(len(names), -1, np.int64),
        **{name: f[f"layers/{name}"][:t] for name in _LAYER_ARRAYS if name != "ran"},
        ran=_ran(f, t),
        forwards=f[_FORWARDS][:t] if _FORWARDS in f else np.ones(t, np.int32),
        eval_step=f["eval/step"][:e],
        eval_bpd=f["eval/bpd"][:e],
        init=init,
        inverse=inverse_rows.read(f, len(names)),
    )


def _ran(f: h5py.File, t: int) -> np.ndarray:
    """layers/ran, or for a file from before it, the layers that hold a measurement or a flag."""
    if "layers/ran" in f:
        return f["layers/ran"][:t]
    with np.errstate(invalid="ignore"):
        return np.isfinite(f["layers/max_abs"][:t]) | f["layers/nonfinite"][:t]


def bytes_per_step(path: Path) -> int:
    """The bytes one step's row takes in a run file, read from its datasets' types and widths. The
    datasets are uncompressed, so this is what the file grows by per step (a chunk of rows at a time)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return sum(f[name].dtype.itemsize * int(np.prod(f[name].shape[1:])) for name in _step_datasets(f))
    except (OSError, RuntimeError, KeyError, ValueError):
        raise UserError(_unreadable(Path(path))) from None


def is_run_file(path: Path) -> bool:
    """Cheap check: an HDF5 file carrying the flowdiag_version attribute."""
    path = Path(path)
    try:
        if not path.is_file() or not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r", locking=False) as f:
            return "flowdiag_version" in f.attrs
    except (OSError, RuntimeError):
        return False
