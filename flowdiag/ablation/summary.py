"""The ablation's result table, from the study (what `ablate` prints at the end).

Only a done cell (a COMPLETE trial: completed or diverged) carries numbers; an interrupted,
failed, running or pending cell is listed as such, with none, so no part-trained cell reads as a
result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna

from flowdiag.ablation.grid import CORE_AXES, cell_key
from flowdiag.ablation.study import cell_states


@dataclass(frozen=True)
class CellRow:
    cell: dict[str, Any]
    status: str  # completed | diverged (done) | interrupted | failed | running | pending
    onset_step: int
    onset_layer: str
    step2_peak: float | None
    early_peak: float | None  # over steps 1-2: set even when the run overflowed at step 1
    best_bpd: float | None
    hdf5_path: str
    stopped_step: int | None = None  # an interrupted cell: the step its checkpoint holds

    @property
    def is_result(self) -> bool:
        return self.status in ("completed", "diverged")


def summarize(study: optuna.Study, cells: list[dict[str, Any]]) -> list[CellRow]:
    rows = []
    states = cell_states(study, cells)
    for cell in cells:
        state = states[cell_key(cell)]
        attrs = state.result.user_attrs if state.result is not None else {}
        last = state.last.user_attrs if state.last is not None else {}
        rows.append(
            CellRow(
                cell=json.loads(cell_key(cell)),
                status=attrs.get("status", "completed") if state.state == "done" else state.state,
                onset_step=attrs.get("nan_onset_step", -1),
                onset_layer=attrs.get("nan_onset_layer", ""),
                step2_peak=attrs.get("step2_peak_max_abs"),
                early_peak=attrs.get("early_peak_max_abs"),
                best_bpd=attrs.get("best_bpd"),
                hdf5_path=attrs.get("hdf5_path", ""),
                stopped_step=last.get("steps") if state.state == "interrupted" else None,
            )
        )
    return rows


def extra_axes(rows: list[CellRow]) -> list[str]:
    return sorted({k for row in rows for k in row.cell if k not in CORE_AXES})
