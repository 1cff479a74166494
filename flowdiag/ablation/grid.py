"""The ablation grid, as data: which settings are axes, which are fixed, and one RunConfig per cell.

Settings come from three layers, later ones winning: RunConfig defaults (with the ablation's own
defaults on top), a TOML file (`--config`), then the command line. Every listable trainer option
may be a list; a list of more than one value is an axis. M, λ, batch size and seed are always cell
parameters, so every trial carries them whatever the grid. Every other setting is fixed: its value
(given or default) is part of the study's identity, except the settings that only say where or how
a run is done (device, data root, flush and checkpoint intervals), which may differ between machines.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig
from flowdiag.settings.options import (
    OPTIONS_BY_NAME,
    PLACEMENT,
    TRAINER_OPTIONS,
    TrainerOption,
    apply_options,
)

CORE_AXES = ("batch_size", "init_batches", "lam", "seed")

# The paper's Fig. 4 setting (additive coupling, λ = 1e-3, lr = 1e-5) on the embedded digits, with a
# budget short enough for a first run (the README gives the measured time) in which M = 1 still
# diverges and M = 256 does not. Six seeds: the fewest with which Fisher's exact test can tell a
# divergence rate of 6/6 from 0/6 at p < 0.01 (p = 0.0022), so the report's verdict means something.
ABLATION_DEFAULTS: dict[str, list[Any]] = {
    "dataset": ["digits"],
    "coupling": ["additive"],
    "lam": [1e-3],
    "lr": [1e-5],
    "batch_size": [1],
    "init_batches": [1, 256],
    "seed": [0, 1, 2, 3, 4, 5],
    "steps": [200],
    "eval_every": [100],
    "eval_batches": [4],
    "flush_every": [100],
}


@dataclass(frozen=True)
class Grid:
    axes: dict[str, list[Any]]  # option name -> values, in cell order
    fixed: dict[str, Any]  # option name -> the one value

    @property
    def cells(self) -> list[dict[str, Any]]:
        names = list(self.axes)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*self.axes.values())]

    def config_for(self, cell: Mapping[str, Any]) -> RunConfig:
        return apply_options(RunConfig(), {**self.fixed, **cell})

    def fixed_json(self) -> str:
        """The fixed settings that define the study: reusing its name with others is refused."""
        return json.dumps({k: v for k, v in self.fixed.items() if k not in PLACEMENT}, sort_keys=True)


def cell_key(cell: Mapping[str, Any]) -> str:
    return json.dumps(dict(cell), sort_keys=True)


def cell_slug(cell: Mapping[str, Any]) -> str:
    """A folder name that says what the cell is: M1-lam0.001-b1-seed0-coupling_affine."""
    short = {"init_batches": "M", "lam": "lam", "batch_size": "b", "seed": "seed"}
    parts = [f"{v}{cell[k]:g}" if isinstance(cell[k], float) else f"{v}{cell[k]}" for k, v in short.items()]
    parts += [f"{k}_{v:g}" if isinstance(v, float) else f"{k}_{v}" for k, v in cell.items() if k not in short]
    return "-".join(parts).replace("/", "_")


def read_config_file(path: Path) -> dict[str, list[Any]]:
    """A TOML file of option names (dashes or underscores) -> a value or a list of values."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(
            f"--config {path}: cannot read it ({error}); check the path and permissions"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--config {path}: not valid TOML ({error})") from None
    values: dict[str, list[Any]] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "seeds":
            name = "seed"
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            known = ", ".join(sorted(OPTIONS_BY_NAME))
            raise UserError(f"--config {path}: unknown setting {key!r} (known: {known}, seeds)")
        items = value if isinstance(value, list) else [value]
        if not items:
            raise UserError(f"--config {path}: {key} is an empty list; give at least one value")
        if any(isinstance(item, dict | list) for item in items):
            raise UserError(f"--config {path}: {key} must be a value or a list of values")
        values[name] = list(dict.fromkeys(_parse_item(option, item) for item in items))
    return values


def _parse_item(option: TrainerOption, item: Any) -> Any:
    if isinstance(item, bool):
        if option.kind != "bool":
            raise UserError(f"{option.cli_flag}: {item!r} is not a valid {option.kind}")
        return item
    return option.parse(str(item))


def build_grid(cli_lists: Mapping[str, str | None], config_file: Path | None = None) -> Grid:
    """Merge defaults, file and command line (comma lists as text) into a Grid."""
    values: dict[str, list[Any]] = {name: list(v) for name, v in ABLATION_DEFAULTS.items()}
    if config_file is not None:
        values.update(read_config_file(config_file))
    for name, text in cli_lists.items():
        if text is None:
            continue
        option = OPTIONS_BY_NAME[name]
        if isinstance(text, bool):  # an on/off flag
            values[name] = [text]
        elif option.listable:
            values[name] = option.parse_list(text)
        elif "," in text and option.kind not in ("str", "bool"):
            raise UserError(f"{option.cli_flag} takes one value, not a list: {text!r}")
        else:
            values[name] = [option.parse(text)]
    for name, items in values.items():
        if len(items) > 1 and not OPTIONS_BY_NAME[name].listable:
            raise UserError(f"{OPTIONS_BY_NAME[name].cli_flag} takes one value, not a list")
        if len(items) > 1 and None in items:
            raise UserError(f"{OPTIONS_BY_NAME[name].cli_flag}: 'none' cannot be one value of a grid axis")
    axes = {name: values.get(name, [OPTIONS_BY_NAME[name].default]) for name in CORE_AXES}
    axes.update({name: items for name, items in values.items() if len(items) > 1 and name not in axes})
    fixed = {o.name: values.get(o.name, [o.default])[0] for o in TRAINER_OPTIONS if o.name not in axes}
    return Grid(axes=axes, fixed=fixed)
