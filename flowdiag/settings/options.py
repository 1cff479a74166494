"""The trainer's settings as command-line options, derived from the config dataclasses.

`flowdiag.settings.config` defines each setting once (type, default, choices, range, help, placement); this
module only turns its fields into options: `train` takes one value each, `ablate` comma lists (a list
of more than one value becomes a grid axis), TOML files the same names. Values are parsed here, not
by click, so a bad value gives our one-line error naming the flag and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import SECTIONS, RunConfig, flag, option_fields, option_name, panel, range_error

Kind = Literal["int", "float", "str", "bool", "choice"]


@dataclass(frozen=True)
class TrainerOption:
    name: str  # the option's python name; the flag is --name-with-dashes
    section: str  # "model" | "data" | "train"
    field: dataclasses.Field
    kind: Kind
    optional: bool  # None ("none") is a value: the setting is off or left to the data
    choices: tuple[str, ...]

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    @property
    def listable(self) -> bool:
        return self.field.metadata["listable"]

    @property
    def placement(self) -> bool:
        return self.field.metadata["placement"]

    @property
    def panel(self) -> str:
        """The `--help` panel it is shown in (flowdiag.settings.config.PANELS)."""
        return panel(self.section, self.field)

    @property
    def cli_flag(self) -> str:
        return flag(self.field)

    @property
    def default(self) -> Any:
        return self.field.default

    @property
    def metavar(self) -> str:
        """What the help shows for the value: its type or its choices, not TEXT."""
        if self.kind == "choice":
            return "|".join(self.choices)
        return {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "bool": "BOOLEAN"}[self.kind]

    def parse(self, text: str) -> Any:
        """One value from its text form, range-checked; UserError names the flag and the fix."""
        text = text.strip()
        if self.optional and text.lower() in ("", "none"):
            return None
        if self.kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{self.cli_flag}: {text!r} is not true or false")
        if self.kind == "choice":
            if text not in self.choices:
                raise UserError(f"{self.cli_flag}: {text!r} is not one of {', '.join(self.choices)}")
            return text
        value: Any = text
        try:
            if self.kind == "int":
                value = int(text)
            elif self.kind == "float":
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
        except ValueError:
            example = self.default if self.default is not None else 1
            raise UserError(
                f"{self.cli_flag}: {text!r} is not a valid {self.kind}; pass e.g. {example}"
            ) from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """A parsed value (from a TOML file, say) within the setting's range."""
        error = range_error(self.field, value)
        if error:
            raise UserError(error)

    def parse_list(self, text: str) -> list[Any]:
        """A comma list; empty items (`1,,2`) are an error, not skipped."""
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise UserError(f"{self.cli_flag}: {text!r} has an empty item; write values like 1,16,256")
        values = [self.parse(item) for item in items]
        return list(dict.fromkeys(values))  # keep order, drop repeats


def _kind(hint: Any) -> tuple[Kind, bool, tuple[str, ...]]:
    """(kind, optional, choices) from a field's type hint."""
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        return "choice", optional, tuple(typing.get_args(hint))
    kinds: dict[Any, Kind] = {int: "int", float: "float", str: "str", bool: "bool"}
    return kinds[hint], optional, ()


def _options() -> tuple[TrainerOption, ...]:
    hints = {section: typing.get_type_hints(cls) for section, cls in SECTIONS.items()}
    options = []
    for section, f in option_fields():
        kind, optional, choices = _kind(hints[section][f.name])
        options.append(TrainerOption(option_name(f), section, f, kind, optional, choices))
    return tuple(options)


TRAINER_OPTIONS: tuple[TrainerOption, ...] = _options()
OPTIONS_BY_NAME = {option.name: option for option in TRAINER_OPTIONS}
PLACEMENT = tuple(option.name for option in TRAINER_OPTIONS if option.placement)


def parse_scalars(values: dict[str, Any]) -> dict[str, Any]:
    """`train`'s options: text -> typed value, None (not given) left out."""
    parsed = {}
    for name, raw in values.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is None or raw is None:
            continue
        parsed[name] = raw if isinstance(raw, bool) else option.parse(str(raw))
    return parsed


def apply_options(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A RunConfig with the given option values (by option name) replacing the base's."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for name, value in values.items():
        option = OPTIONS_BY_NAME[name]
        sections[option.section][option.field.name] = value
    return RunConfig(
        model=dataclasses.replace(base.model, **sections["model"]),
        data=dataclasses.replace(base.data, **sections["data"]),
        train=dataclasses.replace(base.train, **sections["train"]),
    )
