"""Typer parameters for the trainer options, added to a command's signature from one table."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from flowdiag.options import TRAINER_OPTIONS, TrainerOption


def _typer_parameter(option: TrainerOption, *, as_lists: bool) -> inspect.Parameter:
    if option.kind == "bool" and not (as_lists and option.listable):
        flag = f"{option.cli_flag}/--no-{option.cli_flag[2:]}"
        if option.name == "stop_on_divergence":
            flag = "--stop-on-divergence/--keep-going"
        annotation: Any = Annotated[
            bool | None, typer.Option(flag, help=option.help, show_default=str(option.default))
        ]
    else:
        help_text = option.help + (" Comma list: one grid axis." if as_lists and option.listable else "")
        annotation = Annotated[
            str | None, typer.Option(option.cli_flag, help=help_text, show_default=str(option.default))
        ]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def with_trainer_options(
    *, as_lists: bool, exclude: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add every trainer option to a typer command's signature (the command takes **kwargs)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.kind != p.VAR_KEYWORD
        ]
        extra = [_typer_parameter(o, as_lists=as_lists) for o in TRAINER_OPTIONS if o.name not in exclude]
        command.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + extra}
        return command

    return decorate
