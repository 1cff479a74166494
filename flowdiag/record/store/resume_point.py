"""Where a resumed writer continues from: what a run file says it holds, read once at `open_existing`."""

from __future__ import annotations

from typing import Any

import h5py

from flowdiag.record.store import inverse_rows
from flowdiag.record.store.layout import (
    _EVAL_DATASETS,
    _WALL_TIME,
    EVALS,
    STEPS,
    _complete_rows,
    _init_entries,
    _step_datasets,
    _strings,
    _text,
)


def resume_point(f: h5py.File) -> dict[str, Any]:
    """What a resumed writer continues from: the layers, the counts, the status and the clock."""
    names = _strings(f["layers/name"])
    n_steps = _complete_rows(f, _step_datasets(f), STEPS)
    return {
        "names": names,
        "n_steps": n_steps,
        "n_evals": _complete_rows(f, _EVAL_DATASETS, EVALS),
        "n_inverse": inverse_rows.rows_on_disk(f),
        "n_init": _init_entries(f),
        "inverse_onset": (
            int(f.attrs.get("reverse_onset_step", -1)),
            _text(f.attrs.get("reverse_onset_layer", "")),
        ),
        "status": (
            _text(f.attrs["status"]),
            int(f.attrs["nan_onset_step"]),
            _text(f.attrs["nan_onset_layer"]),
        ),
        "clock": float(f[_WALL_TIME][n_steps - 1]) if n_steps else 0.0,
        "last_step": int(f["steps/step"][n_steps - 1]) if n_steps else 0,
    }
