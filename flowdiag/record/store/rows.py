"""StepRows: the step rows a RunWriter holds in memory between two flushes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike

from flowdiag.record.store.layout import _FORWARDS, _LAYER_ARRAYS, _SCALARS, _WALL_TIME

# Rows reserved at first. The buffer doubles when full, up to the flush block, so that a huge
# --flush-every (flushing on the timer alone) does not reserve its whole block up front: 1e6 rows of
# the digits model would be 380 MB.
_FIRST_ROWS = 1024


class StepRows:
    """Preallocated arrays, so that a step costs a few copies, not an allocation per array."""

    def __init__(self, n_layers: int, most: int) -> None:
        self.most = most
        rows = min(most, _FIRST_ROWS)
        self.n = 0
        self.step = np.empty(rows, np.int64)
        self.wall_time = np.empty(rows, np.float64)
        self.forwards = np.empty(rows, np.int32)
        self.scalars = np.empty((rows, len(_SCALARS)), np.float64)
        self.layers = {name: np.empty((rows, n_layers), dtype) for name, dtype in _LAYER_ARRAYS.items()}

    def add(
        self,
        step: int,
        wall_time: float,
        forwards: int,
        scalars: tuple[float, ...],
        per_layer: dict[str, np.ndarray],
    ) -> None:
        """One row; `scalars` in _SCALARS order, `per_layer` one (N,) array per _LAYER_ARRAYS name."""
        i = self.n
        if i == len(self.step):
            self._grow()
        self.step[i] = step
        self.wall_time[i] = wall_time
        self.forwards[i] = forwards
        self.scalars[i] = scalars
        for name, values in per_layer.items():
            buffer = self.layers[name]
            if values.dtype.itemsize > buffer.dtype.itemsize and buffer.dtype.kind == "f":
                values = _saturate(values, buffer.dtype)
            buffer[i] = values
        self.n += 1

    @classmethod
    def of_block(
        cls,
        step: np.ndarray,
        wall_time: np.ndarray,
        forwards: np.ndarray,
        scalars: np.ndarray,
        per_layer: dict[str, np.ndarray],
    ) -> StepRows:
        """Rows given whole (`RunWriter.append_steps`): `scalars` (n, 5) in _SCALARS order, `per_layer`
        one (n, N) array per _LAYER_ARRAYS name; converted to the file's types, finite values saturated."""
        rows = cls.__new__(cls)
        rows.n = rows.most = len(step)
        rows.step = np.asarray(step, np.int64)
        rows.wall_time = np.asarray(wall_time, np.float64)
        rows.forwards = np.asarray(forwards, np.int32)
        rows.scalars = np.asarray(scalars, np.float64)
        rows.layers = {}
        for name, dtype in _LAYER_ARRAYS.items():
            values = np.asarray(per_layer[name])
            if values.dtype.kind == "f" and values.dtype.itemsize > np.dtype(dtype).itemsize:
                values = _saturate(values, np.dtype(dtype))
            rows.layers[name] = values.astype(dtype, copy=False)
        return rows

    @classmethod
    def given(
        cls,
        step: ArrayLike,
        n_layers: int,
        clock: float,
        scalars: dict[str, ArrayLike],
        per_layer: dict[str, ArrayLike | None],
        forwards: ArrayLike | None,
        wall_time: ArrayLike | None,
    ) -> StepRows:
        """A block as a caller gives it (`RunWriter.append_steps`), every array checked against its
        shape: per-step (n,), per-layer (n, N); `ran` default all, `forwards` 1, `wall_time` `clock`."""
        steps = np.asarray(step, dtype=np.int64)
        n = len(steps)
        values = np.column_stack([shaped(name, scalars[name], (n,)) for name in _SCALARS])
        times = np.full(n, clock) if wall_time is None else shaped("wall_time", wall_time, (n,))
        counts = np.ones(n, np.int32) if forwards is None else shaped("forwards", forwards, (n,))
        ran = per_layer.get("ran")
        layers = {
            name: shaped(name, per_layer[name], (n, n_layers)) for name in ("max_abs", "logdet", "nonfinite")
        }
        layers["nonfinite"] = layers["nonfinite"].astype(bool, copy=False)
        layers["ran"] = np.ones((n, n_layers), bool) if ran is None else shaped("ran", ran, (n, n_layers))
        return cls.of_block(steps, times, counts, values, layers)

    def blocks(self) -> Iterator[tuple[str, np.ndarray]]:
        """(dataset, rows) for each step dataset, "steps/step" last: a reader counts complete rows."""
        n = self.n
        for name, block in self.layers.items():
            yield f"layers/{name}", block[:n]
        for j, name in enumerate(_SCALARS):
            yield f"steps/{name}", self.scalars[:n, j]
        yield _WALL_TIME, self.wall_time[:n]
        yield _FORWARDS, self.forwards[:n]
        yield "steps/step", self.step[:n]

    def _grow(self) -> None:
        rows = min(2 * len(self.step), self.most)
        self.step, self.wall_time, self.forwards, self.scalars = (
            _grown(a, rows) for a in (self.step, self.wall_time, self.forwards, self.scalars)
        )
        self.layers = {name: _grown(block, rows) for name, block in self.layers.items()}


def shaped(name: str, values: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray:
    """`values` as an array of `shape`; ValueError naming the array otherwise."""
    array = np.asarray(values)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}; expected {shape}, the block's rows (and layers)")
    return array


def _grown(block: np.ndarray, rows: int) -> np.ndarray:
    grown = np.empty((rows, *block.shape[1:]), block.dtype)
    grown[: len(block)] = block
    return grown


def _saturate(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Finite values beyond `dtype`'s range become its largest finite value, not inf: the file keeps
    "finite" true, and inf and NaN stay what they were."""
    limit = np.finfo(dtype).max
    return np.where(np.isfinite(values), np.clip(values, -limit, limit), values)
