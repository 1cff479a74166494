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
from flowdiag.record.store.create import RunHeader, check_settings, create_run_file
from flowdiag.record.store.init_group import init_entries, replace_init
from flowdiag.record.store.layout import (
    _COMMITTED,
    _EVAL_DATASETS,
    _WALL_TIME,
    PHASES,
    STATUSES,
    STEPS,
    _append,
    _as_os_error,
    _check_run,
    _complete_rows,
    _flush_file,
    _open_for_append,
    _reserve,
    _rows_through,
    _step_datasets,
    _unreadable,
    _update,
    flush_room,
)
from flowdiag.record.store.onset_check import FlagWatch
from flowdiag.record.store.resume_point import resume_point
from flowdiag.record.store.rows import StepRows
from flowdiag.runtime.errors import UserError, write_error

# The writer's clock: the flush timer and the wall time of rows the caller does not time itself.
_monotonic = time.monotonic


class RunWriter:
    """Appends one run's record to its HDF5 file, opening the file only for the length of a flush.

    Rows reach the file every `flush_every` steps or `flush_seconds` after the last flush, whichever
    comes first: a reader sees a new run within seconds, and a long run pays one open per block.
    `append_steps` writes a block of rows at once (runs imported from elsewhere, synthetic runs).

    `start_time`: the run's start as unix time (default now); rows' wall time counts from it, so an
    imported run passes its own start and each row's `wall_time`.

    A run imported from elsewhere, three steps of two layers, the second layer non-finite at step 3:

    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from flowdiag.record.store import read_run
    >>> path = Path(tempfile.mkdtemp()) / "run.h5"
    >>> with RunWriter(path, config_json="{}", version="import", layer_names=["flows.0", "flows.1"],
    ...                layer_kinds=["actnorm", "coupling"]) as writer:
    ...     max_abs = np.array([[1.0, 2.0], [1.5, 3.0], [2.0, np.inf]])
    ...     writer.append_steps([1, 2, 3], loss=[3.0, 2.5, np.nan], bpd=[4.0, 3.6, np.nan],
    ...                         penalty=np.zeros(3), grad_norm=np.ones(3), lr=np.full(3, 1e-3),
    ...                         max_abs=max_abs, logdet=np.zeros((3, 2)), nonfinite=~np.isfinite(max_abs),
    ...                         wall_time=[0.0, 3600.0, 7200.0])
    ...     writer.set_status("diverged", onset_step=3, onset_layer="flows.1")
    >>> run = read_run(path)
    >>> run.status, run.nan_onset_step, run.nan_onset_layer, run.wall_time.tolist()
    ('diverged', 3, 'flows.1', [0.0, 3600.0, 7200.0])
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
        start_time: float | None = None,
    ) -> None:
        path = Path(path)
        names, kinds = list(layer_names), list(layer_kinds)
        pixels = [-1] * len(names) if layer_pixels is None else [int(p) for p in layer_pixels]
        check_settings(names, kinds, pixels, flush_every, flush_seconds)  # before a file exists
        started = time.time() if start_time is None else float(start_time)
        header = RunHeader(config_json, version, names, kinds, pixels, total_steps, started)
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
                found = resume_point(f)
                if total_steps is not None:
                    _update(f, "total_steps", int(total_steps))
        except (OSError, RuntimeError, KeyError, ValueError):
            raise UserError(_unreadable(path)) from None
        writer = cls.__new__(cls)
        names = found.pop("names")
        writer._setup(path, names, flush_every, flush_seconds, **found)
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
        n_inverse: int = 0,
        n_init: int = 0,
        inverse_onset: tuple[int, str] = (-1, ""),
        clock: float = 0.0,
        last_step: int = 0,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}")
        self.path = path
        self.layer_names = names
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._n_disk, self._n_evals_disk = n_steps, n_evals
        self._n_inverse_disk, self._n_init_disk = n_inverse, n_init
        self._last_disk_step = last_step  # named in a failed flush's message: what the file holds
        self._started = self._last_flush = _monotonic()
        self._clock_offset = clock  # a resumed run's clock continues from its last row
        self._rows = StepRows(len(names), flush_every)
        self._evals: list[tuple[int, float]] = []
        self._inverse: list[inverse_rows.InverseRow] = []
        self._inverse_onset = inverse_onset
        self._init: dict[str, Any] | None = None
        self._status, self._onset_step, self._onset_layer = status
        self._phase: str | None = None  # None: unchanged since the file was opened
        self._onset_rank: int | None = None  # None: unchanged since the file was opened
        self._attrs_dirty = False
        self._flags = FlagWatch(names)

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
        wall_time: float | None = None,
    ) -> None:
        """Buffer one step's row; the block goes to the file every `flush_every` rows or `flush_seconds`.

        `ran`: which layers ran in the step (default all); `forwards`: the training forwards the row
        covers (several under gradient accumulation); `wall_time`: seconds since the run started
        (default: the writer's clock).
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
        now = _monotonic()
        if wall_time is None:
            wall_time = self._clock_offset + now - self._started
        self._flags.see_row(step, per_layer["nonfinite"])
        self._rows.add(step, wall_time, forwards, (loss, bpd, penalty, grad_norm, lr), per_layer)
        if self._rows.n == self.flush_every or now - self._last_flush >= self.flush_seconds:
            self.flush()

    def append_steps(
        self,
        step: ArrayLike,
        *,
        loss: ArrayLike,
        bpd: ArrayLike,
        penalty: ArrayLike,
        grad_norm: ArrayLike,
        lr: ArrayLike,
        max_abs: ArrayLike,
        logdet: ArrayLike,
        nonfinite: ArrayLike,
        ran: ArrayLike | None = None,
        forwards: ArrayLike | None = None,
        wall_time: ArrayLike | None = None,
    ) -> None:
        """Write a block of n rows at once, after anything buffered: per-step arrays (n,), per-layer
        arrays (n, N); `ran` default all, `forwards` default 1, `wall_time` (seconds since the run
        started) default the writer's clock. One open of the file for the whole block."""
        clock = self._clock_offset + _monotonic() - self._started
        scalars = {"loss": loss, "bpd": bpd, "penalty": penalty, "grad_norm": grad_norm, "lr": lr}
        per_layer = {"max_abs": max_abs, "logdet": logdet, "nonfinite": nonfinite, "ran": ran}
        rows = StepRows.given(step, len(self.layer_names), clock, scalars, per_layer, forwards, wall_time)
        self.flush()
        self._flags.see(rows.step, rows.layers["nonfinite"])
        self._flush(rows)

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
        self._init = init_entries(names, log_scale_min, log_scale_max, min_input_var, n_values, pixels)
        self.flush()

    def set_status(self, status: str, *, onset_step: int = -1, onset_layer: str = "") -> None:
        """Set the run's status and NaN onset; flushed at once, with any buffered rows.

        A new onset must agree with the rows' non-finite flags (the first step that flags a layer, and
        a layer it flags): ValueError otherwise, and nothing is written.
        """
        if (int(onset_step), str(onset_layer)) != (self._onset_step, self._onset_layer) or onset_step < 0:
            self._flags.check(int(onset_step), str(onset_layer), self._has_row)
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

    def _has_row(self, step: int) -> bool:
        """Whether a row for `step` was written or is buffered (the onset check's question)."""
        if np.any(self._rows.step[: self._rows.n] == step):
            return True
        if not self._n_disk:
            return False
        with self._opened() as f:
            return bool(np.any(f["steps/step"][: self._n_disk] == step))

    # --- the file --------------------------------------------------------------------------------

    @contextmanager
    def _opened(self, reserve: int = 0) -> Iterator[h5py.File]:
        """The file open for one flush, `reserve` bytes claimed first; any write error (a full disk,
        an I/O error, a vanished file) is one line naming the file, what it holds, and the fix."""
        try:
            if reserve:
                _reserve(self.path, reserve)
            with _open_for_append(self.path) as f:
                yield f
        except (OSError, RuntimeError) as error:
            last = self._steps_on_disk()
            held = f"the steps up to {last}" if last else "no step yet"
            raise write_error(self.path, _as_os_error(error), holds=held) from None

    def _steps_on_disk(self) -> int:
        """The last step the file counts as written, read back (a flush that failed after raising the
        counts still wrote its rows); what this writer last wrote when the file cannot be read."""
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                n = _complete_rows(f, _step_datasets(f), STEPS)
                return int(f["steps/step"][n - 1]) if n else 0
        except (OSError, RuntimeError, KeyError, ValueError):
            return self._last_disk_step

    def _room(self, n_rows: int) -> int:
        """Bytes a flush may add to the file (`flush_room`)."""
        init = self._init is not None
        return flush_room(len(self.layer_names), n_rows, len(self._evals), len(self._inverse), init)

    def flush(self) -> None:
        """Write everything buffered (rows, evaluations, init, status) in one open of the file."""
        self._flush(self._rows)

    def _flush(self, rows: StepRows) -> None:
        n = rows.n
        if not (n or self._evals or self._inverse or self._init is not None or self._attrs_dirty):
            return
        with self._opened(self._room(n)) as f:
            if n:
                for name, block in rows.blocks():
                    if name in f:  # a file of an older version resumed: it keeps its own datasets
                        _append(f[name], self._n_disk, block)
            if self._evals:
                steps, bpds = zip(*self._evals, strict=True)
                _append(f["eval/bpd"], self._n_evals_disk, np.array(bpds, dtype=np.float64))
                _append(f["eval/step"], self._n_evals_disk, np.array(steps, dtype=np.int64))
            if self._inverse:
                inverse_rows.append(f, self._n_inverse_disk, self._inverse)
            if self._init is not None:
                counts = [self._n_disk, self._n_evals_disk, self._n_inverse_disk]
                replace_init(f, self._init, counts)
            if n or self._evals or self._inverse or self._init is not None:
                _flush_file(f)  # what was written, its index and the file's end on disk before it counts
                n_init = len(self._init["name"]) if self._init is not None else self._n_init_disk
                counts = (self._n_disk + n, self._n_evals_disk + len(self._evals))
                _update(f, _COMMITTED, [*counts, self._n_inverse_disk + len(self._inverse), n_init])
            # Only when changed: a flush of rows alone then rewrites no attribute but the counts.
            if self._attrs_dirty:
                self._write_attrs(f)
        # Forget the buffer only once the file has closed cleanly: a failed flush can be retried.
        self._n_disk += n
        self._last_disk_step = int(rows.step[n - 1]) if n else self._last_disk_step
        self._n_evals_disk += len(self._evals)
        self._n_inverse_disk += len(self._inverse)
        if self._init is not None:
            self._n_init_disk = len(self._init["name"])
        rows.n, self._evals, self._init, self._attrs_dirty = 0, [], None, False
        self._inverse = []
        self._last_flush = _monotonic()

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
            _flush_file(f)  # the shorter datasets on disk before the counts say so
            _update(f, _COMMITTED, [n_steps, n_evals, self._n_inverse_disk, self._n_init_disk])
            self._write_attrs(f)
            self._last_disk_step = int(f["steps/step"][n_steps - 1]) if n_steps else 0
        self._n_disk, self._n_evals_disk = n_steps, n_evals
        self._flags.forget_after(step)

    def close(self, status: str | None = None) -> None:
        """Flush what is left, optionally setting the final status first. Safe to call twice.

        Rows that flag a layer non-finite need an onset (`set_status(..., onset_step=...)`) first:
        ValueError otherwise, with the rows still buffered. (The onset itself was checked when set; a
        resumed run's, read from its file, is taken as it is.)
        """
        self._flags.check_first(self._onset_step)
        self._close(status)

    def _close(self, status: str | None) -> None:
        if status is not None:
            self._set_status(status, self._onset_step, self._onset_layer)
        self.flush()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # A run that dies with an exception while still "running" must not look alive in the file.
        self._close("failed" if self._status == "running" else None)
