"""The trainer's settings as options, declared once: `train` takes one value each, `ablate` comma
lists (a list of more than one value becomes a grid axis), TOML files the same names.

Each option maps a flag to one field of RunConfig. Values are parsed here, not by click, so a bad
value gives our one-line error naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from flowdiag.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from flowdiag.data import DATASETS
from flowdiag.errors import UserError

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class TrainerOption:
    name: str  # python name; the flag is --name-with-dashes unless `flag` says otherwise
    section: str  # "model" | "data" | "train"
    field: str
    kind: str  # "int" | "float" | "str" | "bool" | "choice" | "optional_int"
    help: str
    choices: tuple[str, ...] = ()
    listable: bool = True  # may be a comma list (a grid axis) in `ablate`
    flag: str = ""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        return next(f.default for f in dataclasses.fields(_SECTIONS[self.section]) if f.name == self.field)

    def parse(self, text: str) -> Any:
        """One value from its text form; UserError names the flag."""
        text = text.strip()
        try:
            if self.kind == "int" or (self.kind == "optional_int" and text.lower() not in ("", "none")):
                return int(text)
            if self.kind == "optional_int":
                return None
            if self.kind == "float":
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
                return value
        except ValueError:
            raise UserError(
                f"{self.cli_flag}: {text!r} is not a valid {self.kind.replace('optional_', '')}"
            ) from None
        if self.kind == "choice" and text not in self.choices:
            raise UserError(f"{self.cli_flag}: {text!r} is not one of {', '.join(self.choices)}")
        if self.kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{self.cli_flag}: {text!r} is not true or false")
        return text

    def parse_list(self, text: str) -> list[Any]:
        """A comma list; empty items (`1,,2`) are an error, not skipped."""
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise UserError(f"{self.cli_flag}: {text!r} has an empty item; write values like 1,16,256")
        values = [self.parse(item) for item in items]
        return list(dict.fromkeys(values))  # keep order, drop repeats


TRAINER_OPTIONS: tuple[TrainerOption, ...] = (
    TrainerOption("dataset", "data", "dataset", "choice", "Data set.", DATASETS),
    TrainerOption(
        "data_root", "data", "root", "str", "Folder (or .npz file) holding the data set.", listable=False
    ),
    TrainerOption(
        "download",
        "data",
        "download",
        "bool",
        "Let torchvision download cifar10/celeba/mnist.",
        listable=False,
    ),
    TrainerOption(
        "image_size", "data", "image_size", "optional_int", "Resize images to this many pixels a side."
    ),
    TrainerOption("n_bits", "data", "n_bits", "int", "Bits per pixel kept (dequantization bins = 2^n_bits)."),
    TrainerOption("held_out", "data", "held_out", "float", "Fraction of images held out for evaluation."),
    TrainerOption("levels", "model", "n_levels", "int", "L: levels of squeeze -> K steps -> split."),
    TrainerOption("steps_per_level", "model", "n_steps", "int", "K: steps of flow per level."),
    TrainerOption("hidden", "model", "hidden", "int", "Width of the coupling networks."),
    TrainerOption("coupling", "model", "coupling", "choice", "Coupling layer.", ("additive", "affine")),
    TrainerOption(
        "affine_scale",
        "model",
        "affine_scale",
        "choice",
        "Affine scale: official Glow or the paper.",
        ("sigmoid", "exp"),
    ),
    TrainerOption(
        "conv", "model", "conv", "choice", "1x1 convolution: LU-decomposed or plain.", ("lu", "plain")
    ),
    TrainerOption(
        "actnorm_eps", "model", "actnorm_eps", "float", "eps in the ActNorm init sigma = 1/sqrt(var + eps)."
    ),
    TrainerOption("batch_size", "train", "batch_size", "int", "Minibatch size."),
    TrainerOption(
        "init_batches",
        "train",
        "init_batches",
        "int",
        "M: minibatches for the cumulative ActNorm init (1 = Glow's).",
    ),
    TrainerOption("lam", "train", "lam", "float", "λ of the log-det penalty, against bits/dim."),
    TrainerOption("lr", "train", "lr", "float", "Learning rate (RAdam)."),
    TrainerOption("steps", "train", "steps", "int", "Optimizer steps."),
    TrainerOption("epochs", "train", "epochs", "optional_int", "Epochs (overrides --steps)."),
    TrainerOption(
        "eval_every", "train", "eval_every", "int", "Steps between held-out evaluations (0: at the end)."
    ),
    TrainerOption(
        "eval_batches", "train", "eval_batches", "int", "Held-out minibatches per evaluation (0: all)."
    ),
    TrainerOption(
        "early_stop", "train", "early_stop", "int", "Stop after N evaluations without improvement (0: off)."
    ),
    TrainerOption("warmup", "train", "warmup", "int", "Linear learning-rate warmup, in steps."),
    TrainerOption("grad_clip", "train", "grad_clip", "float", "Clip the gradient norm to this (0: off)."),
    TrainerOption("seed", "train", "seed", "int", "Random seed."),
    TrainerOption("device", "train", "device", "str", "auto, cpu or cuda[:N].", listable=False),
    TrainerOption(
        "diagnostics", "train", "diagnostics", "bool", "Record per-layer diagnostics.", listable=False
    ),
    TrainerOption(
        "checkpoint_every",
        "train",
        "checkpoint_every",
        "int",
        "Steps between checkpoints (0: at the end).",
        listable=False,
    ),
    TrainerOption(
        "flush_every", "train", "flush_every", "int", "Steps between HDF5 flushes.", listable=False
    ),
    TrainerOption(
        "stop_on_divergence", "train", "stop_on_divergence", "bool", "Stop at the NaN onset.", listable=False
    ),
)
OPTIONS_BY_NAME = {option.name: option for option in TRAINER_OPTIONS}


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
    sections: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    for name, value in values.items():
        option = OPTIONS_BY_NAME[name]
        sections[option.section][option.field] = value
    return RunConfig(
        model=dataclasses.replace(base.model, **sections["model"]),
        data=dataclasses.replace(base.data, **sections["data"]),
        train=dataclasses.replace(base.train, **sections["train"]),
    )
