"""Image data sets as uint8 NCHW tensors (a train set and a held-out set), and the seeded, resumable
order in which training draws its minibatches from them.

Pixels stay 8-bit here; reducing to `n_bits` and dequantizing belong to the objective. Every problem
a user can fix raises `UserError` with one line that names it and the fix (CLI flags: `--dataset`,
`--data-root`, `--download`, `--image-size`); what can be checked without reading the files is
checked by `flowdiag.train.data_files`, which the CLI runs before it imports torch. Nothing is
downloaded unless `download` is set. torchvision and scikit-learn are imported inside their loaders.
"""

from __future__ import annotations

import gzip
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowdiag.runtime.distributed import SINGLE, Ranks
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import DataConfig
from flowdiag.train.data_files import check_source, require_root

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
MNIST_TRAIN = "train-images-idx3-ubyte"
MNIST_TEST = "t10k-images-idx3-ubyte"
CELEBA_CROP = 148  # the crop of the Glow / RealNVP CelebA pipeline
CELEBA_SIZE = 64
_RESIZE_CHUNK = 4096  # images per interpolate call: bounds the float32 copy, not the result

T = TypeVar("T")


@dataclass(frozen=True, eq=False)  # eq=False: `==` on tensors is elementwise, never a bool
class ImageData:
    train: Tensor  # uint8, (N, C, H, W)
    held_out: Tensor  # uint8, (N_h, C, H, W); may hold zero images when held_out = 0
    name: str

    def __post_init__(self) -> None:
        for part in (self.train, self.held_out):
            if part.dtype != torch.uint8 or part.dim() != 4:
                raise ValueError(f"ImageData wants uint8 (N, C, H, W), got {part.dtype} {tuple(part.shape)}")
        if self.train.shape[1:] != self.held_out.shape[1:]:
            raise ValueError(
                f"train {tuple(self.train.shape)} and held-out {tuple(self.held_out.shape)} differ"
            )
        if self.train.shape[2] != self.train.shape[3]:
            raise ValueError(f"ImageData wants square images, got {tuple(self.train.shape)}")

    @property
    def channels(self) -> int:
        return self.train.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.shape[2]


def load_dataset(config: DataConfig) -> ImageData:
    """Load `config.dataset`, resize to `config.image_size` if set, and split off the held-out set."""
    check_source(config)
    name = config.dataset
    train, held_out = _LOADERS[name](config)
    if config.image_size is not None:
        train, held_out = resize(train, config.image_size), resize(held_out, config.image_size)
    height, width = train.shape[2:]
    if height != width:
        raise UserError(
            f"{name}: images are {height}x{width}, not square; pass --image-size N to resize them"
        )
    if len(train) == 0:
        raise UserError(f"{name}: no training images are left; lower the held-out fraction or add images")
    return ImageData(train=train.contiguous(), held_out=held_out.contiguous(), name=name)


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize of uint8 NCHW images to size x size, rounded back to uint8."""
    if tuple(images.shape[2:]) == (size, size):
        return images
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        scaled = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = scaled.round().clamp(0, 255).to(torch.uint8)
    return out


def split(images: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held_out) by a seeded permutation; at least one held-out image when fraction > 0."""
    n = len(images)
    n_held = round(fraction * n)
    if fraction > 0 and n > 1:
        n_held = min(max(n_held, 1), n - 1)  # keep one of each: an empty side is never what was meant
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return images[order[n_held:]], images[order[:n_held]]


def read_idx_images(path: Path) -> np.ndarray:
    """The (N, H, W) uint8 array of an IDX3 image file, gzipped (by suffix) or not."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(
            f"mnist: cannot read {path} ({err}); download the file again or add --download"
        ) from err
    # Header: two zero bytes, type code (0x08 = uint8), number of dims, then one big-endian int32 per dim.
    if len(raw) < 16 or raw[:4] != b"\x00\x00\x08\x03":
        raise UserError(
            f"mnist: {path} is not an IDX3 uint8 image file (bad magic number); download it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=3, offset=4))
    expected = 16 + int(np.prod(dims))
    if len(raw) != expected:
        raise UserError(
            f"mnist: {path} holds {len(raw)} bytes but its header {dims} needs {expected} "
            "(truncated or corrupt); download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(dims)


def _nchw(array: np.ndarray) -> Tensor:
    """uint8 NHWC (or NHW) numpy images as an NCHW tensor that owns its memory."""
    if array.ndim == 3:
        array = array[:, :, :, None]
    # Always a fresh writable copy: IDX arrays are read-only views of the file's bytes.
    return torch.from_numpy(np.array(array.transpose(0, 3, 1, 2), order="C"))


def _digits_file() -> Path | None:
    """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn (1.2 s here, paid
    before an ablation can start its workers)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _load_digits(config: DataConfig) -> tuple[Tensor, Tensor]:
    path = _digits_file()
    if path is not None:  # 64 pixel columns and the label, one image per row
        images = np.loadtxt(path, delimiter=",", dtype=np.float64)[:, :64].reshape(-1, 8, 8)
    else:  # a scikit-learn that stores them elsewhere: its own loader
        from sklearn.datasets import load_digits

        images = load_digits().images
    # Values are 0..16; spread them over 8 bits so every data set shares the same n_bits pipeline.
    pixels = np.rint(images * 255.0 / 16.0).astype(np.uint8)  # (N, 8, 8)
    return split(_nchw(pixels), config.held_out, config.split_seed)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_mnist(config: DataConfig) -> tuple[Tensor, Tensor]:
    root = require_root(config)
    train_path, test_path = _find_idx(root, MNIST_TRAIN), _find_idx(root, MNIST_TEST)
    if train_path is None and test_path is None and config.download:
        import torchvision

        _torchvision(config, root / "MNIST" / "raw", lambda: torchvision.datasets.MNIST(root, download=True))
        train_path, test_path = _find_idx(root, MNIST_TRAIN), _find_idx(root, MNIST_TEST)
    if train_path is not None and test_path is not None:
        return _nchw(read_idx_images(train_path)), _nchw(read_idx_images(test_path))
    only = train_path or test_path
    if only is None:
        raise UserError(
            f"mnist: no IDX files in {root} (expected {MNIST_TEST}[.gz]); "
            "pass --data-root pointing at the folder that holds them, or add --download"
        )
    # One official split only (e.g. the shared t10k files): carve the held-out set out of it.
    return split(_nchw(read_idx_images(only)), config.held_out, config.split_seed)


def _torchvision(config: DataConfig, expected: Path, build: Callable[[], T]) -> T:
    """Build a torchvision data set, turning its missing-file and download errors into a UserError."""
    try:
        return build()
    except (RuntimeError, OSError) as err:
        # torchvision's reason on one line, less its hint about the Python `download=True` argument.
        reason = re.sub(r"\s*You can use download=True.*$", "", " ".join(str(err).split())).rstrip(".")
        raise UserError(
            f"{config.dataset}: {reason} (expected under {expected}); "
            "pass --data-root pointing at the folder that holds it, or add --download"
        ) from err


def _load_cifar10(config: DataConfig) -> tuple[Tensor, Tensor]:
    import torchvision

    root = require_root(config)
    parts = []
    for train in (True, False):
        dataset = _torchvision(
            config,
            root / "cifar-10-batches-py",
            lambda train=train: torchvision.datasets.CIFAR10(root, train=train, download=config.download),
        )
        parts.append(_nchw(dataset.data))  # already uint8 (N, 32, 32, 3)
    return parts[0], parts[1]


def _load_celeba(config: DataConfig) -> tuple[Tensor, Tensor]:
    import torchvision
    from torchvision.transforms.functional import center_crop

    root = require_root(config)
    size = config.image_size or CELEBA_SIZE
    parts = []
    for which in ("train", "valid"):
        dataset = _torchvision(
            config,
            root / "celeba",
            lambda which=which: torchvision.datasets.CelebA(
                root, split=which, target_type=[], download=config.download
            ),
        )
        # Crop and resize chunk by chunk: the full-size crops of 160k images would not fit in memory.
        chunks, pending = [], []
        for index in range(len(dataset)):
            crop = center_crop(dataset[index][0].convert("RGB"), [CELEBA_CROP])
            pending.append(np.asarray(crop))
            if len(pending) == _RESIZE_CHUNK or index == len(dataset) - 1:
                chunks.append(resize(_nchw(np.stack(pending)), size))
                pending = []
        parts.append(torch.cat(chunks) if chunks else torch.empty((0, 3, size, size), dtype=torch.uint8))
    return parts[0], parts[1]


def _open_image(path: Path) -> Image.Image:
    from PIL import Image, UnidentifiedImageError  # 0.1 s of imports, for image folders only

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"folder: cannot read image {path} ({err}); remove or replace the file") from err


def _load_folder(config: DataConfig) -> tuple[Tensor, Tensor]:
    root = require_root(config)
    if not root.is_dir():
        raise UserError(
            f"folder: {root} is not a folder; pass --data-root pointing at a folder of image files"
        )
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(
            f"folder: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}; "
            "pass --data-root pointing at the folder that holds them"
        )
    images = [_open_image(p) for p in paths]
    mode = "L" if all(image.mode == "L" for image in images) else "RGB"
    arrays = []
    for path, image in zip(paths, images, strict=True):
        pixels = _nchw(np.asarray(image.convert(mode))[None])
        if config.image_size is not None:
            pixels = resize(pixels, config.image_size)
        elif arrays and pixels.shape[2:] != arrays[0].shape[2:]:
            raise UserError(
                f"folder: {path} is {pixels.shape[3]}x{pixels.shape[2]} but {paths[0]} is "
                f"{arrays[0].shape[3]}x{arrays[0].shape[2]}; pass --image-size N to resize them all"
            )
        arrays.append(pixels)
    return split(torch.cat(arrays), config.held_out, config.split_seed)


def _load_npz(config: DataConfig) -> tuple[Tensor, Tensor]:
    path = require_root(config)
    try:
        # Our own handle: np.load leaks the file it opened when the zip turns out to be broken.
        with path.open("rb") as handle:
            loaded = np.load(handle)
            if isinstance(loaded, np.ndarray):  # a plain .npy file: the one array is the images
                array = loaded
            else:
                keys = list(loaded.keys())
                if "images" not in keys and len(keys) != 1:
                    raise UserError(
                        f"npz: {path} has arrays {keys} but no 'images'; save the images under 'images'"
                    )
                array = loaded["images" if "images" in keys else keys[0]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not a zip, truncated, or pickled
        raise UserError(f"npz: cannot read {path} ({err}); pass a .npz file saved with numpy.savez") from err
    if array.dtype != np.uint8:
        raise UserError(f"npz: images in {path} are {array.dtype}, not uint8; save them as uint8 0..255")
    if array.ndim == 3:
        return split(_nchw(array), config.held_out, config.split_seed)
    if array.ndim == 4 and array.shape[3] in (1, 3):
        return split(_nchw(array), config.held_out, config.split_seed)
    if array.ndim == 4 and array.shape[1] in (1, 3):
        return split(torch.from_numpy(np.array(array, order="C")), config.held_out, config.split_seed)
    raise UserError(
        f"npz: images in {path} have shape {array.shape}; "
        "save them as (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"
    )


_LOADERS: dict[str, Callable[[DataConfig], tuple[Tensor, Tensor]]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "celeba": _load_celeba,
    "folder": _load_folder,
    "npz": _load_npz,
}


# --- the minibatches: a seeded stream of indices (a fresh permutation each epoch), each rank's share --


class BatchStream:
    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        if n_items < 1:
            raise ValueError("no training images")
        self.n_items = n_items
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(n_items, generator=self._generator)
        self._position = 0
        self.epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n_items // self.batch_size)

    def next_indices(self) -> Tensor:
        """The next `batch_size` indices; an epoch boundary starts a new permutation mid-batch."""
        parts = []
        needed = self.batch_size
        while needed > 0:
            if self._position >= self.n_items:
                self._order = torch.randperm(self.n_items, generator=self._generator)
                self._position = 0
                self.epoch += 1
            take = min(needed, self.n_items - self._position)
            parts.append(self._order[self._position : self._position + take])
            self._position += take
            needed -= take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._generator.get_state(),
            "order": self._order,
            "position": self._position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        self._order = state["order"]
        self._position = state["position"]
        self.epoch = state["epoch"]


class Batches:
    """One rank's training minibatches, on its device: its slice of each global batch (batch size x
    ranks) of one seeded stream, so ranks draw disjoint minibatches and one checkpointed stream
    resumes them all."""

    def __init__(
        self, images: Tensor, batch_size: int, seed: int, device: torch.device, ranks: Ranks = SINGLE
    ) -> None:
        self.images = images
        self.device = device
        self.stream = BatchStream(len(images), batch_size * ranks.world, seed)
        self._mine = slice(ranks.rank * batch_size, (ranks.rank + 1) * batch_size)

    def next(self) -> Tensor:
        """The next uint8 minibatch, on the device."""
        indices = self.stream.next_indices()[self._mine]
        return self.images[indices].to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
