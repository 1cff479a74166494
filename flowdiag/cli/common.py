"""What every command shares: the error boundary and the rich progress bar for training."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from flowdiag.errors import UserError

# Wide enough for the summary tables when output goes to a file or a pipe (rich assumes 80 there).
console = Console(width=None if sys.stdout.isatty() else 140)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print a one-line error (plain echo: rich would wrap it) and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def user_errors_exit_2(command: F) -> F:
    """Domain errors become one line on stderr and exit code 2; bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise fail(str(error)) from None

    return wrapper  # type: ignore[return-value]


class RichProgress:
    """The trainer's ProgressSink on a rich progress bar: step, bpd and throughput."""

    def __init__(self, transient: bool = False) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("bpd {task.fields[bpd]:.3f}"),
            TextColumn("{task.fields[rate]:.1f} steps/s"),
            TimeRemainingColumn(),
            console=console,
            transient=transient,
        )
        self._task: Any = None

    def start(self, total_steps: int, description: str) -> None:
        self._progress.start()
        self._task = self._progress.add_task(description, total=total_steps, bpd=float("nan"), rate=0.0)

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        self._progress.update(self._task, completed=step, bpd=bpd, rate=steps_per_second)

    def stop(self) -> None:
        self._progress.stop()
