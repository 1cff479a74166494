"""Stability reports: what the run files say about when, where and why a flow diverged.

Data extraction (pure, tested) lives in `runs`, `curves`, `layers`, `grid` and `diagnose`; drawing in
`draw_steps` and `draw_layers`; the document in `document` and `build`; the terminal in `console` and
`watch`. The names below load on first use, so importing one submodule (the watch) never pulls in
matplotlib.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "Diagnosis": "flowdiag.report.diagnose",
    "diagnose": "flowdiag.report.diagnose",
    "ReportSummary": "flowdiag.report.build",
    "RunRow": "flowdiag.report.build",
    "build_report": "flowdiag.report.build",
    "render_summary": "flowdiag.report.console",
    "collect_runs": "flowdiag.report.runs",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flowdiag.report' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)


__all__ = sorted(_PUBLIC)
