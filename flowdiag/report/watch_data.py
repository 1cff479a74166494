"""What `watch` shows, extracted from each run's tail (its head and its last rows, whatever its length)
and the study's cells file: pure and tested (rendering in `watch_view`, reading and the loop in `watch`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flowdiag.record.store import RunHead, StepBlock
from flowdiag.report.runs import is_diverged
from flowdiag.runtime.files import RUN_FILE

TOP_LAYERS = 5
TREND_ROWS = 10  # the trend column: change of log10 max |output| over the last 10 rows
# What watch reads of a run: its head and its last rows, at any length (a 300,000-step run included):
# 1,024 rows of 288 layers are 3 MB, read in a few ms.
TAIL_ROWS = 1024
# steps/s over the last 30 s of wall time: the current speed, not the average since an init of M batches.
RATE_WINDOW_S = 30.0
SPARK_WIDTH = 40
SPARK = "▁▂▃▄▅▆▇█"
READ_TRIES = 3
READ_RETRY_S = 0.1  # a flush holds the file for milliseconds
PLAIN_EVERY_S = 10.0  # piped output: a running cell's progress line at most this often
ACTIVE = ("running", "starting", "waiting")  # a queued cell keeps a study alive
# The folder's order: diverged first (the reason to look), then what needs attention, then the rest.
STATUS_ORDER = {
    "diverged": 0,
    "failed": 1,
    "unreadable": 2,
    "interrupted": 3,
    "running": 4,
    "starting": 5,
    "waiting": 6,
    "done": 7,
    "completed": 7,
}
STYLE = {
    "diverged": "bold red",
    "failed": "red",
    "unreadable": "red",
    "running": "cyan",
    "completed": "green",
}


class RunTail(NamedTuple):
    """What watch reads of one run file."""

    head: RunHead
    rows: StepBlock  # the last TAIL_ROWS rows (all of a shorter run)
    best_eval_bpd: float  # NaN: no finite evaluation


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
    bpd_history: tuple[float, ...]  # training bpd of the tail, bucket means, at most SPARK_WIDTH points
    history_from: int  # the first step of that tail
    forwards: int  # training forwards the latest row covers (gradient accumulation: more than 1)
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
    peak_max_abs: float  # over the tail's rows and every layer; inf once the run had a layer onset
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


def planned_steps(head: RunHead) -> int:
    """The run's planned steps: the file's total_steps, else the config's steps (unless set by epochs)."""
    total = int(head.total_steps)
    if total > 0:
        return total
    train = head.config.get("train", {})
    if isinstance(train, dict) and train.get("epochs") is None and isinstance(train.get("steps"), int):
        return int(train["steps"])
    return -1


def log10(value: float) -> float:
    return math.log10(value) if math.isfinite(value) and value > 0 else math.nan


def has_layer_records(rows: StepBlock) -> bool:
    """False for rows recorded with diagnostics off: NaN everywhere, never flagged."""
    return bool(rows.max_abs.size and (np.isfinite(rows.max_abs).any() or rows.nonfinite.any()))


def top_layers(tail: RunTail, top: int = TOP_LAYERS, trend_rows: int = TREND_ROWS) -> tuple[LayerPeak, ...]:
    rows, head = tail.rows, tail.head
    n = len(rows.step)
    if not n or not has_layer_records(rows):
        return ()
    values = np.asarray(rows.max_abs[-1], dtype=np.float64)
    earlier = np.asarray(rows.max_abs[max(0, n - 1 - trend_rows)], dtype=np.float64)
    flags = np.asarray(rows.nonfinite[-1], dtype=bool)
    # Non-finite outputs rank above every finite one; an unflagged NaN was not measured (did not run).
    candidates = [i for i in range(len(values)) if flags[i] or np.isfinite(values[i])]
    ranked = sorted(candidates, key=lambda i: math.inf if flags[i] else float(values[i]), reverse=True)
    return tuple(
        LayerPeak(
            head.layer_names[i],
            head.layer_kinds[i],
            float(values[i]),
            bool(flags[i]),
            log10(float(values[i])) - log10(float(earlier[i])) if n > 1 else math.nan,
        )
        for i in ranked[:top]
    )


def recent_peak(tail: RunTail) -> float:
    """The largest max |output| over the tail's rows; inf once a layer went non-finite (in the tail, or
    at the run's onset before it); NaN without per-layer records."""
    head, rows = tail.head, tail.rows
    if head.nan_onset_step >= 0 and head.nan_onset_layer in head.layer_names:
        return math.inf
    if not len(rows.step) or not has_layer_records(rows):
        return math.nan
    if rows.nonfinite.any():
        return math.inf
    finite = rows.max_abs[np.isfinite(rows.max_abs)]
    return float(finite.max()) if finite.size else math.nan


def cell_line(tail: RunTail, name: str) -> CellLine:
    head, rows = tail.head, tail.rows
    return CellLine(
        name=name,
        status=head.status,
        phase=head.phase,
        step=head.last_step,
        total_steps=planned_steps(head),
        bpd=float(rows.bpd[-1]) if len(rows.step) else math.nan,
        peak_max_abs=recent_peak(tail),
        onset_step=head.nan_onset_step,
        onset_layer=head.nan_onset_layer,
        diverged=is_diverged(head),
    )


def _no_file(name: str, status: str) -> CellLine:
    return CellLine(name, status, "", -1, -1, math.nan, math.nan, -1, "", False)


def run_view(tail: RunTail, name: str) -> RunView:
    head, rows = tail.head, tail.rows
    line = cell_line(tail, name)
    rate = steps_per_second(rows.step, rows.wall_time)
    remaining = line.total_steps - line.step
    running = head.status == "running" and line.total_steps > 0 and remaining > 0
    train = head.config.get("train", {})
    m = train.get("init_batches", -1) if isinstance(train, dict) else -1
    return RunView(
        name=name,
        status=head.status,
        phase=line.phase,
        init_batches=int(m) if isinstance(m, int) else -1,
        step=line.step,
        total_steps=line.total_steps,
        bpd=line.bpd,
        best_eval_bpd=tail.best_eval_bpd,
        bpd_history=bucket_means(rows.bpd),
        history_from=int(rows.step[0]) if len(rows.step) else 0,
        forwards=int(rows.forwards[-1]) if len(rows.step) else 1,
        steps_per_s=rate,
        eta_s=remaining / rate if running and rate > 0 else math.nan,
        top_layers=top_layers(tail),
        onset_step=head.nan_onset_step,
        onset_layer=head.nan_onset_layer,
    )


def _order(cell: CellLine) -> tuple[int, int, str]:
    rank = 0 if cell.diverged else STATUS_ORDER.get(cell.status, 3)
    return rank, cell.onset_step if cell.diverged else 0, cell.name


def watch_snapshot(
    target: Path,
    records: Sequence[tuple[str, RunTail]],
    *,
    single: bool = False,
    unreadable: Sequence[str] = (),
    queued: Sequence[tuple[str, str]] = (),
    study_running: int = 0,
    notes: Sequence[str] = (),
) -> WatchSnapshot:
    """The snapshot of named run tails; `queued`: (cell name, state) of the study's cells without a run
    file (waiting, starting, or how one ended before its file was made)."""
    cells = [cell_line(tail, name) for name, tail in records]
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
