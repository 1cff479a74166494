"""`flowdiag export`: runs converted after the fact for other tools (TensorBoard)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.runtime.errors import UserError

AUTO = "auto"


def parse_stride(text: str) -> int | None:
    """`auto` -> None (the export picks it per run); else a positive number of steps."""
    if text.strip().lower() == AUTO:
        return None
    try:
        stride = int(text)
    except ValueError:
        stride = 0
    if stride < 1:
        raise UserError(f"--stride must be {AUTO} or a positive number of steps, got {text!r}")
    return stride


@contextmanager
def _progress_bar() -> Iterator[object]:
    """A bar per run on a terminal (rows written of rows in all); nothing when output is piped."""
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, object] = {}

        def advance(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)  # type: ignore[arg-type]

        yield advance


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
    stride: Annotated[
        str,
        typer.Option(
            "--stride",
            help="Steps pooled into one point of the per-layer series and histograms (the first "
            "non-finite value, else the largest); auto: as few as keep a run's per-layer events "
            "near 100 MB (1 for runs of a few thousand steps).",
        ),
    ] = AUTO,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the event files of runs exported before.")
    ] = False,
) -> None:
    """Convert run files for TensorBoard: loss, bpd, penalty, grad norm, lr and the largest max |output|
    at every step; per-layer max |output| and log-det and histograms per level every --stride steps;
    the diagnosis; and hparams with each run's outcome (the HParams view is the ablation table)."""
    if tensorboard is None:
        raise UserError("nothing to export to: give --tensorboard DIR")
    steps = parse_stride(stride)
    if not path.exists():
        raise UserError(
            f"{path} does not exist: give a run folder, a run.h5 file or an ablation output folder"
        )
    # Imported here, once the arguments are good: h5py, and torch for TensorBoard's writer.
    from flowdiag.report.export import export_tensorboard

    with _progress_bar() as progress:
        exported = export_tensorboard(
            path,
            tensorboard,
            overwrite=overwrite,
            stride=steps,
            progress=progress,  # type: ignore[arg-type]
        )
    for run in exported:
        every = "every step" if run.stride == 1 else f"pooled every {run.stride} steps"
        line = f"{run.event_dir}: {run.steps} steps ({every} per layer), {run.status} (from {run.source})"
        console.print(Text(line), soft_wrap=True)
    console.print(Text(f"view with: tensorboard --logdir {tensorboard}"), soft_wrap=True)
