"""The run file's inverse record: one row per evaluation, written and read here.

reverse/step (E), reverse/max_abs and reverse/nonfinite (E x N: the flow layers, layers/ order,
latent -> data while sampling), reverse/recon_error (E), reverse/nonfinite_samples (E);
convs/name (C: the invconv layers), convs/logabsdet and convs/cond (E x C);
attrs reverse_onset_step and reverse_onset_layer (the first non-finite layer of the inverse).
"""

from __future__ import annotations

from typing import NamedTuple

import h5py
import numpy as np

from flowdiag.record.store.layout import (
    _STRING,
    INVERSE,
    _append,
    _complete_rows,
    _create_text,
    _growing,
    _rows_through,
    _strings,
    _text,
    _update,
)

_PER_LAYER = {"max_abs": np.float32, "nonfinite": np.bool_}  # reverse/<name>, (E, N)
_SCALARS = ("recon_error", "nonfinite_samples")  # reverse/<name>, float64, (E,)
_PER_CONV = ("logabsdet", "cond")  # convs/<name>, float64, (E, C)


class InverseRow(NamedTuple):
    step: int
    max_abs: np.ndarray  # (N,)
    nonfinite: np.ndarray  # (N,)
    recon_error: float
    nonfinite_samples: float
    conv_logabsdet: np.ndarray  # (C,)
    conv_cond: np.ndarray  # (C,)


class InverseRecord(NamedTuple):
    """The inverse checks read back; every array empty (E = 0) for a run that never evaluated."""

    step: np.ndarray  # (E,)
    max_abs: np.ndarray  # (E, N)
    nonfinite: np.ndarray  # (E, N)
    recon_error: np.ndarray  # (E,)
    nonfinite_samples: np.ndarray  # (E,)
    conv_names: list[str]  # (C,)
    conv_logabsdet: np.ndarray  # (E, C)
    conv_cond: np.ndarray  # (E, C)
    onset_step: int  # -1: the inverse never went non-finite
    onset_layer: str


def conv_names(names: list[str], kinds: list[str]) -> list[str]:
    """The 1x1 convs are the invconv layers: their names are stored, never guessed."""
    return [name for name, kind in zip(names, kinds, strict=True) if kind == "invconv"]


def create(f: h5py.File, names: list[str], kinds: list[str], text_width: int) -> None:
    f.attrs["reverse_onset_step"] = -1
    _create_text(f, "reverse_onset_layer", "", text_width)
    group = f.create_group("reverse")
    _growing(group, "step", np.int64)
    for name, dtype in _PER_LAYER.items():
        _growing(group, name, dtype, n_columns=len(names))
    for name in _SCALARS:
        _growing(group, name, np.float64)
    convs = f.create_group("convs")
    found = conv_names(names, kinds)
    convs.create_dataset("name", data=found, dtype=_STRING)
    if found:  # HDF5 chunks cannot have a zero dimension
        for name in _PER_CONV:
            _growing(convs, name, np.float64, n_columns=len(found))


def _datasets(f: h5py.File) -> list[str]:
    names = ["reverse/step", *(f"reverse/{n}" for n in (*_PER_LAYER, *_SCALARS))]
    return names + [f"convs/{n}" for n in _PER_CONV if f"convs/{n}" in f]


def rows_on_disk(f: h5py.File) -> int:
    return _complete_rows(f, _datasets(f), INVERSE) if "reverse" in f else 0


def append(f: h5py.File, start: int, rows: list[InverseRow]) -> None:
    """Write `rows` from row `start` on ("reverse/step" last: a reader counts complete rows)."""
    for name in _PER_LAYER:
        _append(f[f"reverse/{name}"], start, np.stack([getattr(r, name) for r in rows]))
    for name in _SCALARS:
        _append(f[f"reverse/{name}"], start, np.array([getattr(r, name) for r in rows], dtype=np.float64))
    for name in _PER_CONV:
        if f"convs/{name}" in f:
            _append(f[f"convs/{name}"], start, np.stack([getattr(r, f"conv_{name}") for r in rows]))
    _append(f["reverse/step"], start, np.array([r.step for r in rows], dtype=np.int64))


def set_onset(f: h5py.File, step: int, layer: str) -> None:
    _update(f, "reverse_onset_step", step)
    _update(f, "reverse_onset_layer", layer)


def truncate_after(f: h5py.File, step: int) -> int:
    """Drop rows past `step` (a resumed run); returns the rows kept."""
    if "reverse" not in f:
        return 0
    kept = _rows_through(f["reverse/step"][: rows_on_disk(f)], step)
    for name in _datasets(f):
        f[name].resize(kept, axis=0)
    if int(f.attrs["reverse_onset_step"]) > step:
        set_onset(f, -1, "")
    return kept


def read(f: h5py.File, n_layers: int) -> InverseRecord:
    if "reverse" not in f:  # written before format 2, or by a Monitor without evaluations
        return InverseRecord(
            np.zeros(0, np.int64), np.zeros((0, n_layers), np.float32), np.zeros((0, n_layers), bool),
            np.zeros(0), np.zeros(0), [], np.zeros((0, 0)), np.zeros((0, 0)), -1, "",
        )  # fmt: skip
    e = rows_on_disk(f)
    names = _strings(f["convs/name"])
    per_conv = {n: f[f"convs/{n}"][:e] if f"convs/{n}" in f else np.zeros((e, 0)) for n in _PER_CONV}
    return InverseRecord(
        step=f["reverse/step"][:e],
        max_abs=f["reverse/max_abs"][:e],
        nonfinite=f["reverse/nonfinite"][:e],
        recon_error=f["reverse/recon_error"][:e],
        nonfinite_samples=f["reverse/nonfinite_samples"][:e],
        conv_names=names,
        conv_logabsdet=per_conv["logabsdet"],
        conv_cond=per_conv["cond"],
        onset_step=int(f.attrs.get("reverse_onset_step", -1)),
        onset_layer=_text(f.attrs.get("reverse_onset_layer", "")),
    )
