"""The report's table of runs: one row a run, a bpd only where the run completed (`outcome`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from flowdiag.report.digest import RunDigest
from flowdiag.report.document import Table
from flowdiag.report.layer_naming import named_layer
from flowdiag.report.outcome import run_end
from flowdiag.report.runs import best_eval_bpd, is_diverged, onset_step
from flowdiag.report.wording import fmt_bpd, fmt_step


@dataclass(frozen=True)
class RunRow:
    """A run's line in the runs table (report.md and the terminal)."""

    label: str
    path: Path
    status: str
    steps: int  # last recorded step (0: none)
    # Results only where the run completed (`outcome`): a diverged run's last bpd (1e24) is its
    # blow-up and an interrupted run's is part-trained, so both are NaN here and `end` says why.
    final_bpd: float
    best_bpd: float  # best held-out bpd, NaN if never evaluated
    onset_step: int  # -1: none
    onset_layer: str  # as the report names layers (`layer_naming`); "loss" / "backward" as recorded
    forwards: int  # the most training forwards one row covers (gradient accumulation: more than 1)
    end: str = ""  # "diverged at step 7", "interrupted at step 197 of 1500"; "" for a completed run

    @property
    def final_text(self) -> str:
        """The final bpd, or how the run ended without one."""
        return self.end or fmt_bpd(self.final_bpd)

    @property
    def best_text(self) -> str:
        return fmt_bpd(self.best_bpd) if not self.end else "-"


def run_row(run: RunDigest, label: str) -> RunRow:
    """A run's line in the runs table: a bpd only where the run completed."""
    end = run_end(run.head)
    result = end.is_result
    return RunRow(
        label=label,
        path=run.head.path,
        status=run.head.status,
        steps=run.head.last_step,
        final_bpd=run.final_bpd if result else math.nan,
        best_bpd=best_eval_bpd(run.eval_bpd) if result else math.nan,
        onset_step=onset_step(run.head) if is_diverged(run.head) else -1,
        onset_layer=named_layer(run.head, run.head.nan_onset_layer),
        forwards=run.most_forwards,
        end="" if result else end.text,
    )


def run_rows(runs: list[RunDigest], labels: list[str]) -> list[RunRow]:
    """Every run's line, in the order of the runs."""
    return [run_row(run, label) for run, label in zip(runs, labels, strict=True)]


def runs_table(rows: list[RunRow]) -> Table:
    """The report's table of runs: a bpd only where a run completed, else how it ended."""
    # Gradient accumulation: a row covers several training forwards; said only where it happened.
    accumulated = any(r.forwards > 1 for r in rows)
    header = ["run", "status", "steps", "final bpd", "best held-out bpd", "NaN onset step", "onset"]
    header += ["forwards per row (most)"] * accumulated + ["file"]
    body = [
        [
            r.label,
            r.status,
            str(r.steps),
            r.final_text,
            r.best_text,
            fmt_step(r.onset_step),
            r.onset_layer or "-",
            *[str(r.forwards)] * accumulated,
            str(r.path),
        ]
        for r in rows
    ]
    return Table(header, body)
