"""The cells file an ablation or tune-lambda run publishes (`OUT/cells.json`, `runtime.files.CELLS_FILE`),
read for `watch`: which cells wait, run, ended, and how many trials run now. Plain JSON, so that watch
reads neither the study's database nor imports optuna.

    {"format": 1, "study": "...", "kind": "ablation" | "tune-lambda", "updated": <unix time>,
     "running": <trials running now>, "cells": {"<run folder under OUT/runs/>": "<state>", ...}}

States: waiting, running (claimed; its run file may not exist yet), done, interrupted, failed. The
runner replaces the file whole (a temp file, then os.replace); a missing, partial or unknown-format file
reads as None, and watch shows what the run files say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from flowdiag.runtime.files import CELLS_FILE

CELLS_FORMAT = 1
STATES = ("waiting", "running", "done", "interrupted", "failed")
# How watch names a cell's state while the cell has no run file: a claimed cell is still starting.
WATCH_STATUS = {
    "waiting": "waiting",
    "running": "starting",
    "done": "done",
    "interrupted": "interrupted",
    "failed": "failed",
}


class StudyCells(NamedTuple):
    study: str
    kind: str  # ablation | tune-lambda
    updated: float  # unix time of the runner's last write
    running: int  # trials running in the study now, with or without a run file yet
    cells: dict[str, str]  # run folder name -> state

    def without_file(self, named: set[str]) -> list[tuple[str, str]]:
        """(cell, watch status) for the cells whose run file is not among `named`, in name order."""
        return [
            (name, WATCH_STATUS[state]) for name, state in sorted(self.cells.items()) if name not in named
        ]


def read_cells(folder: Path) -> StudyCells | None:
    """The cells file in `folder`; None when it is missing, partial or of another format."""
    try:
        data = json.loads((Path(folder) / CELLS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return _parsed(data)


def _parsed(data: Any) -> StudyCells | None:
    if not isinstance(data, dict) or data.get("format") != CELLS_FORMAT:
        return None
    cells = data.get("cells")
    running = data.get("running", 0)
    if not isinstance(cells, dict) or not isinstance(running, int):
        return None
    known = {str(name): state for name, state in cells.items() if state in STATES}
    updated = data.get("updated", 0.0)
    return StudyCells(
        study=str(data.get("study", "")),
        kind=str(data.get("kind", "")),
        updated=float(updated) if isinstance(updated, int | float) else 0.0,
        running=max(running, 0),
        cells=known,
    )
