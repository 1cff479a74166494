"""Stability reports: what the run files say about when, where and why a flow diverged.

Each run is read once, a block at a time, into a digest (`digest`, with `decimate`'s envelopes: every
spike and first non-finite value kept); data extraction (pure, tested) lives in `runs`, `curves`,
`per_layer`, `cells`, `inverse_curves` and `diagnose`, with one naming of layers (`layer_naming`) and
of how a run ended (`outcome`); an ablation's cells of counted runs and summary.json in `study_stats`,
its statistics (scipy) in `statistics`; drawing in `canvas`, `draw_steps`, `draw_layers`, `draw_study`
and `draw_inverse`; the document in `document`, `run_table`, `figure_sections`, `study_sections` and
`build`; the terminal in `console` and
`watch`; other tools' formats in `export`. The names below load on first use, so importing one
submodule (the watch) never pulls in matplotlib.
"""

from __future__ import annotations

# Eager, and light (no matplotlib): `diagnose` is also a submodule's name, so the function must be
# bound here before anything imports the submodule.
from flowdiag.report.diagnose import Diagnosis, diagnose
from flowdiag.report.digest import RunDigest, digest_run
from flowdiag.report.runs import collect_runs, find_runs
from flowdiag.runtime.lazy import lazy_exports

_PUBLIC = {
    "ReportSummary": "flowdiag.report.build",
    "RunRow": "flowdiag.report.build",
    "build_report": "flowdiag.report.build",
    "render_summary": "flowdiag.report.console",
}


__getattr__ = lazy_exports("flowdiag.report", _PUBLIC)


__all__ = ["Diagnosis", "RunDigest", "collect_runs", "diagnose", "digest_run", "find_runs", *sorted(_PUBLIC)]
