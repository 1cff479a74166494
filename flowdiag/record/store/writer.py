"""RunWriter: buffers rows and opens the file only to flush them."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
from numpy.typing import ArrayLike

from flowdiag.record.store import inverse_rows
from flowdiag.record.store.create import RunHeader, create_run_file
from flowdiag.record.store.layout import (
    _COMMITTED,
    _EVAL_DATASETS,
    _INIT_FLOATS,
    _INIT_INTS,
    _STRING,
    _WALL_TIME,
    EVALS,
    LAYER_KINDS,
    PHASES,
    STATUSES,
    STEPS,
    _append,
    _check_run,
    _complete_rows,
    _init_entries,
    _open_for_append,
    _reason,
    _rows_through,
    _step_datasets,
    _strings,
    _text,
    _unreadable,
    _update,
)
from flowdiag.record.store.rows import StepRows
from flowdiag.runtime.errors import UserError


class RunWriter:
    """Appends one run's record to its HDF5 file, opening the file only for the length of a flush.

    Rows reach the file every `flush_every` steps or `flush_seconds` after the last flush, whichever
    comes first: a reader sees a new run within seconds, and a long run pays one open per block.
    """

    def __init__(
        self,
        path: Path,
        *,
        config_json: str,
        version: str,
        layer_names: Sequence[str],
        layer_kinds: Sequence[str],
        layer_pixels: Sequence[int] | None = None,
        total_steps: int = -1,
        flush_every: int = 50,
        flush_seconds: float = 2.0,
        overwrite: bool = False,
    ) -> None:
        path = Path(path)
        names, kinds = list(layer_names), list(layer_kinds)
        pixels = [-1] * len(names) if layer_pixels is None else [int(p) for p in layer_pixels]
        if flush_every < 1:  # checked here too, so that a bad value creates no file
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
        header = RunHeader(config_json, version, names, kinds, pixels, total_steps)
        create_run_file(path, header, overwrite=overwrite)
        self._setup(path, names, flush_every, flush_seconds, n_steps=0, n_evals=0, status=("running", -1, ""))

    @classmethod
    def open_existing(
        cls, path: Path, *, flush_every: int = 50, flush_seconds: float = 2.0, total_steps: int | None = None
    ) -> RunWriter:
        """Continue appending to a run file (`--resume`); follow with `truncate_after(checkpoint_step)`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"{path} does not exist: cannot resume without the run file; start the run afresh"
            )
        try:
            with _open_for_append(path) as f:
                _check_run(path, f)
                if _WALL_TIME not in f:
                    raise UserError(
                        f"{path} was written by an older flowdiag (format 1) and cannot be resumed: "
                        "start the run afresh in another --out"
                    )
                names = _strings(f["layers/name"])
                n_steps = _complete_rows(f, _step_datasets(f), STEPS)
                n_evals = _complete_rows(f, _EVAL_DATASETS, EVALS)
                n_inverse = inverse_rows.rows_on_disk(f)
                n_init = _init_entries(f)
                inverse_onset = (
                    int(f.attrs.get("reverse_onset_step", -1)),
                    _text(f.attrs.get("reverse_onset_layer", "")),
                )
                status = (
                    _text(f.attrs["status"]),
                    int(f.attrs["nan_onset_step"]),
                    _text(f.attrs["nan_onset_layer"]),
                )
                clock = float(f[_WALL_TIME][n_steps - 1]) if n_steps else 0.0
                if total_steps is not None:
                    _update(f, "total_steps", int(total_steps))
        except (OSError, RuntimeError, KeyError, ValueError):
            raise UserError(_unreadable(path)) from None
        writer = cls.__new__(cls)
        writer._setup(
            path, names, flush_every, flush_seconds, n_steps=n_steps, n_evals=n_evals, status=status
        )
        writer._clock_offset = clock
        writer._n_inverse_disk = n_inverse
        writer._n_init_disk = n_init
        writer._inverse_onset = inverse_onset
        return writer

    def _setup(
        self,
        path: Path,
        names: list[str],
        flush_every: int,
        flush_seconds: float,
        *,
        n_steps: int,
        n_evals: int,
        status: tuple[str, int, str],
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}")
        self.path = path
        self.layer_names = names
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._n_disk, self._n_evals_disk = n_steps, n_evals
        self._started = self._last_flush = time.monotonic()
        self._clock_offset = 0.0  # a resumed run's clock continues from its last row
        self._rows = StepRows(len(names), flush_every)
        self._evals: list[tuple[int, float]] = []
        self._inverse: list[inverse_rows.InverseRow] = []
        self._n_inverse_disk = 0
        self._n_init_disk = 0
        self._inverse_onset = (-1, "")
        self._init: dict[str, Any] | None = None
        self._status, self._onset_step, self._onset_layer = status
        self._phase: str | None = None  # None: unchanged since the file was opened
        self._onset_rank: int | None = None  # None: unchanged since the file was opened
        self._attrs_dirty = False

    @property
    def n_steps(self) -> int:
        """Step rows so far, written and buffered."""
        return self._n_disk + self._rows.n

    @property
    def status(self) -> str:
        return self._status

    # --- recording -------------------------------------------------------------------------------

    def append_step(
        self,
        step: int,
        *,
        loss: float,
        bpd: float,
        penalty: float,
        grad_norm: float,
        lr: float,
        max_abs: ArrayLike,
        logdet: ArrayLike,
        nonfinite: ArrayLike,
        ran: ArrayLike | None = None,
        forwards: int = 1,
    ) -> None:
        """Buffer one step's row; the block goes to the file every `flush_every` rows or `flush_seconds`.

        `ran`: which layers ran in the step (default all); `forwards`: the training forwards the row
        covers (several under gradient accumulation).
        """
        n = len(self.layer_names)
        per_layer = {
            "max_abs": np.asarray(max_abs),
            "logdet": np.asarray(logdet),
            "nonfinite": np.asarray(nonfinite),
            "ran": np.ones(n, bool) if ran is None else np.asarray(ran),
        }
        for name, values in per_layer.items():
            if values.shape != (n,):
                raise ValueError(f"{name} has shape {values.shape}; expected ({n},), one value per layer")
        now = time.monotonic()
        wall_time = self._clock_offset + now - self._started
        self._rows.add(step, wall_time, forwards, (loss, bpd, penalty, grad_norm, lr), per_layer)
        if self._rows.n == self.flush_every or now - self._last_flush >= self.flush_seconds:
            self.flush()

    def append_eval(self, step: int, bpd: float) -> None:
        """Buffer one held-out evaluation; it reaches the file with the next flush of the steps."""
        self._evals.append((int(step), float(bpd)))

    def append_inverse(self, row: inverse_rows.InverseRow, onset: tuple[int, str]) -> None:
        """Buffer one evaluation's inverse check; `onset`: the inverse's first non-finite (step, layer)
        so far, (-1, "") while none. It reaches the file with the next flush."""
        self._inverse.append(row)
        if onset != self._inverse_onset:
            self._inverse_onset = onset
            self._attrs_dirty = True

    def write_init(
        self,
        names: Sequence[str],
        log_scale_min: ArrayLike,
        log_scale_max: ArrayLike,
        min_input_var: ArrayLike,
        n_values: ArrayLike,
        pixels: ArrayLike | None = None,
    ) -> None:
        """Record the ActNorm init statistics (one entry per ActNorm), written at once."""
        init: dict[str, Any] = {"name": [str(n) for n in names]}
        for key, values in zip(_INIT_FLOATS, (log_scale_min, log_scale_max, min_input_var), strict=True):
            init[key] = np.asarray(values, dtype=np.float64)
        init["n_values"] = np.asarray(n_values, dtype=np.int64)
        init["pixels"] = np.asarray(
            np.full(len(init["name"]), -1) if pixels is None else pixels, dtype=np.int64
        )
        for key, values in init.items():
            if len(values) != len(init["name"]) or (key != "name" and values.ndim != 1):
                raise ValueError(
                    f"init {key} has {len(values)} entries; expected {len(init['name'])}, one per name"
                )
        self._init = init
        self.flush()

    def set_status(self, status: str, *, onset_step: int = -1, onset_layer: str = "") -> None:
        """Set the run's status and NaN onset; flushed at once, with any buffered rows."""
        self._set_status(status, onset_step, onset_layer)
        self.flush()

    def set_phase(self, phase: str) -> None:
        """`init` while the ActNorm init runs, `train` from the first step on; flushed at once."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        self._phase = phase
        self._attrs_dirty = True
        self.flush()

    def set_onset_rank(self, rank: int) -> None:
        """The data-parallel rank that first saw the onset (the lowest, when several did at once)."""
        self._onset_rank = int(rank)
        self._attrs_dirty = True

    def _set_status(self, status: str, onset_step: int, onset_layer: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {STATUSES}")
        self._status, self._onset_step, self._onset_layer = status, int(onset_step), str(onset_layer)
        self._attrs_dirty = True

    # --- the file --------------------------------------------------------------------------------

    @contextmanager
    def _opened(self) -> Iterator[h5py.File]:
        try:
            with _open_for_append(self.path) as f:
                yield f
        except OSError as error:
            raise UserError(
                f"cannot write {self.path} ({_reason(error)}): was it moved, or is the disk full? "
                "Choose another --out"
            ) from None

    def flush(self) -> None:
        """Write everything buffered (rows, evaluations, init, status) in one open of the file."""
        if not (self._rows.n or self._evals or self._inverse or self._init is not None or self._attrs_dirty):
            return
        with self._opened() as f:
            n = self._rows.n
            if n:
                for name, block in self._rows.blocks():
                    if name in f:  # a file of an older version resumed: it keeps its own datasets
                        _append(f[name], self._n_disk, block)
            if self._evals:
                steps, bpds = zip(*self._evals, strict=True)
                _append(f["eval/bpd"], self._n_evals_disk, np.array(bpds, dtype=np.float64))
                _append(f["eval/step"], self._n_evals_disk, np.array(steps, dtype=np.int64))
            if self._inverse:
                inverse_rows.append(f, self._n_inverse_disk, self._inverse)
            if self._init is not None:
                self._replace_init(f, self._init)
            if n or self._evals or self._inverse or self._init is not None:
                f.flush()  # what was written, its index and the file's end on disk before it counts
                n_init = len(self._init["name"]) if self._init is not None else self._n_init_disk
                counts = (self._n_disk + n, self._n_evals_disk + len(self._evals))
                _update(f, _COMMITTED, [*counts, self._n_inverse_disk + len(self._inverse), n_init])
            # Only when changed: a flush of rows alone then rewrites no attribute but the counts.
            if self._attrs_dirty:
                self._write_attrs(f)
        # Forget the buffer only once the file has closed cleanly: a failed flush can be retried.
        self._n_disk += self._rows.n
        self._n_evals_disk += len(self._evals)
        self._n_inverse_disk += len(self._inverse)
        if self._init is not None:
            self._n_init_disk = len(self._init["name"])
        self._rows.n, self._evals, self._init, self._attrs_dirty = 0, [], None, False
        self._inverse = []
        self._last_flush = time.monotonic()

    def _replace_init(self, f: h5py.File, init: dict[str, Any]) -> None:
        # The group was made with the file, so the root's links never change after it; an init
        # written before stops counting before its datasets go.
        group = f.require_group("init")
        if len(group):
            _update(f, _COMMITTED, [self._n_disk, self._n_evals_disk, self._n_inverse_disk, 0])
            f.flush()
            for key in list(group):
                del group[key]
        group.create_dataset("name", data=init["name"], dtype=_STRING)
        for key in (*_INIT_FLOATS, *_INIT_INTS):
            group.create_dataset(key, data=init[key])

    def _write_attrs(self, f: h5py.File) -> None:
        if self._phase is not None:
            _update(f, "phase", self._phase)
        _update(f, "status", self._status)
        _update(f, "nan_onset_step", self._onset_step)
        _update(f, "nan_onset_layer", self._onset_layer)
        if self._onset_rank is not None:
            _update(f, "nan_onset_rank", self._onset_rank)
        inverse_rows.set_onset(f, *self._inverse_onset)

    def truncate_after(self, step: int) -> None:
        """Drop step and eval rows past `step`: a resumed run restarts from its checkpoint's step."""
        self.flush()
        with self._opened() as f:
            n_steps = _rows_through(f["steps/step"][: self._n_disk], step)
            n_evals = _rows_through(f["eval/step"][: self._n_evals_disk], step)
            for name in _step_datasets(f):
                f[name].resize(n_steps, axis=0)
            for name in _EVAL_DATASETS:
                f[name].resize(n_evals, axis=0)
            self._n_inverse_disk = inverse_rows.truncate_after(f, step)
            if self._inverse_onset[0] > step:
                self._inverse_onset = (-1, "")
            if self._onset_step > step:  # the rows that showed the onset are gone
                self._onset_step, self._onset_layer = -1, ""
            f.flush()  # the shorter datasets on disk before the counts say so
            _update(f, _COMMITTED, [n_steps, n_evals, self._n_inverse_disk, self._n_init_disk])
            self._write_attrs(f)
        self._n_disk, self._n_evals_disk = n_steps, n_evals

    def close(self, status: str | None = None) -> None:
        """Flush what is left, optionally setting the final status first. Safe to call twice."""
        if status is not None:
            self._set_status(status, self._onset_step, self._onset_layer)
        self.flush()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A run that dies with an exception while still "running" must not look alive in the file.
        self.close("failed" if exc_type is not None and self._status == "running" else None)


class NullWriter:
    """A RunWriter that writes nothing: what a data-parallel rank other than 0 records into (rank 0
    writes the run file), and what `flowdiag bench` times the hooks against."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None
