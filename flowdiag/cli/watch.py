"""`flowdiag watch`: follow a run or an ablation from its HDF5 files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.runtime.errors import UserError


@user_errors_exit_2
def watch_command(
    path: Annotated[
        Path,
        typer.Argument(help="A run folder or its run.h5, or an ablation / tune-lambda output folder."),
    ],
    interval: Annotated[float, typer.Option("--interval", help="Seconds between reads.")] = 1.0,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Stop watching after this many seconds.")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit (for scripts).")] = False,
) -> None:
    """Live view of runs while they are written: per cell status, step, bpd, recent peak max |output|,
    onset; for one run a bpd sparkline, steps/s, ETA and the top layers with their trend. Ends with the
    runs. A PATH that does not exist yet is waited for (not with --once). Reads each run's last rows
    only, and an ablation's cells.json, never its database."""
    # Checked before numpy and h5py load: a typo costs no start-up.
    if not interval > 0:
        raise UserError(f"--interval must be positive, got {interval}")
    if timeout is not None and not timeout >= 0:
        raise UserError(f"--timeout must be zero or more seconds, got {timeout}")
    if once and not path.exists():
        raise UserError(f"{path} does not exist: give a run folder, its run.h5 or an ablation output folder")
    from flowdiag.report.watch import watch
    from flowdiag.report.watch_view import summary_line

    snapshot = watch(path, console, interval=interval, timeout=timeout, once=once)
    console.print(Text(summary_line(snapshot)), soft_wrap=True)
