"""`watch`: a live view of one run, or of every run of an ablation, read from the HDF5 files as they grow.

Three layers, as for the report: `watch_snapshot` turns run records into a `WatchSnapshot` (pure, tested);
`snapshot_lines` (plain text) and `snapshot_view` (rich) only render it; `SnapshotReader` and `watch` do
the reading and the loop. The trainer opens a file only for the length of a flush and `read_run` opens it
without locking, so reading never blocks a run; a read that lands inside a flush fails, and the file's
last good record is shown until the next read.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flowdiag.ablation.grid import cell_slug
from flowdiag.errors import UserError
from flowdiag.files import RUN_FILE
from flowdiag.report.runs import best_eval_bpd, find_run_files, has_layer_records, is_diverged
from flowdiag.report.wording import fmt, fmt_bpd
from flowdiag.store import RunRecord, read_run

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
_RANK = {
    "diverged": 0,
    "failed": 1,
    "unreadable": 2,
    "interrupted": 3,
    "running": 4,
    "starting": 5,
    "waiting": 6,
    "completed": 7,
}
_STYLE = {
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


def _log10(value: float) -> float:
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
            _log10(float(values[i])) - _log10(float(earlier[i])) if rows > 1 else math.nan,
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
    rank = 0 if cell.diverged else _RANK.get(cell.status, 3)
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


def summary_line(snapshot: WatchSnapshot) -> str:
    """The last line: the run's outcome, or the count of runs per status."""
    if snapshot.run is not None:
        v = snapshot.run
        return (
            f"{v.name}: {_status(v.status, v.phase)} at step {_progress(v.step, v.total_steps)}"
            f" · best held-out bpd {fmt_bpd(v.best_eval_bpd)}"
            f" · NaN onset {_onset(v.onset_step, v.onset_layer)}"
        )
    counts: dict[str, int] = {}
    for cell in snapshot.cells:
        status = "diverged" if cell.diverged and cell.status != "running" else cell.status
        counts[status] = counts.get(status, 0) + 1
    files = sum(n for s, n in counts.items() if s not in ("waiting", "starting"))
    order = sorted(counts, key=lambda s: _RANK.get(s, 3))
    return f"{files} run{'' if files == 1 else 's'}: " + ", ".join(f"{counts[s]} {s}" for s in order)


# --- rendering -----------------------------------------------------------------------------------


def _progress(step: int, total: int) -> str:
    if step < 0:
        return "-"
    return f"{step}/{total}" if total > 0 else str(step)


def _status(status: str, phase: str) -> str:
    return f"{status} (init)" if status == "running" and phase == "init" else status


def _onset(step: int, layer: str) -> str:
    return f"step {step} in {layer or '(layer not recorded)'}" if step >= 0 else "none"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _trend(value: float) -> str:
    if not math.isfinite(value):
        return ""
    arrow = "↑" if value > 0.005 else "↓" if value < -0.005 else "→"
    return f"{arrow} {value:+.2f}"


def _log_text(max_abs: float) -> str:
    return fmt(max_abs) if math.isinf(max_abs) else fmt(_log10(max_abs), 3)


def _rate(rate: float) -> str:
    return f"{rate:.3g} steps/s" if math.isfinite(rate) else "- steps/s"


def cell_text(cell: CellLine, name_width: int = 0) -> str:
    """The one plain line for a cell."""
    if cell.step < 0:  # a queued cell, or a file that never read
        return f"{cell.name:<{name_width}}  {cell.status}"
    return (
        f"{cell.name:<{name_width}}  {_status(cell.status, cell.phase):<16}"
        f"  step {_progress(cell.step, cell.total_steps):<11}  bpd {fmt_bpd(cell.bpd):<9}"
        f"  peak max|out| {fmt(cell.peak_max_abs):<9}  onset {_onset(cell.onset_step, cell.onset_layer)}"
    )


def run_status_line(view: RunView) -> str:
    if view.status == "running" and view.phase == "init":
        return f"{view.name}: ActNorm init over M = {view.init_batches} batches, no training step yet"
    if view.status == "running" and view.step == 0:
        return f"{view.name}: running · no step in the file yet (rows arrive with each flush)"
    return (
        f"{view.name}: {_status(view.status, view.phase)} · step {_progress(view.step, view.total_steps)}"
        f" · bpd {fmt_bpd(view.bpd)} · best held-out {fmt_bpd(view.best_eval_bpd)}"
        f" · {_rate(view.steps_per_s)} · ETA {_duration(view.eta_s)}"
    )


def _spark_line(view: RunView) -> str | None:
    finite = [b for b in view.bpd_history if math.isfinite(b)]
    if not finite:
        return None
    return f"bpd {sparkline(view.bpd_history)}  {fmt_bpd(finite[0])} → {fmt_bpd(finite[-1])}"


def _layers_title(view: RunView) -> str:
    return (
        f"top {len(view.top_layers)} layers by max |output| at step {view.step}"
        f" (trend: change of log10 over the last {TREND_ROWS} rows)"
    )


def run_lines(view: RunView) -> list[str]:
    lines = [run_status_line(view)]
    spark = _spark_line(view)
    if spark:
        lines.append(spark)
    if view.top_layers:
        width = max(len(p.name) for p in view.top_layers)
        lines.append(_layers_title(view) + ":")
        lines += [
            f"  {p.name:<{width}}  {p.kind:<8}  {fmt(p.max_abs):>9}  log10 {_log_text(p.max_abs):>5}"
            f"  {_trend(p.trend)}".rstrip()
            for p in view.top_layers
        ]
    lines.append(f"NaN onset: {_onset(view.onset_step, view.onset_layer)}")
    return lines


def snapshot_lines(snapshot: WatchSnapshot) -> list[str]:
    """The snapshot as plain text: for piped output and `--once`."""
    if snapshot.run is not None:
        lines = run_lines(snapshot.run)
    else:
        width = max((len(c.name) for c in snapshot.cells), default=0)
        lines = [f"{snapshot.target}: {len(snapshot.cells)} cells"]
        lines += [cell_text(c, width) for c in snapshot.cells]
    return lines + [f"note: {n}" for n in snapshot.notes]


def _run_renderable(view: RunView) -> list[RenderableType]:
    parts: list[RenderableType] = [Text(run_status_line(view), style="red" if view.onset_step >= 0 else "")]
    spark = _spark_line(view)
    if spark:
        parts.append(Text(spark))
    if view.top_layers:
        table = Table(title=_layers_title(view), title_justify="left")
        for column, justify in (("layer", "left"), ("kind", "left"), ("max |output|", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        table.add_column("log10", justify="right")
        table.add_column("trend", justify="right")
        for p in view.top_layers:
            style = "bold red" if p.nonfinite else ""
            table.add_row(
                p.name, p.kind, Text(fmt(p.max_abs), style=style), _log_text(p.max_abs), _trend(p.trend)
            )
        parts.append(table)
    parts.append(Text(f"NaN onset: {_onset(view.onset_step, view.onset_layer)}"))
    return parts


def _cells_table(snapshot: WatchSnapshot) -> Table:
    table = Table(title=f"{snapshot.target}: {len(snapshot.cells)} cells", title_justify="left")
    table.add_column("cell", no_wrap=True)
    table.add_column("status")
    for column in ("step", "bpd", "peak max |output|"):
        table.add_column(column, justify="right")
    table.add_column("onset")
    for c in snapshot.cells:
        status = Text(
            _status(c.status, c.phase), style=_STYLE.get("diverged" if c.diverged else c.status, "yellow")
        )
        if c.step < 0:
            table.add_row(c.name, status, "-", "-", "-", "-")
            continue
        onset = _onset(c.onset_step, c.onset_layer)
        table.add_row(
            c.name, status, _progress(c.step, c.total_steps), fmt_bpd(c.bpd), fmt(c.peak_max_abs), onset
        )
    return table


def snapshot_view(snapshot: WatchSnapshot) -> RenderableType:
    """The snapshot for a terminal."""
    parts = _run_renderable(snapshot.run) if snapshot.run is not None else [_cells_table(snapshot)]
    parts += [Text(f"note: {n}", style="yellow") for n in snapshot.notes]
    return Group(*parts)


# --- reading -------------------------------------------------------------------------------------


class Target(NamedTuple):
    path: Path  # as given
    root: Path  # what run names are relative to
    single: Path | None  # the run file, when PATH is one run


def resolve_target(path: Path) -> Target:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder, its run.h5 or an ablation output folder")
    if path.is_file():
        return Target(path, path.parent, path)
    if (path / RUN_FILE).is_file():
        return Target(path, path, path / RUN_FILE)
    return Target(path, path, None)


def read_queue(db: Path) -> tuple[tuple[tuple[str, str], ...], int] | None:
    """Cells the study has queued or started, as (slug, waiting | starting), and its RUNNING trials.

    Read straight from Optuna's SQLite schema, read-only: importing optuna would cost a second per
    tick. None when the file is absent or cannot be read now (locked by a writer, another schema).
    """
    if not db.is_file():
        return None
    query = (
        "SELECT t.state, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id"
        " WHERE a.key = 'cell' AND t.state IN ('WAITING', 'RUNNING')"
    )
    try:
        uri = db.resolve().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0.5)) as connection:
            rows = connection.execute(query).fetchall()
            running = connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:
        return None
    cells = []
    for state, value in rows:
        try:
            slug = cell_slug(json.loads(json.loads(value)))  # value_json holds the JSON text of the cell
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        cells.append((slug, "waiting" if state == "WAITING" else "starting"))
    return tuple(cells), int(running)


def _read_retrying(file: Path) -> RunRecord:
    for attempt in range(READ_TRIES):
        try:
            return read_run(file)
        except UserError:
            if attempt == READ_TRIES - 1:
                raise
            time.sleep(READ_RETRY_S)
    raise AssertionError("unreachable")


class SnapshotReader:
    """Reads a target again and again; a read that fails shows the file's last good record instead."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._last: dict[Path, RunRecord] = {}
        self._queue: tuple[tuple[tuple[str, str], ...], int] = ((), 0)

    def read(self, *, first: bool = False) -> WatchSnapshot:
        """One snapshot. On the first read, a bad run file or a folder with nothing in it is a UserError."""
        t = self.target
        files = [t.single] if t.single is not None else find_run_files(t.root)
        records: list[tuple[str, RunRecord]] = []
        unreadable: list[str] = []
        notes: list[str] = []
        for file in files:
            name = run_name(file, t.root)
            try:
                # Retry a file never read yet: it may be a new run's file caught while being created.
                record = read_run(file) if file in self._last else _read_retrying(file)
            except UserError as error:
                if file not in self._last:
                    if first and t.single is not None:
                        raise
                    unreadable.append(name)
                    notes.append(str(error))
                    continue
                record = self._last[file]
            self._last[file] = record
            records.append((name, record))
        if t.single is None:
            self._queue = read_queue(t.root / STUDY_FILE) or self._queue
        queued, study_running = self._queue
        if first and not records:
            if unreadable:
                raise UserError(notes[0])
            if not queued:
                raise UserError(
                    f"no {RUN_FILE} found under {t.root}: "
                    "give a run folder, its run.h5 or an ablation output folder"
                )
        return watch_snapshot(
            t.path,
            records,
            single=t.single is not None,
            unreadable=unreadable,
            queued=queued,
            study_running=study_running,
            notes=notes,
        )


# --- the loop ------------------------------------------------------------------------------------


def _follow(
    reader: SnapshotReader, snapshot: WatchSnapshot, interval: float, deadline: float | None
) -> Iterator[WatchSnapshot]:
    """Snapshots until nothing runs (or the deadline passes), the first one included."""
    yield snapshot
    # A folder's next cell may start a moment after the last one ended: confirm with a second read.
    quiet_reads_to_end = 1 if reader.target.single is not None else 2
    quiet = 0
    while True:
        quiet = 0 if snapshot.active else quiet + 1
        if quiet >= quiet_reads_to_end or (deadline is not None and time.monotonic() >= deadline):
            return
        wait = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
        time.sleep(wait)
        snapshot = reader.read()
        yield snapshot


def _print_lines(console: Console, lines: Sequence[str]) -> None:
    for line in lines:
        console.print(Text(line), soft_wrap=True)


def _follow_live(console: Console, snapshots: Iterator[WatchSnapshot]) -> WatchSnapshot:
    last: WatchSnapshot | None = None
    with Live(console=console, auto_refresh=False, transient=False) as live:
        for last in snapshots:
            live.update(snapshot_view(last), refresh=True)
    assert last is not None
    return last


def _follow_plain(console: Console, snapshots: Iterator[WatchSnapshot]) -> WatchSnapshot:
    """Log lines: the first snapshot whole, then a line per cell whose status changed, or whose step
    moved and that has not been printed for PLAIN_EVERY_S."""
    first = next(snapshots)
    _print_lines(console, snapshot_lines(first))
    now = time.monotonic()
    shown = {c.name: (c.status, c.phase, c.step, now) for c in first.cells}
    last = first
    for last in snapshots:
        now = time.monotonic()
        width = max((len(c.name) for c in last.cells), default=0)
        for cell in last.cells:
            before = shown.get(cell.name)
            changed = before is None or before[:2] != (cell.status, cell.phase)
            if changed or (cell.step != before[2] and now - before[3] >= PLAIN_EVERY_S):
                text = run_status_line(last.run) if last.run is not None else cell_text(cell, width)
                _print_lines(console, [text])
                shown[cell.name] = (cell.status, cell.phase, cell.step, now)
    return last


def watch(
    path: Path,
    console: Console,
    *,
    interval: float = 1.0,
    timeout: float | None = None,
    once: bool = False,
) -> WatchSnapshot:
    """Show PATH (a run, its folder, or an ablation / tune-lambda folder) until nothing in it runs.

    A rich live screen on a terminal, plain lines otherwise; `once` prints one snapshot. Returns the last
    snapshot (still running when `timeout` seconds passed first, or on Ctrl-C).
    """
    reader = SnapshotReader(resolve_target(path))
    snapshot = reader.read(first=True)
    if once:
        if console.is_terminal:
            console.print(snapshot_view(snapshot))
        else:
            _print_lines(console, snapshot_lines(snapshot))
        return snapshot
    deadline = None if timeout is None else time.monotonic() + timeout
    snapshots = _follow(reader, snapshot, interval, deadline)
    follow = _follow_live if console.is_terminal else _follow_plain
    try:
        return follow(console, snapshots)
    except KeyboardInterrupt:  # stopping the watch is not an error: the summary still follows
        return reader.read()
