"""`flowdiag export`: runs converted after the fact for other tools (TensorBoard)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.runtime.errors import UserError


@user_errors_exit_2
def export_command(
    path: Annotated[
        Path, typer.Argument(help="A run folder or run.h5, or an ablation / tune-lambda output folder.")
    ],
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            "--tensorboard",
            metavar="DIR",
            help="Write TensorBoard event files, one directory per run under DIR "
            "(needs: pip install 'flowdiag[tensorboard]').",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the event files of runs exported before.")
    ] = False,
) -> None:
    """Convert run files for TensorBoard: scalars, per-layer max |output| and log-det, a histogram per
    step, the diagnosis, and hparams with each run's outcome (the HParams view is the ablation table)."""
    if tensorboard is None:
        raise UserError("nothing to export to: give --tensorboard DIR")
    # Imported here: the report modules it pulls in are not needed to start the CLI.
    from flowdiag.report.export import export_tensorboard

    exported = export_tensorboard(path, tensorboard, overwrite=overwrite)
    for run in exported:
        line = f"{run.event_dir}: {run.steps} steps, {run.status} (from {run.source})"
        console.print(Text(line), soft_wrap=True)
    console.print(Text(f"view with: tensorboard --logdir {tensorboard}"), soft_wrap=True)
