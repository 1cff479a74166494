"""The terminal side of `flowdiag report`: a rich table of runs, the diagnoses, where the files are."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from flowdiag.report.build import ReportSummary, headline_counts
from flowdiag.report.wording import (
    comparison_sentence,
    diagnosis_lines,
    fmt_interval,
    fmt_rate,
    fmt_setting,
    fmt_step,
    headline,
)

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
            row.final_text,  # a diverged run's 1e24 is its blow-up: how it ended instead
            row.best_text,
            fmt_step(row.onset_step),
            row.onset_layer or "-",
            *[str(row.forwards)] * accumulated,
        )
    return table


def grid_table(summary: ReportSummary) -> Table:
    table = Table(title="M × λ × batch size", title_justify="left")
    for column in ("M", "λ", "batch", "diverged", "95 % interval", "best held-out bpd"):
        table.add_column(column, justify="right")
    for cell in summary.cells:
        k = cell.key
        rate = fmt_rate(cell.n_diverged, cell.n_runs)
        m, lam, batch = (fmt_setting(v) for v in (k.init_batches, k.lam, k.batch_size))
        table.add_row(m, lam, batch, rate, fmt_interval(cell.ci95), cell.bpd_text(cell.best_bpd))
    return table


_VERDICT_STYLE = {"better": "green", "worse": "red", "cannot tell": "yellow"}


def print_comparisons(summary: ReportSummary, console: Console) -> None:
    """One line per comparison, worded from its verdict; the runs left out, and why."""
    for line in summary.not_counted:
        console.print(Text(line, style="yellow"))
    for entry in summary.comparisons:
        console.print(Text(comparison_sentence(entry), style=_VERDICT_STYLE.get(entry["verdict"], "")))


def render_summary(summary: ReportSummary, console: Console) -> None:
    """Print the runs, the grid (if any), the comparisons' verdicts, every diagnosis with its likely cause,
    and the files written."""
    console.print(runs_table(summary))
    console.print(headline_counts(list(summary.diagnoses), len(summary.runs), summary.threshold))
    if summary.cells:
        console.print(grid_table(summary))
    print_comparisons(summary, console)
    for label, diagnosis in summary.diagnoses:
        style = "bold red" if diagnosis.severity == "diverged" else "bold yellow"
        console.print(Text(f"{label}: {headline(diagnosis)}", style=style))
        for line in diagnosis_lines(diagnosis):
            console.print(Text(f"  • {line}", style="bold" if line.startswith("likely cause") else ""))
    console.print(f"report: {summary.markdown}  ·  {summary.html}  ({len(summary.figures)} figures)")
    console.print(f"summary: {summary.summary_json}  ·  {summary.summary_csv}")
