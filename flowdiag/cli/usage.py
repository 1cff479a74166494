"""Usage errors (an unknown option or command, a value click itself rejects) in one line, as every
other bad input: `error: No such option: --nope ...; see flowdiag train --help`, exit 2.

click prints such an error under the command's usage and a hint, three lines or more; the app's
group class (`OneLineGroup`) gives each one a one-line `show` on its way out. `flowdiag` alone
still prints the help.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
import typer.core


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """Give a usage error raised inside a one-line `show` naming the command's --help."""
    try:
        yield
    except typer.TyperException as error:
        context = getattr(error, "ctx", None)  # usage errors know their command; other errors do not
        if context is not None and type(error).__name__ != "NoArgsIsHelpError":
            error.show = _one_line(error, f"{context.command_path} --help")  # type: ignore[attr-defined]
        raise


def _one_line(error: Exception, help_command: str) -> Any:
    def show(file: Any = None) -> None:
        message = error.format_message().rstrip(".")  # type: ignore[attr-defined]
        typer.echo(f"error: {message}; see {help_command}", err=True)

    return show


class OneLineGroup(typer.core.TyperGroup):
    """The app's group: its own parsing and its commands' (parsed in `invoke`) fail in one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)
