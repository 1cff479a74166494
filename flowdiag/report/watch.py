"""`watch`: a live terminal view of a run, read from its HDF5 file while the trainer writes it.

The trainer opens the file only for the length of a flush, and `read_run` opens it without locking,
so reading never blocks the run; a read that lands inside a flush may fail, and is retried next tick.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flowdiag.errors import UserError
from flowdiag.report.runs import RUN_FILE, best_eval_bpd, has_layer_records
from flowdiag.report.wording import fmt, fmt_bpd, fmt_step
from flowdiag.store import RunRecord, read_run

TOP_LAYERS = 5


class LayerPeak(NamedTuple):
    name: str
    kind: str
    max_abs: float  # inf / NaN kept
    nonfinite: bool


class WatchSnapshot(NamedTuple):
    status: str
    rows: int  # step rows in the file so far
    step: int  # latest recorded step; 0 before the first
    bpd: float  # training bpd at that step; NaN before the first
    best_eval_bpd: float
    top_layers: tuple[LayerPeak, ...]  # largest max |output| at the latest step, non-finite first
    onset_step: int  # -1: none
    onset_layer: str


def watch_snapshot(record: RunRecord, top: int = TOP_LAYERS) -> WatchSnapshot:
    rows = len(record.step)
    peaks: tuple[LayerPeak, ...] = ()
    if rows and has_layer_records(record):
        values = np.asarray(record.max_abs[-1], dtype=np.float64)
        flags = np.asarray(record.nonfinite[-1], dtype=bool)
        # Non-finite outputs rank above every finite one; an unflagged NaN was never measured.
        candidates = [i for i in range(len(values)) if flags[i] or np.isfinite(values[i])]
        ranked = sorted(candidates, key=lambda i: math.inf if flags[i] else float(values[i]), reverse=True)
        peaks = tuple(
            LayerPeak(record.layer_names[i], record.layer_kinds[i], float(values[i]), bool(flags[i]))
            for i in ranked[:top]
        )
    return WatchSnapshot(
        status=record.status,
        rows=rows,
        step=int(record.step[-1]) if rows else 0,
        bpd=float(record.bpd[-1]) if rows else math.nan,
        best_eval_bpd=best_eval_bpd(record),
        top_layers=peaks,
        onset_step=record.nan_onset_step,
        onset_layer=record.nan_onset_layer,
    )


def watch_view(path: Path, snapshot: WatchSnapshot | None, note: str = "") -> Group:
    """The renderable for one tick; `snapshot` None until the file has been read once."""
    header = Text(f"{path}", style="bold")
    if snapshot is None:
        return Group(header, Text(note or "waiting for the run file...", style="yellow"))
    s = snapshot
    onset = f"step {fmt_step(s.onset_step)} in {s.onset_layer}" if s.onset_step >= 0 else "none"
    line = (
        f"status {s.status} · step {s.step} · bpd {fmt_bpd(s.bpd)} · best held-out {fmt_bpd(s.best_eval_bpd)}"
        f" · NaN onset {onset}"
    )
    table = Table(
        title=f"top {len(s.top_layers)} layers by max |output| at step {s.step}", title_justify="left"
    )
    for column, justify in (
        ("layer", "left"),
        ("kind", "left"),
        ("max |output|", "right"),
        ("log10", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for peak in s.top_layers:
        log = math.log10(peak.max_abs) if math.isfinite(peak.max_abs) and peak.max_abs > 0 else math.nan
        style = "bold red" if peak.nonfinite else ""
        table.add_row(peak.name, peak.kind, Text(fmt(peak.max_abs), style=style), fmt(log, 3))
    parts = [header, Text(line, style="red" if s.onset_step >= 0 else "")]
    if note:
        parts.append(Text(note, style="yellow"))
    return Group(*parts, table)


def _run_file(path: Path) -> Path:
    path = Path(path)
    return path / RUN_FILE if path.is_dir() else path


def watch(path: Path, console: Console, *, interval: float = 1.0, timeout: float | None = None) -> str:
    """Show the run live until its status leaves `running` (returned) or `timeout` seconds pass.

    On timeout the last status read is returned (`running` if the run is still going).
    """
    file = _run_file(path)
    if not file.exists():
        raise UserError(f"{file} does not exist: start the run first, or pass its run folder")
    deadline = None if timeout is None else time.monotonic() + timeout
    snapshot: WatchSnapshot | None = None
    with Live(watch_view(file, None), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            note = ""
            try:
                snapshot = watch_snapshot(read_run(file))
            except UserError as error:
                # Most likely a read that landed inside a flush: keep the last view, retry next tick.
                note = f"read failed, retrying: {error}"
            live.update(watch_view(file, snapshot, note))
            if snapshot is not None and snapshot.status != "running":
                return snapshot.status
            if deadline is not None and time.monotonic() >= deadline:
                if snapshot is None:
                    raise UserError(f"could not read {file} within {timeout:g} s: is it a flowdiag run file?")
                return snapshot.status
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
