"""What every command shares: the error boundary and the rich progress bar for training."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from flowdiag.runtime.errors import UserError
from flowdiag.train.progress import ProgressSink

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


class RichProgress(ProgressSink):
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
        self._description = description
        self._progress.start()
        self._task = self._progress.add_task(description, total=total_steps, bpd=float("nan"), rate=0.0)

    def phase(self, name: str) -> None:
        label = f"{self._description} · ActNorm init" if name == "init" else self._description
        self._progress.update(self._task, description=label)

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        self._progress.update(self._task, completed=step, bpd=bpd, rate=steps_per_second)

    def stop(self) -> None:
        self._progress.stop()


class LogProgress(ProgressSink):
    """The same news as plain lines, for output to a file (nohup, CI, a cluster job): the init, a
    line every `every_s` seconds (step, bpd, steps/s) and the last step."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._total = 0
        self._description = ""
        self._last_line = 0.0
        self._last: tuple[int, float, float] | None = None

    def _say(self, text: str) -> None:
        console.print(f"{self._description}: {text}", highlight=False, soft_wrap=True)

    def start(self, total_steps: int, description: str) -> None:
        self._total, self._description = total_steps, description
        self._last_line = time.monotonic()

    def phase(self, name: str) -> None:
        self._say("ActNorm init..." if name == "init" else f"training {self._total} steps")

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        self._last = (step, bpd, steps_per_second)
        if time.monotonic() - self._last_line >= self.every_s:
            self._last_line = time.monotonic()
            self._say(f"step {step}/{self._total} bpd {bpd:.4g} {steps_per_second:.1f} steps/s")

    def evaluated(self, step: int, bpd: float) -> None:
        self._say(f"step {step}: held-out bpd {bpd:.4f}")

    def stop(self) -> None:
        if self._last is not None:
            step, bpd, rate = self._last
            self._say(f"stopped at step {step}/{self._total} bpd {bpd:.4g} {rate:.1f} steps/s")


def training_progress() -> ProgressSink:
    """A bar on a terminal, log lines otherwise."""
    return RichProgress() if console.is_terminal else LogProgress()
