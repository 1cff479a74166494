"""Configs are data: one dataclass per concern, and each setting defined here once.

A setting's type, default and choices are its field's; its flag, help, valid range, help panel and
whether it only says where or how a run is done (placement) are the field's metadata. The
command-line options (`flowdiag.settings.options`), the ablation grid, the TOML files and the
validation all derive from these fields. A config checks its ranges when it is made, so no code
ever holds an invalid one, and the command line rejects a bad value before torch is imported.
Every HDF5 file and checkpoint carries `RunConfig.to_json()`, so a run can always be rebuilt from
its own output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from flowdiag.runtime.errors import UserError

Coupling = Literal["additive", "affine"]
AffineScale = Literal["sigmoid", "exp"]
ConvKind = Literal["lu", "plain"]
# "paper": sigma = 1/sqrt(var + eps), as the paper and this project; "glow": official Glow's
# sigma = 1/(sqrt(var) + eps), which gives 1/eps (1e6) where a channel saw one value.
ActNormInit = Literal["paper", "glow"]
Dataset = Literal["digits", "mnist", "cifar10", "celeba", "folder", "npz"]
Precision = Literal["fp32", "bf16", "fp16"]
# The largest finite value of each format (torch.finfo): past it, a layer's output is inf.
LARGEST_FINITE: dict[str, float] = {
    "fp32": 3.4028234663852886e38,
    "bf16": 3.3895313892515355e38,
    "fp16": 65504.0,
}
FORMAT_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The panels `--help` groups options into, in the order it shows them. A setting's panel is its
# section's unless its metadata names another.
PANELS: tuple[str, ...] = ("Model", "Data", "Training", "Ablation", "Output")
SECTION_PANELS: dict[str, str] = {"model": "Model", "data": "Data", "train": "Training"}
# What `--device` accepts; whether this machine has that device is known only once torch is loaded.
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def setting(
    default: Any,
    help: str,
    *,
    option: str | None = None,
    at_least: float | None = None,
    above: float | None = None,
    listable: bool = True,
    placement: bool = False,
    panel: str | None = None,
) -> Any:
    """A config field that is also a command-line option.

    option: the option's name when it differs from the field's (`levels` for `n_levels`);
    at_least / above: the valid range (inclusive / exclusive lower bound; floats must be finite);
    listable: may be a comma list, a grid axis, in `ablate`;
    placement: says where or how a run is done, not what it computes (device, data root, flush
    interval): left out of an ablation study's identity and of what makes runs comparable;
    panel: the `--help` panel, when not its section's (one of PANELS).
    """
    meta = {"help": help, "option": option, "at_least": at_least, "above": above}
    meta |= {"listable": listable and not placement, "placement": placement, "panel": panel}
    return field(default=default, metadata=meta)


def check_ranges(section: object) -> None:
    """Every setting of one config section in its range; UserError names the flag and the fix."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        if "help" in f.metadata:
            error = range_error(f, getattr(section, f.name))
            if error:
                raise UserError(error)


@dataclass(frozen=True)
class ModelConfig:
    """Glow's shape. `in_channels` and `image_size` come from the data set."""

    in_channels: int = 1
    image_size: int = 8
    n_levels: int = setting(3, "L: levels of squeeze -> K steps -> split.", option="levels", at_least=1)
    n_steps: int = setting(4, "K: steps of flow per level.", option="steps_per_level", at_least=1)
    hidden: int = setting(32, "Width of the coupling networks.", at_least=1)
    coupling: Coupling = setting("additive", "Coupling layer.")
    # Official Glow bounds the affine scale as sigmoid(h + 2); the paper writes exp(s).
    affine_scale: AffineScale = setting("sigmoid", "Affine scale: official Glow's sigmoid or paper's exp.")
    conv: ConvKind = setting("lu", "1x1 convolution: LU-decomposed or plain.")
    learn_top: bool = True
    # A channel that saw a single value per minibatch (var = 0) gets sigma = 1/sqrt(eps) = 1e3 with
    # the paper's formula: the failure mode the paper describes.
    actnorm_eps: float = setting(1e-6, "eps of the ActNorm init.", above=0)
    actnorm_init: ActNormInit = setting(
        "paper", "ActNorm init: paper 1/sqrt(var + eps), or official Glow's 1/(sqrt(var) + eps)."
    )

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class DataConfig:
    dataset: Dataset = setting("digits", "Data set.")
    root: str | None = setting(
        None, "Folder (or .npz file) holding the data set.", option="data_root", placement=True
    )
    n_bits: int = setting(8, "Bits per pixel kept (dequantization bins = 2^n_bits).", at_least=1)
    # Fraction of the images kept out of training, split by `split_seed`.
    held_out: float = setting(0.1, "Fraction of images held out for evaluation.", at_least=0)
    split_seed: int = 0
    download: bool = setting(False, "Let torchvision download cifar10/celeba/mnist.", placement=True)
    image_size: int | None = setting(None, "Resize images to this many pixels a side.", at_least=1)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = setting(16, "Minibatch size.", at_least=1)
    init_batches: int = setting(1, "M: minibatches for the cumulative ActNorm init (1 = Glow's).", at_least=1)
    lam: float = setting(0.0, "λ of the log-det penalty, against bits/dim (0: off).", at_least=0)
    lr: float = setting(1e-3, "Learning rate (RAdam).", above=0)
    steps: int = setting(200, "Optimizer steps.", at_least=1)
    epochs: int | None = setting(None, "Epochs (overrides --steps).", at_least=1)
    eval_every: int = setting(50, "Steps between held-out evaluations (0: at the end).", at_least=0)
    eval_batches: int = setting(4, "Held-out minibatches per evaluation (0: all).", at_least=0)
    early_stop: int = setting(0, "Stop after N evaluations without improvement (0: off).", at_least=0)
    warmup: int = setting(0, "Linear learning-rate warmup, in steps.", at_least=0)
    # Autocast for the forward and backward; log-dets and priors stay in float32 (or float64), and
    # fp16 gets a gradient scaler. Evaluation and the inverse checks run in float32.
    precision: Precision = setting("fp32", "Training precision (autocast); fp16 adds a gradient scaler.")
    grad_clip: float = setting(0.0, "Clip the gradient norm to this (0: off).", at_least=0)
    seed: int = setting(0, "Random seed.", at_least=0)
    device: str = setting("auto", "auto, cpu or cuda[:N].", placement=True)
    dist_timeout: float = setting(
        60.0, "Seconds a rank waits for the others before the run fails (torchrun).", above=0, placement=True
    )
    threads: int = setting(
        0,
        "Intra-op CPU threads (0: auto, one per process unless OMP_NUM_THREADS says).",
        at_least=0,
        placement=True,
    )
    diagnostics: bool = setting(True, "Record per-layer diagnostics.", placement=True, panel="Output")
    checkpoint_every: int = setting(
        0,
        "Steps between checkpoints; one is always saved before step 1 and at the end (0: only those).",
        at_least=0,
        placement=True,
        panel="Output",
    )
    flush_every: int = setting(
        50, "Steps between HDF5 flushes, at most.", at_least=1, placement=True, panel="Output"
    )
    flush_seconds: float = setting(
        2.0, "Seconds between HDF5 flushes, at most.", above=0, placement=True, panel="Output"
    )
    stop_on_divergence: bool = setting(True, "Stop at the NaN onset.", listable=False)
    # torch.compile of the model's log-density (the hooks are traced into the graph: every layer is
    # still recorded). The first step pays the compilation, a minute or more on CPU.
    compile: bool = setting(False, "torch.compile the model (first step compiles).", placement=True)
    sample_temperature: float = 0.7

    def __post_init__(self) -> None:
        check_ranges(self)
        if not DEVICE_NAME.fullmatch(self.device):
            raise UserError(f"--device {self.device!r} is not a device: use auto, cpu or cuda[:N]")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return cls(
            model=ModelConfig(**raw.get("model", {})),
            data=DataConfig(**raw.get("data", {})),
            train=TrainConfig(**raw.get("train", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))


def option_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """(section, field) of every setting that is a command-line option, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                yield section, f


def panel(section: str, f: dataclasses.Field) -> str:
    """The `--help` panel a setting is shown in."""
    return f.metadata["panel"] or SECTION_PANELS[section]


def option_name(f: dataclasses.Field) -> str:
    return f.metadata["option"] or f.name


def flag(f: dataclasses.Field) -> str:
    return "--" + option_name(f).replace("_", "-")


def placement_fields() -> set[tuple[str, str]]:
    """(section, field) of the settings that say where or how a run is done, not what it computes."""
    return {(section, f.name) for section, f in option_fields() if f.metadata["placement"]}


def range_error(f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` is outside the field's range, with the fix; None when it is valid."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    at_least, above = f.metadata["at_least"], f.metadata["above"]
    default = f.default if f.default is not None else (at_least if at_least is not None else 1)
    example = f"{default:g}" if isinstance(default, float) else str(default)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag(f)} {value}: must be a finite number; pass e.g. {example}"
    if at_least is not None and value < at_least:
        bound = f"{at_least:g}" if isinstance(at_least, float) else str(at_least)
        return f"{flag(f)} {value}: must be at least {bound}; pass e.g. {example}"
    if above is not None and value <= above:
        return f"{flag(f)} {value}: must be greater than {above:g}; pass e.g. {example}"
    return None


def geometry_error(n_levels: int, image_size: int) -> str | None:
    """Why images `image_size` pixels a side cannot pass L levels (each squeeze halves the side),
    with the fix; None when they can."""
    if image_size % (2**n_levels) != 0:
        return (
            f"image size {image_size} is not divisible by 2^L = {2**n_levels}: "
            "use fewer --levels or pass --image-size"
        )
    return None


def validate_config(config: RunConfig) -> None:
    """Every setting in its range. Each section checks itself when made; this checks again, for
    callers that hold a config from elsewhere."""
    for section in SECTIONS:
        check_ranges(getattr(config, section))
