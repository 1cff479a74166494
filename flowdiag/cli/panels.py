"""`--help` in panels (model, data, training, ablation, output), written by click's own formatter.

typer groups options into panels only through rich, whose renderer alone costs about 0.3 s per
`--help`; this command class writes the same grouping as plain click sections. The trainer options
take their panel from the settings (`flowdiag.settings.config.PANELS`, as typer's `rich_help_panel`);
a command names its own options' panels with `@help_panels(...)`, one line above it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer.core

from flowdiag.settings.config import PANELS

OTHER = "Options"  # options without a panel, --help among them
_ATTRIBUTE = "__help_panels__"
F = TypeVar("F", bound=Callable[..., Any])


def help_panels(**names_by_panel: Sequence[str]) -> Callable[[F], F]:
    """Put a command's own options (by parameter name) in panels: `@help_panels(Output=("out",))`."""

    def tag(command: F) -> F:
        panels = {name: panel for panel, names in names_by_panel.items() for name in names}
        setattr(command, _ATTRIBUTE, {**getattr(command, _ATTRIBUTE, {}), **panels})
        return command

    return tag


class PanelCommand(typer.core.TyperCommand):
    """A typer command whose help lists its options panel by panel: its own panels, its untagged
    options, then PANELS in their order, and --help last."""

    def _panel(self, param: Any) -> str:
        own = getattr(self.callback, _ATTRIBUTE, {})  # typer's wrapper keeps the function's attributes
        return getattr(param, "rich_help_panel", None) or own.get(param.name) or OTHER

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments: list[tuple[str, str]] = []
        panels: dict[str, list[tuple[str, str]]] = {}
        help_record = None
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            elif param.name == "help":
                help_record = record
            else:
                panels.setdefault(self._panel(param), []).append(record)
        sections = [("Arguments", arguments)]
        sections += [(name, rows) for name, rows in panels.items() if name not in PANELS]
        sections += [(name, panels[name]) for name in PANELS if name in panels]
        sections += [(OTHER if OTHER not in panels else "Help", [help_record] if help_record else [])]
        for name, rows in sections:
            if rows:
                with formatter.section(name):
                    formatter.write_dl(rows)
