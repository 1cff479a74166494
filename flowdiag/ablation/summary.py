"""The ablation's result table, from the study (what `ablate` prints at the end)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna

from flowdiag.ablation.grid import CORE_AXES, cell_key
from flowdiag.ablation.runner import cell_trials


@dataclass(frozen=True)
class CellRow:
    cell: dict[str, Any]
    status: str  # completed | diverged | interrupted | pending
    onset_step: int
    onset_layer: str
    step2_peak: float | None
    early_peak: float | None  # over steps 1-2: set even when the run overflowed at step 1
    best_bpd: float | None
    hdf5_path: str


def summarize(study: optuna.Study, cells: list[dict[str, Any]]) -> list[CellRow]:
    rows = []
    trials = cell_trials(study, cells)
    for cell in cells:
        trial = trials[cell_key(cell)]
        attrs = trial.user_attrs if trial is not None else {}
        rows.append(
            CellRow(
                cell=json.loads(cell_key(cell)),
                status=attrs.get("status", "pending"),
                onset_step=attrs.get("nan_onset_step", -1),
                onset_layer=attrs.get("nan_onset_layer", ""),
                step2_peak=attrs.get("step2_peak_max_abs"),
                early_peak=attrs.get("early_peak_max_abs"),
                best_bpd=attrs.get("best_bpd"),
                hdf5_path=attrs.get("hdf5_path", ""),
            )
        )
    return rows


def extra_axes(rows: list[CellRow]) -> list[str]:
    return sorted({k for row in rows for k in row.cell if k not in CORE_AXES})
