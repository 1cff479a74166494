"""Where each data set's files are expected, checked without torch.

The command line checks a data set's source before it imports torch (a wrong `--data-root` fails
at once), and the loaders (`flowdiag.train.data`) check the same way, with the same one-line
errors, when called from Python. What can only be known by reading the files (a truncated IDX
file, a non-square image) stays with the loaders.
"""

from __future__ import annotations

import typing
from pathlib import Path

from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import DataConfig, Dataset

DATASETS: tuple[str, ...] = typing.get_args(Dataset)
# The side of each data set's images as stored (CelebA: after the Glow/RealNVP crop and resize);
# folders and .npz files say theirs only when read.
NATIVE_SIZES: dict[str, int] = {"digits": 8, "mnist": 28, "cifar10": 32, "celeba": 64}
# What --data-root must point at, per data set that reads files.
ROOT_HOLDS: dict[str, str] = {
    "mnist": "the folder that holds the MNIST IDX files",
    "cifar10": "the folder that holds cifar-10-batches-py",
    "celeba": "the folder that holds celeba/",
    "folder": "a folder of image files",
    "npz": "a .npz file with an 'images' array",
}
# Data sets torchvision may download into the root (`--download`): the root need not exist yet.
DOWNLOADABLE = ("mnist", "cifar10", "celeba")


def require_root(config: DataConfig) -> Path:
    """The data root, which the data set needs; UserError naming --data-root when none is given."""
    if config.root is None:
        raise UserError(
            f"{config.dataset}: no data root given; pass --data-root pointing at {ROOT_HOLDS[config.dataset]}"
        )
    return Path(config.root).expanduser()


def require_existing(config: DataConfig, path: Path) -> None:
    """UserError naming `path` and the fix when it does not exist."""
    if not path.exists():
        fix = f"pass --data-root pointing at {ROOT_HOLDS[config.dataset]}"
        if config.dataset in DOWNLOADABLE:
            fix += ", or add --download"
        raise UserError(f"{config.dataset}: {path} does not exist; {fix}")


def check_source(config: DataConfig) -> None:
    """What can be checked before loading: a known data set, a root where one is needed, and that it
    exists (unless torchvision may download into it). UserError with the fix otherwise."""
    if config.dataset not in DATASETS:
        raise UserError(
            f"unknown data set {config.dataset!r}; pass --dataset with one of: {', '.join(DATASETS)}"
        )
    if not 0.0 <= config.held_out < 1.0:
        raise UserError(
            f"{config.dataset}: held-out fraction {config.held_out} is not in [0, 1); "
            "pass a value such as 0.1"
        )
    if config.dataset not in ROOT_HOLDS:
        return
    root = require_root(config)
    if not (config.download and config.dataset in DOWNLOADABLE):
        require_existing(config, root)


def image_size(config: DataConfig) -> int | None:
    """The side the model will see, where it is known before loading: `--image-size`, else the data
    set's own; None for folders and .npz files."""
    return config.image_size or NATIVE_SIZES.get(config.dataset)
