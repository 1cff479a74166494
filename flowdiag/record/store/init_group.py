"""The run file's `init` group: every ActNorm's figures after Algorithm 1, checked, then written whole."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
from numpy.typing import ArrayLike

from flowdiag.record.store.layout import _COMMITTED, _INIT_FLOATS, _INIT_INTS, _STRING, _flush_file, _update


def init_entries(
    names: Sequence[str],
    log_scale_min: ArrayLike,
    log_scale_max: ArrayLike,
    min_input_var: ArrayLike,
    n_values: ArrayLike,
    pixels: ArrayLike | None = None,
) -> dict[str, Any]:
    """One entry per ActNorm, in the file's types; ValueError when a column's length is not the names'.

    >>> sorted(init_entries(["a"], [0.0], [1.0], [0.5], [16]))
    ['log_scale_max', 'log_scale_min', 'min_input_var', 'n_values', 'name', 'pixels']
    """
    init: dict[str, Any] = {"name": [str(n) for n in names]}
    for key, values in zip(_INIT_FLOATS, (log_scale_min, log_scale_max, min_input_var), strict=True):
        init[key] = np.asarray(values, dtype=np.float64)
    init["n_values"] = np.asarray(n_values, dtype=np.int64)
    init["pixels"] = np.asarray(np.full(len(init["name"]), -1) if pixels is None else pixels, dtype=np.int64)
    for key, values in init.items():
        if len(values) != len(init["name"]) or (key != "name" and values.ndim != 1):
            raise ValueError(
                f"init {key} has {len(values)} entries; expected {len(init['name'])}, one per name"
            )
    return init


def replace_init(f: h5py.File, init: dict[str, Any], counts: list[int]) -> None:
    """Write `init` in the place of any earlier one; `counts`: the committed steps, evals and inverse
    rows, kept while the earlier init stops counting."""
    # The group was made with the file, so the root's links never change after it; an init
    # written before stops counting before its datasets go.
    group = f.require_group("init")
    if len(group):
        _update(f, _COMMITTED, [*counts, 0])
        _flush_file(f)
        for key in list(group):
            del group[key]
    group.create_dataset("name", data=init["name"], dtype=_STRING)
    for key in (*_INIT_FLOATS, *_INIT_INTS):
        group.create_dataset(key, data=init[key])
