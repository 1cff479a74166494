"""`watch`'s rendering: plain lines for pipes and files, a rich view for a terminal. Renders a
`WatchSnapshot` (`watch_data`); reads nothing."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from flowdiag.report.watch_data import (
    STATUS_ORDER,
    STYLE,
    TREND_ROWS,
    CellLine,
    RunView,
    WatchSnapshot,
    log10,
    sparkline,
)
from flowdiag.report.wording import fmt, fmt_bpd

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
    return fmt(max_abs) if math.isinf(max_abs) else fmt(log10(max_abs), 3)


def _rate(rate: float) -> str:
    return f"{rate:.3g} steps/s" if math.isfinite(rate) else "- steps/s"


def cell_text(cell: CellLine, name_width: int = 0) -> str:
    """The one plain line for a cell."""
    if cell.step < 0:  # a queued cell, or a file that never read
        return f"{cell.name:<{name_width}}  {cell.status}"
    return (
        f"{cell.name:<{name_width}}  {_status(cell.status, cell.phase):<16}"
        f"  step {_progress(cell.step, cell.total_steps):<11}  bpd {fmt_bpd(cell.bpd):<9}"
        f"  recent peak max|out| {fmt(cell.peak_max_abs):<9}"
        f"  onset {_onset(cell.onset_step, cell.onset_layer)}"
    )


def run_status_line(view: RunView) -> str:
    if view.status == "running" and view.phase == "init":
        return f"{view.name}: ActNorm init over M = {view.init_batches} batches, no training step yet"
    if view.status == "running" and view.step == 0:
        return f"{view.name}: running · no step in the file yet (rows arrive with each flush)"
    # Gradient accumulation: a row (a step) covers several training forwards.
    forwards = f" · {view.forwards} forwards/step" if view.forwards > 1 else ""
    return (
        f"{view.name}: {_status(view.status, view.phase)} · step {_progress(view.step, view.total_steps)}"
        f"{forwards} · bpd {fmt_bpd(view.bpd)} · best held-out {fmt_bpd(view.best_eval_bpd)}"
        f" · {_rate(view.steps_per_s)} · ETA {_duration(view.eta_s)}"
    )


def _spark_line(view: RunView) -> str | None:
    finite = [b for b in view.bpd_history if math.isfinite(b)]
    if not finite:
        return None
    since = f" (steps {view.history_from}-{view.step})" if view.history_from > 1 else ""
    return f"bpd {sparkline(view.bpd_history)}  {fmt_bpd(finite[0])} → {fmt_bpd(finite[-1])}{since}"


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
    for column in ("step", "bpd", "recent peak max |output|"):
        table.add_column(column, justify="right")
    table.add_column("onset")
    for c in snapshot.cells:
        status = Text(
            _status(c.status, c.phase), style=STYLE.get("diverged" if c.diverged else c.status, "yellow")
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
    files = sum(n for s, n in counts.items() if s not in ("waiting", "starting"))  # queued: no file yet
    order = sorted(counts, key=lambda s: STATUS_ORDER.get(s, 3))
    return f"{files} run{'' if files == 1 else 's'}: " + ", ".join(f"{counts[s]} {s}" for s in order)
