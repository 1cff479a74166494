"""The terminal side of `flowdiag report`: a rich table of runs, the diagnoses, where the files are."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from flowdiag.report.build import ReportSummary, headline_counts
from flowdiag.report.runs import NOT_GIVEN
from flowdiag.report.wording import diagnosis_lines, fmt_bpd, fmt_rate, fmt_step, headline

_STATUS_STYLE = {"completed": "green", "diverged": "bold red", "running": "cyan", "failed": "red"}


def runs_table(summary: ReportSummary) -> Table:
    table = Table(title=summary.title, title_justify="left")
    table.add_column("run")
    table.add_column("status")
    for column in ("steps", "final bpd", "best held-out bpd", "onset step"):
        table.add_column(column, justify="right")
    table.add_column("onset")
    accumulated = any(row.forwards > 1 for row in summary.runs)  # gradient accumulation somewhere
    if accumulated:
        table.add_column("forwards/row", justify="right")
    for row in summary.runs:
        table.add_row(
            row.label,
            Text(row.status, style=_STATUS_STYLE.get(row.status, "yellow")),
            str(row.steps),
            fmt_bpd(row.final_bpd),
            fmt_bpd(row.best_bpd),
            fmt_step(row.onset_step),
            row.onset_layer or "-",
            *[str(row.forwards)] * accumulated,
        )
    return table


def grid_table(summary: ReportSummary) -> Table:
    table = Table(title="M × λ × batch size", title_justify="left")
    for column in ("M", "λ", "batch", "diverged", "best held-out bpd"):
        table.add_column(column, justify="right")
    for cell in summary.cells:
        k = cell.key
        rate = fmt_rate(cell.n_diverged, cell.n_runs)
        m, lam, batch = (NOT_GIVEN if v is None else f"{v:g}" for v in (k.init_batches, k.lam, k.batch_size))
        table.add_row(m, lam, batch, rate, fmt_bpd(cell.best_bpd))
    return table


def render_summary(summary: ReportSummary, console: Console) -> None:
    """Print the runs, the grid (if any), every diagnosis with its likely cause, and the files written."""
    console.print(runs_table(summary))
    console.print(headline_counts(list(summary.diagnoses), len(summary.runs), summary.threshold))
    if summary.cells:
        console.print(grid_table(summary))
    for label, diagnosis in summary.diagnoses:
        style = "bold red" if diagnosis.severity == "diverged" else "bold yellow"
        console.print(Text(f"{label}: {headline(diagnosis)}", style=style))
        for line in diagnosis_lines(diagnosis):
            console.print(Text(f"  • {line}", style="bold" if line.startswith("likely cause") else ""))
    console.print(f"report: {summary.markdown}  ·  {summary.html}  ({len(summary.figures)} figures)")
