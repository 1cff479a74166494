"""What `watch` shows, extracted from run records: pure and tested (rendering in `watch_view`,
reading and the loop in `watch`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flowdiag.record.store import RunRecord
from flowdiag.report.runs import best_eval_bpd, has_layer_records, is_diverged
from flowdiag.runtime.files import RUN_FILE

TOP_LAYERS = 5
TREND_ROWS = 10  # the trend column: change of log10 max |output| over the last 10 rows
# steps/s over the last 30 s of wall time: the current speed, not the average since an init of M batches.
RATE_WINDOW_S = 30.0
SPARK_WIDTH = 40
SPARK = "▁▂▃▄▅▆▇█"
READ_TRIES = 3
READ_RETRY_S = 0.1  # a flush holds the file for milliseconds
PLAIN_EVERY_S = 10.0  # piped output: a running cell's progress line at most this often
STUDY_FILE = "study.db"
ACTIVE = ("running", "starting")
# The folder's order: diverged first (the reason to look), then what needs attention, then the rest.
STATUS_ORDER = {
    "diverged": 0,
    "failed": 1,
    "unreadable": 2,
    "interrupted": 3,
    "running": 4,
    "starting": 5,
    "waiting": 6,
    "completed": 7,
}
STYLE = {
    "diverged": "bold red",
    "failed": "red",
    "unreadable": "red",
    "running": "cyan",
    "completed": "green",
}


class LayerPeak(NamedTuple):
    name: str
    kind: str
    max_abs: float  # at the latest row; inf / NaN kept
    nonfinite: bool
    trend: float  # change of log10 max |output| over the last TREND_ROWS rows; NaN when not both finite


class RunView(NamedTuple):
    """One run in detail: what `watch RUN` shows."""

    name: str
    status: str
    phase: str  # "init" while the ActNorm init runs, "train" after
    init_batches: int  # M, for the init line
    step: int  # latest recorded step; 0 before the first
    total_steps: int  # -1: unknown
    bpd: float
    best_eval_bpd: float
    bpd_history: tuple[float, ...]  # training bpd, bucket means, at most SPARK_WIDTH points
    steps_per_s: float  # NaN: unknown (a format-1 file has no wall clock; fewer than two rows)
    eta_s: float  # NaN: unknown or not running
    top_layers: tuple[LayerPeak, ...]  # largest max |output| at the latest row, non-finite first
    onset_step: int  # -1: none
    onset_layer: str


class CellLine(NamedTuple):
    """One run of a folder, or a queued cell of its study that has no run file yet."""

    name: str
    status: str  # the file's status, or waiting / starting (queued in the study), or unreadable
    phase: str
    step: int  # -1: no file
    total_steps: int
    bpd: float
    peak_max_abs: float  # over every row and layer; inf once any output went non-finite
    onset_step: int
    onset_layer: str
    diverged: bool


class WatchSnapshot(NamedTuple):
    target: Path
    run: RunView | None  # set when PATH is one run
    cells: tuple[CellLine, ...]  # one per run (and queued cell), diverged first
    study_running: int = 0  # trials the study marks RUNNING, whether or not their file exists yet
    notes: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.study_running > 0 or any(c.status in ACTIVE for c in self.cells)


# --- extraction: pure ----------------------------------------------------------------------------


def bucket_means(values: np.ndarray | Sequence[float], width: int = SPARK_WIDTH) -> tuple[float, ...]:
    """At most `width` means of consecutive values (finite ones only; NaN where a bucket has none)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return ()
    means = []
    for bucket in np.array_split(v, min(width, v.size)):
        finite = bucket[np.isfinite(bucket)]
        means.append(float(finite.mean()) if finite.size else math.nan)
    return tuple(means)


def sparkline(values: Sequence[float]) -> str:
    """One block per value, scaled between the finite min and max; a blank where a value is not finite."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    low, span = min(finite), max(finite) - min(finite)
    top = len(SPARK) - 1
    return "".join(
        " " if not math.isfinite(v) else SPARK[top // 2 if span == 0 else round((v - low) / span * top)]
        for v in values
    )


def steps_per_second(
    step: np.ndarray, wall_time: np.ndarray | None, window_s: float = RATE_WINDOW_S
) -> float:
    """Steps per second over the rows of the last `window_s` seconds (at least two rows); NaN if unknown."""
    if wall_time is None or len(step) < 2 or len(wall_time) != len(step) or not np.isfinite(wall_time[-1]):
        return math.nan
    first = min(int(np.searchsorted(wall_time, wall_time[-1] - window_s)), len(step) - 2)
    seconds, steps = float(wall_time[-1] - wall_time[first]), float(step[-1] - step[first])
    return steps / seconds if seconds > 0 and steps > 0 else math.nan


def planned_steps(record: RunRecord) -> int:
    """The run's planned steps: the file's total_steps, else the config's steps (unless set by epochs)."""
    total = int(record.total_steps)
    if total > 0:
        return total
    train = record.config.get("train", {})
    if isinstance(train, dict) and train.get("epochs") is None and isinstance(train.get("steps"), int):
        return int(train["steps"])
    return -1


def log10(value: float) -> float:
    return math.log10(value) if math.isfinite(value) and value > 0 else math.nan


def top_layers(
    record: RunRecord, top: int = TOP_LAYERS, trend_rows: int = TREND_ROWS
) -> tuple[LayerPeak, ...]:
    rows = len(record.step)
    if not rows or not has_layer_records(record):
        return ()
    values = np.asarray(record.max_abs[-1], dtype=np.float64)
    earlier = np.asarray(record.max_abs[max(0, rows - 1 - trend_rows)], dtype=np.float64)
    flags = np.asarray(record.nonfinite[-1], dtype=bool)
    # Non-finite outputs rank above every finite one; an unflagged NaN was never measured.
    candidates = [i for i in range(len(values)) if flags[i] or np.isfinite(values[i])]
    ranked = sorted(candidates, key=lambda i: math.inf if flags[i] else float(values[i]), reverse=True)
    return tuple(
        LayerPeak(
            record.layer_names[i],
            record.layer_kinds[i],
            float(values[i]),
            bool(flags[i]),
            log10(float(values[i])) - log10(float(earlier[i])) if rows > 1 else math.nan,
        )
        for i in ranked[:top]
    )


def peak_max_abs(record: RunRecord) -> float:
    if not len(record.step) or not has_layer_records(record):
        return math.nan
    if record.nonfinite.any():
        return math.inf
    return float(np.nanmax(record.max_abs))


def cell_line(record: RunRecord, name: str) -> CellLine:
    rows = len(record.step)
    return CellLine(
        name=name,
        status=record.status,
        phase=record.phase,
        step=int(record.step[-1]) if rows else 0,
        total_steps=planned_steps(record),
        bpd=float(record.bpd[-1]) if rows else math.nan,
        peak_max_abs=peak_max_abs(record),
        onset_step=record.nan_onset_step,
        onset_layer=record.nan_onset_layer,
        diverged=is_diverged(record),
    )


def _no_file(name: str, status: str) -> CellLine:
    return CellLine(name, status, "", -1, -1, math.nan, math.nan, -1, "", False)


def run_view(record: RunRecord, name: str) -> RunView:
    line = cell_line(record, name)
    rate = steps_per_second(record.step, record.wall_time)
    remaining = line.total_steps - line.step
    running = record.status == "running" and line.total_steps > 0 and remaining > 0
    train = record.config.get("train", {})
    return RunView(
        name=name,
        status=record.status,
        phase=line.phase,
        init_batches=int(train.get("init_batches", -1)) if isinstance(train, dict) else -1,
        step=line.step,
        total_steps=line.total_steps,
        bpd=line.bpd,
        best_eval_bpd=best_eval_bpd(record),
        bpd_history=bucket_means(record.bpd),
        steps_per_s=rate,
        eta_s=remaining / rate if running and rate > 0 else math.nan,
        top_layers=top_layers(record),
        onset_step=record.nan_onset_step,
        onset_layer=record.nan_onset_layer,
    )


def _order(cell: CellLine) -> tuple[int, int, str]:
    rank = 0 if cell.diverged else STATUS_ORDER.get(cell.status, 3)
    return rank, cell.onset_step if cell.diverged else 0, cell.name


def watch_snapshot(
    target: Path,
    records: Sequence[tuple[str, RunRecord]],
    *,
    single: bool = False,
    unreadable: Sequence[str] = (),
    queued: Sequence[tuple[str, str]] = (),
    study_running: int = 0,
    notes: Sequence[str] = (),
) -> WatchSnapshot:
    """The snapshot of named records; `queued` holds (cell name, waiting | starting) from the study."""
    cells = [cell_line(record, name) for name, record in records]
    cells += [_no_file(name, "unreadable") for name in unreadable]
    seen = {c.name for c in cells}
    cells += [_no_file(name, status) for name, status in queued if name not in seen]
    run = run_view(records[0][1], records[0][0]) if single and records else None
    return WatchSnapshot(Path(target), run, tuple(sorted(cells, key=_order)), study_running, tuple(notes))


def run_name(file: Path, root: Path) -> str:
    """A run's name: its folder relative to `root`, without an ablation's `runs/` (a cell's slug)."""
    base = file.parent if file.name == RUN_FILE else file.with_suffix("")
    try:
        parts = base.relative_to(root).parts
    except ValueError:
        parts = (base.name,)
    if len(parts) > 1 and parts[0] == "runs":
        parts = parts[1:]
    return "/".join(parts) if parts else (Path(root).resolve().name or "run")
