"""`flowdiag report`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.runtime.errors import UserError

REPORT_FOLDER = "report"


def default_out(path: Path) -> Path:
    """Next to the runs: PATH/report for a folder, the run folder's report/ for a run.h5 file."""
    return (path.parent if path.suffix == ".h5" else path) / REPORT_FOLDER


@user_errors_exit_2
def report_command(
    path: Annotated[
        Path, typer.Argument(help="A run folder or run.h5, or an ablation / tune-lambda output folder.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: PATH/report, next to the runs).")
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="Report title.")] = None,
    fig5_step: Annotated[
        int, typer.Option("--fig5-step", help="Step for the per-coupling max |output| figure.")
    ] = 2,
    threshold: Annotated[float, typer.Option("--threshold", help="Blow-up threshold on max |output|.")] = 1e4,
    max_layer_maps: Annotated[
        int, typer.Option("--max-layer-maps", help="Runs that get layer x step heatmaps (diverged first).")
    ] = 6,
) -> None:
    """Write report.md, a self-contained report.html and PNGs; print a summary and a diagnosis per run.
    Runs are read one at a time, a block of steps at a time: a run of any length fits in memory."""
    # Checked before h5py and matplotlib load: a typo costs no start-up.
    if fig5_step < 1:
        raise UserError(f"--fig5-step must be a positive step number, got {fig5_step}")
    if not threshold > 0:
        raise UserError(f"--threshold must be positive, got {threshold}")
    if max_layer_maps < 0:
        raise UserError(f"--max-layer-maps must be 0 or more, got {max_layer_maps}")
    if not path.exists():
        raise UserError(
            f"{path} does not exist: give a run folder, a run.h5 file or an ablation output folder"
        )
    from flowdiag.report import build_report, find_runs, render_summary  # h5py, matplotlib

    runs = find_runs(path)
    target = out or default_out(path)
    command = "flowdiag " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if sys.argv[1:] else None
    summary = build_report(
        runs,
        target,
        title=title or f"flowdiag report: {path}",
        command=command,
        fig5_step=fig5_step,
        threshold=threshold,
        max_layer_maps=max_layer_maps,
    )
    render_summary(summary, console)
