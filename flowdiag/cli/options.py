"""Typer parameters for the trainer options, added to a command's signature from one table.

The defaults shown are the ones the command really uses: `ablate` runs the paper's Fig. 4 setting
(`ABLATION_DEFAULTS`), `train` the config dataclasses' own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from flowdiag.settings.options import TRAINER_OPTIONS, TrainerOption


def shown(value: Any) -> str:
    """A default as the help prints it: 1e-05, not '1e-05'; none for None; lists comma-separated."""
    if isinstance(value, list | tuple):
        return ",".join(shown(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def with_default(help_text: str, default: Any) -> str:
    """Help with its default as click would print it, minus the parentheses click adds to text."""
    return f"{help_text} [default: {shown(default)}]"


def _typer_parameter(option: TrainerOption, *, as_lists: bool, default: Any) -> inspect.Parameter:
    # The parameters default to None ("not given"), so the real default goes into the help text.
    if option.kind == "bool" and not (as_lists and option.listable):
        flag = f"{option.cli_flag}/--no-{option.cli_flag[2:]}"
        if option.name == "stop_on_divergence":
            flag = "--stop-on-divergence/--keep-going"
        annotation: Any = Annotated[
            bool | None,
            typer.Option(
                flag,
                help=with_default(option.help, default),
                show_default=False,
                rich_help_panel=option.panel,
            ),
        ]
    else:
        listed = as_lists and option.listable
        help_text = option.help + (" Comma list: one grid axis." if listed else "")
        metavar = option.metavar + (",..." if listed else "")
        annotation = Annotated[
            str | None,
            typer.Option(
                option.cli_flag,
                help=with_default(help_text, default),
                show_default=False,
                metavar=metavar,
                rich_help_panel=option.panel,
            ),
        ]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def with_trainer_options(
    *,
    as_lists: bool,
    exclude: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add every trainer option to a typer command's signature (the command takes **kwargs).

    `defaults`: the command's own defaults where they differ from the config dataclasses'.
    """
    own_defaults = defaults or {}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.kind != p.VAR_KEYWORD
        ]
        extra = [
            _typer_parameter(o, as_lists=as_lists, default=own_defaults.get(o.name, o.default))
            for o in TRAINER_OPTIONS
            if o.name not in exclude
        ]
        command.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + extra}
        return command

    return decorate
