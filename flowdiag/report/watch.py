"""`watch`: a live view of one run, or of every run of an ablation, read from the HDF5 files as they grow.

Three layers, as for the report: `watch_snapshot` turns run tails into a `WatchSnapshot` (pure, tested);
`snapshot_lines` (plain text) and `snapshot_view` (rich) only render it; `SnapshotReader` and `watch` do
the reading and the loop. Of each run file watch reads the head and the last TAIL_ROWS rows, so a tick
costs the same at step 300,000 as at step 30; of a study, its cells file (`study_cells`), never its
database. The trainer opens a file only for the length of a flush and the reader opens it without
locking, so reading never blocks a run; a read that lands inside a flush fails, and the file's last
good tail is shown until the next read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.live import Live
from rich.text import Text

from flowdiag.record.store import open_run
from flowdiag.report.runs import best_eval_bpd, find_run_files
from flowdiag.report.study_cells import StudyCells, read_cells
from flowdiag.report.watch_data import (
    PLAIN_EVERY_S,
    READ_RETRY_S,
    READ_TRIES,
    TAIL_ROWS,
    RunTail,
    WatchSnapshot,
    run_name,
    watch_snapshot,
)
from flowdiag.report.watch_view import cell_text, run_status_line, snapshot_lines, snapshot_view
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CELLS_FILE, RUN_FILE

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


def read_tail(path: Path, rows: int = TAIL_ROWS) -> RunTail:
    """A run file's head, its last `rows` rows and its best evaluation: what one tick shows."""
    with open_run(path) as run:
        return RunTail(run.head, run.tail(rows), best_eval_bpd(run.evals()[1]))


def _read_retrying(file: Path) -> RunTail:
    for attempt in range(READ_TRIES):
        try:
            return read_tail(file)
        except UserError:
            if attempt == READ_TRIES - 1:
                raise
            time.sleep(READ_RETRY_S)
    raise AssertionError("unreachable")


class SnapshotReader:
    """Reads a target again and again; a read that fails shows the file's last good tail instead."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._last: dict[Path, RunTail] = {}
        self._cells: StudyCells | None = None

    def _tails(
        self, files: list[Path], first: bool
    ) -> tuple[list[tuple[str, RunTail]], list[str], list[str]]:
        """(name, tail) per readable file, the names of unreadable ones, and why."""
        t = self.target
        tails: list[tuple[str, RunTail]] = []
        unreadable: list[str] = []
        notes: list[str] = []
        for file in files:
            name = run_name(file, t.root)
            try:
                # Retry a file never read yet: it may be a new run's file caught while being created.
                tail = read_tail(file) if file in self._last else _read_retrying(file)
            except UserError as error:
                if file not in self._last:
                    if first and t.single is not None:
                        raise
                    unreadable.append(name)
                    notes.append(str(error))
                    continue
                tail = self._last[file]
            self._last[file] = tail
            tails.append((name, tail))
        return tails, unreadable, notes

    def read(self, *, first: bool = False) -> WatchSnapshot:
        """One snapshot. On the first read, a bad run file or a folder with nothing in it is a UserError."""
        t = self.target
        files = [t.single] if t.single is not None else find_run_files(t.root)
        tails, unreadable, notes = self._tails(files, first)
        if t.single is None:  # a partial or unknown cells file: the last good one stands
            self._cells = read_cells(t.root) or self._cells
        named = {name for name, _ in tails} | set(unreadable)
        queued = self._cells.without_file(named) if self._cells is not None else []
        if first and not tails:
            if unreadable:
                raise UserError(notes[0])
            if not queued:
                raise UserError(
                    f"no {RUN_FILE} found under {t.root}: "
                    "give a run folder, its run.h5 or an ablation output folder"
                )
        return watch_snapshot(
            t.path,
            tails,
            single=t.single is not None,
            unreadable=unreadable,
            queued=queued,
            study_running=self._cells.running if self._cells is not None else 0,
            notes=notes,
        )


def has_something(path: Path) -> bool:
    """Whether PATH holds what watch can show: a run file, or a study's cells file."""
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    return (path / CELLS_FILE).is_file() or bool(find_run_files(path))


def wait_for(path: Path, console: Console, interval: float, deadline: float | None) -> Target:
    """Wait until PATH exists and holds a run or a cells file, as TensorBoard waits for its logdir: a
    watch started before the run (or the ablation) it follows. One line says so while it waits."""
    said = False
    while not has_something(Path(path)):
        if deadline is not None and time.monotonic() >= deadline:
            raise UserError(f"{path} did not appear before --timeout: check the path, or start the run")
        if not said:
            console.print(Text(f"waiting for {path}: no run file yet"), soft_wrap=True)
            said = True
        wait = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
        time.sleep(wait)
    return resolve_target(path)


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

    A rich live screen on a terminal, plain lines otherwise; `once` prints one snapshot. Without `once`,
    a PATH that does not exist yet (or holds nothing yet) is waited for. Returns the last snapshot (still
    running when `timeout` seconds passed first, or on Ctrl-C).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if once:
        snapshot = SnapshotReader(resolve_target(path)).read(first=True)
        if console.is_terminal:
            console.print(snapshot_view(snapshot))
        else:
            _print_lines(console, snapshot_lines(snapshot))
        return snapshot
    reader = SnapshotReader(wait_for(path, console, interval, deadline))
    snapshot = reader.read(first=True)
    snapshots = _follow(reader, snapshot, interval, deadline)
    follow = _follow_live if console.is_terminal else _follow_plain
    try:
        return follow(console, snapshots)
    except KeyboardInterrupt:  # stopping the watch is not an error: the summary still follows
        return reader.read()
