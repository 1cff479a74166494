"""Stability reports: what the run files say about when, where and why Glow diverged.

Data extraction (pure, tested) lives in `runs`, `curves`, `layers`, `grid` and `diagnose`; drawing in
`draw_steps` and `draw_layers`; the document in `document` and `build`; the terminal in `console` and
`watch`. The CLI calls `collect_runs`, `build_report`, `render_summary` and `watch`.
"""

from flowdiag.report.build import ReportSummary, RunRow, build_report
from flowdiag.report.console import render_summary
from flowdiag.report.diagnose import Diagnosis, diagnose
from flowdiag.report.runs import collect_runs
from flowdiag.report.watch import WatchSnapshot, watch, watch_snapshot

__all__ = [
    "Diagnosis",
    "ReportSummary",
    "RunRow",
    "WatchSnapshot",
    "build_report",
    "collect_runs",
    "diagnose",
    "render_summary",
    "watch",
    "watch_snapshot",
]
