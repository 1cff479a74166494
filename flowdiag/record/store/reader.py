"""RunRecord and read_run: a whole run file in memory, for short runs and for tests.

Long runs are read a block at a time (`scan.open_run`): a 300,000-step run of 288 layers is 880 MB,
which `read_run` would hold at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from flowdiag.record.store.inverse_rows import InverseRecord
from flowdiag.record.store.layout import LAYER_KINDS, _step_datasets, _unreadable
from flowdiag.record.store.scan import RunHead, StepBlock, open_run
from flowdiag.runtime.errors import UserError


@dataclass(frozen=True, eq=False)
class RunRecord:
    """A run file read into memory: the fields of its RunHead, of one StepBlock of every row (step arrays
    length T, layer arrays (T, N)), its evaluations, inverse checks and init."""

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
    n_rows: int
    last_step: int  # 0: no row
    start_time: float  # unix time the run started; NaN unknown
    step: np.ndarray
    loss: np.ndarray
    bpd: np.ndarray
    penalty: np.ndarray
    grad_norm: np.ndarray
    lr: np.ndarray
    wall_time: np.ndarray  # seconds since the run started; NaN in files from before format 2
    forwards: np.ndarray  # (T,) training forwards each row covers; 1 before format 3
    max_abs: np.ndarray
    logdet: np.ndarray
    nonfinite: np.ndarray
    ran: np.ndarray  # (T, N) which layers ran in each step; before format 3, those with a measurement
    eval_step: np.ndarray
    eval_bpd: np.ndarray
    inverse: InverseRecord  # the inverse checks, one row per evaluation (empty before format 2)
    # Keys name (list[str]), log_scale_min, log_scale_max, min_input_var, n_values, pixels (h·w of the
    # ActNorm's input, -1 where a format-1 file does not say); None before the init.
    init: dict[str, np.ndarray | list[str]] | None

    @property
    def head(self) -> RunHead:
        return RunHead(**{name: getattr(self, name) for name in RunHead._fields})

    @property
    def rows(self) -> StepBlock:
        """Every row as one block."""
        return StepBlock(0, *(getattr(self, name) for name in StepBlock._fields[1:]))

    def layer_index(self, kind: str) -> np.ndarray:
        """Column indices of the layers of one kind, in forward order."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")
        return np.array([i for i, k in enumerate(self.layer_kinds) if k == kind], dtype=np.intp)


# Each field of RunRecord comes from its head, its rows or the rest of the file, named alike.
_REST = ("eval_step", "eval_bpd", "inverse", "init")
assert [f.name for f in fields(RunRecord)] == [*RunHead._fields, *StepBlock._fields[1:], *_REST]


def read_run(path: Path) -> RunRecord:
    """Read a whole run file, also while its run is still writing it. Bad files raise a one-line UserError."""
    with open_run(path) as run:
        rows = run.rows(0, run.head.n_rows)
        return record_of(run.head, rows, run.evals(), run.inverse(), run.init())


def record_of(
    head: RunHead,
    rows: StepBlock,
    evals: tuple[np.ndarray, np.ndarray],
    inverse: InverseRecord,
    init: dict[str, np.ndarray | list[str]] | None,
) -> RunRecord:
    """A RunRecord of its parts: what a run file holds, or what a test or an importer builds."""
    steps = {name: getattr(rows, name) for name in StepBlock._fields[1:]}
    return RunRecord(
        **head._asdict(), **steps, eval_step=evals[0], eval_bpd=evals[1], inverse=inverse, init=init
    )


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
