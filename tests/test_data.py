"""Data loading: the pixels are the source files' own, the held-out split is a seeded partition (every
image once, on one side), resizing keeps each image where it was, and every fixable problem is a
one-line UserError."""

from __future__ import annotations

import gzip
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import DataConfig
from flowdiag.train.data import ImageData, load_dataset, read_idx_images, resize, split
from flowdiag.train.data_files import DATASETS

N_DIGITS = 1797


def _rows(images: torch.Tensor) -> Counter[bytes]:
    """A multiset of images, so splits can be compared without knowing the permutation."""
    return Counter(image.numpy().tobytes() for image in images)


def _write_idx(path: Path, images: np.ndarray) -> Path:
    """An IDX3 uint8 file, gzipped when the name ends in .gz."""
    header = b"\x00\x00\x08\x03" + np.array(images.shape, dtype=">i4").tobytes()
    raw = header + images.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def _tiny_images(n: int, seed: int, size: tuple[int, ...] = (5, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size), dtype=np.uint8)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test instead of reaching the internet."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


# --- digits -------------------------------------------------------------------------------------------


def test_digits_shapes_and_range() -> None:
    data = load_dataset(DataConfig(dataset="digits", held_out=0.1))
    assert data.train.shape == (N_DIGITS - 180, 1, 8, 8)
    assert data.held_out.shape == (180, 1, 8, 8)
    assert data.train.dtype == data.held_out.dtype == torch.uint8
    assert (data.channels, data.image_size, data.name) == (1, 8, "digits")
    assert data.train.min() == 0 and data.train.max() == 255
    # 17 levels 0..16 spread over 8 bits: round(v * 255 / 16).
    expected_levels = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.cat([data.train, data.held_out]).unique().tolist()) <= expected_levels


def test_digits_split_is_seeded_and_a_partition() -> None:
    first = load_dataset(DataConfig(dataset="digits", held_out=0.2, split_seed=3))
    again = load_dataset(DataConfig(dataset="digits", held_out=0.2, split_seed=3))
    other = load_dataset(DataConfig(dataset="digits", held_out=0.2, split_seed=4))
    assert torch.equal(first.train, again.train) and torch.equal(first.held_out, again.held_out)
    assert not torch.equal(first.held_out, other.held_out)
    full = load_dataset(DataConfig(dataset="digits", held_out=0.0))
    assert len(full.held_out) == 0 and len(full.train) == N_DIGITS
    assert _rows(first.train) + _rows(first.held_out) == _rows(full.train)


def test_digits_resize_keeps_each_image_in_its_place() -> None:
    full = load_dataset(DataConfig(dataset="digits"))
    small = load_dataset(DataConfig(dataset="digits", image_size=4))
    assert small.train.shape == (len(full.train), 1, 4, 4) and small.image_size == 4
    # Resizing comes after the split: image i is image i of the full-size split, made smaller.
    assert torch.equal(small.train, resize(full.train, 4)) and torch.equal(
        small.held_out, resize(full.held_out, 4)
    )
    # ... and shows the same digit: each image's mean brightness follows its full-size one (a loader
    # that shuffled or mixed images up would lose that) within a few grey levels of edge effects.
    before, after = full.train.float().mean((1, 2, 3)), small.train.float().mean((1, 2, 3))
    assert torch.corrcoef(torch.stack([before, after]))[0, 1] > 0.99
    assert (before - after).abs().max() < 8.0
    assert not torch.equal(small.train[0], small.train[1])


@pytest.mark.parametrize("fraction", [1.0, 1.5])
def test_bad_held_out_fraction(fraction: float) -> None:
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        load_dataset(DataConfig(dataset="digits", held_out=fraction))


def test_a_negative_fraction_is_refused_when_the_setting_is_made() -> None:
    with pytest.raises(UserError, match=r"--held-out -0\.1: must be at least 0"):
        DataConfig(dataset="digits", held_out=-0.1)


# --- split and resize -------------------------------------------------------------------------------


def test_split_keeps_at_least_one_of_each() -> None:
    images = torch.arange(2, dtype=torch.uint8).view(2, 1, 1, 1)
    train, held = split(images, 0.01, seed=0)
    assert (len(train), len(held)) == (1, 1)
    train, held = split(images[:1], 0.5, seed=0)
    assert (len(train), len(held)) == (1, 0)
    train, held = split(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), 0.99, seed=0)
    assert (len(train), len(held)) == (1, 9)


def test_resize_keeps_constant_images_and_rounds() -> None:
    images = torch.full((3, 2, 10, 10), 77, dtype=torch.uint8)
    out = resize(images, 4)
    assert out.shape == (3, 2, 4, 4) and out.dtype == torch.uint8
    assert torch.equal(out, torch.full_like(out, 77))
    assert resize(images, 10) is images


# --- mnist --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("layout", [".", "MNIST/raw"])
def test_mnist_official_split(tmp_path: Path, suffix: str, layout: str) -> None:
    train, test = _tiny_images(6, seed=1), _tiny_images(4, seed=2)
    _write_idx(tmp_path / layout / f"train-images-idx3-ubyte{suffix}", train)
    _write_idx(tmp_path / layout / f"t10k-images-idx3-ubyte{suffix}", test)
    data = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), held_out=0.5))
    # Official splits ignore the held-out fraction and keep the file order.
    assert torch.equal(data.train, torch.from_numpy(train)[:, None])
    assert torch.equal(data.held_out, torch.from_numpy(test)[:, None])
    assert (data.channels, data.image_size) == (1, 5)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_test_file_only_is_split(tmp_path: Path, suffix: str) -> None:
    images = _tiny_images(10, seed=3)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images)
    data = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), held_out=0.3))
    assert (len(data.train), len(data.held_out)) == (7, 3)
    assert _rows(data.train) + _rows(data.held_out) == _rows(torch.from_numpy(images)[:, None])


def test_read_idx_round_trip(tmp_path: Path) -> None:
    images = _tiny_images(3, seed=4, size=(2, 7))
    np.testing.assert_array_equal(read_idx_images(_write_idx(tmp_path / "x.gz", images)), images)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = _write_idx(tmp_path / "t10k-images-idx3-ubyte", _tiny_images(4, seed=5))
    raw = path.read_bytes()[:-7]
    path.unlink()
    target = tmp_path / f"t10k-images-idx3-ubyte{suffix}"
    target.write_bytes(gzip.compress(raw)[:-3] if suffix else raw)
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte") as info:
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert "\n" not in str(info.value)


def test_mnist_wrong_magic(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(20))
    with pytest.raises(UserError, match="magic"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_mnist_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="--data-root") as info:
        load_dataset(DataConfig(dataset="mnist", root=str(missing)))
    assert str(missing) in str(info.value)


def test_mnist_empty_folder_says_what_it_expected(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte\[\.gz\].*--download"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_mnist_needs_a_root() -> None:
    with pytest.raises(UserError, match="--data-root"):
        load_dataset(DataConfig(dataset="mnist"))


def test_mnist_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_mnist(root: Path, download: bool) -> None:
        # Stands in for torchvision: writes the raw files where torchvision would.
        calls.append(Path(root))
        _write_idx(Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte", _tiny_images(3, seed=6))
        _write_idx(Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte", _tiny_images(2, seed=7))

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    with pytest.raises(UserError):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert calls == []
    data = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), download=True))
    assert calls == [tmp_path]
    assert (len(data.train), len(data.held_out)) == (3, 2)


def _idx_by_hand(path: Path) -> np.ndarray:
    """The IDX3 file's images, parsed here from the format's definition (not by the loader's reader)."""
    raw = gzip.decompress(path.read_bytes())
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def test_real_mnist_split_is_the_files_pixels_partitioned(shared_mnist: Path) -> None:
    data = load_dataset(DataConfig(dataset="mnist", root=str(shared_mnist), held_out=0.1))
    source = torch.from_numpy(_idx_by_hand(shared_mnist / "t10k-images-idx3-ubyte.gz").copy())[:, None]
    assert data.train.shape == (9000, 1, 28, 28) and data.held_out.shape == (1000, 1, 28, 28)
    # Every image of the file exactly once, on one side: the same pixels, none lost, none doubled.
    assert _rows(data.train) + _rows(data.held_out) == _rows(source)
    assert not (set(_rows(data.train)) & set(_rows(data.held_out))) - _duplicated(source)
    again = load_dataset(DataConfig(dataset="mnist", root=str(shared_mnist), held_out=0.1))
    other = load_dataset(DataConfig(dataset="mnist", root=str(shared_mnist), held_out=0.1, split_seed=1))
    assert torch.equal(again.held_out, data.held_out) and not torch.equal(other.held_out, data.held_out)
    small = load_dataset(DataConfig(dataset="mnist", root=str(shared_mnist), held_out=0.1, image_size=16))
    assert small.train.shape == (9000, 1, 16, 16) and torch.equal(small.train, resize(data.train, 16))


def _duplicated(images: torch.Tensor) -> set[bytes]:
    """Images that occur more than once in a source (they may sit on both sides of a split)."""
    return {image for image, count in _rows(images).items() if count > 1}


# --- npz ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "to_nchw"),
    [
        ((6, 4, 4), lambda a: a[:, None]),
        ((6, 4, 4, 3), lambda a: a.transpose(0, 3, 1, 2)),
        ((6, 4, 4, 1), lambda a: a.transpose(0, 3, 1, 2)),
        ((6, 3, 4, 4), lambda a: a),
    ],
)
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...], to_nchw) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "images.npz"
    np.savez(path, images=images, labels=np.arange(6))
    data = load_dataset(DataConfig(dataset="npz", root=str(path), held_out=0.5))
    expected = torch.from_numpy(np.ascontiguousarray(to_nchw(images)))
    assert data.train.shape[1:] == expected.shape[1:]
    assert (len(data.train), len(data.held_out)) == (3, 3)
    assert _rows(data.train) + _rows(data.held_out) == _rows(expected)


def test_npz_only_array_needs_no_key(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    pixels = _tiny_images(4, seed=8, size=(2, 2))
    np.savez(path, pixels=pixels)
    data = load_dataset(DataConfig(dataset="npz", root=str(path), held_out=0.0))
    assert data.train.shape == (4, 1, 2, 2) and len(data.held_out) == 0
    assert _rows(data.train) == _rows(torch.from_numpy(pixels)[:, None])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 2, 2), dtype=np.float32)}, "float32, not uint8"),
        ({"images": np.zeros((4, 2, 2, 5), dtype=np.uint8)}, "shape"),
        ({"images": np.zeros((4, 4), dtype=np.uint8)}, "shape"),
        ({"a": np.zeros((4, 2, 2), dtype=np.uint8), "b": np.zeros(3)}, "no 'images'"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        load_dataset(DataConfig(dataset="npz", root=str(path)))


def test_npz_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="cannot read"):
        load_dataset(DataConfig(dataset="npz", root=str(path)))


# --- folder -------------------------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_grayscale(tmp_path: Path) -> None:
    arrays = [_tiny_images(1, seed=i, size=(6, 6))[0] for i in range(4)]
    for i, array in enumerate(arrays):
        _save(tmp_path / ("sub" if i % 2 else ".") / f"{i}.png", array)
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_dataset(DataConfig(dataset="folder", root=str(tmp_path), held_out=0.25))
    assert (data.channels, data.image_size, len(data.train), len(data.held_out)) == (1, 6, 3, 1)
    expected = torch.from_numpy(np.stack(arrays))[:, None]  # PNG is lossless: pixels come back exact
    assert _rows(data.train) + _rows(data.held_out) == _rows(expected)


def test_folder_any_color_image_makes_all_rgb(tmp_path: Path) -> None:
    grey, colour = _tiny_images(1, seed=0, size=(6, 6))[0], _tiny_images(1, seed=1, size=(6, 6, 3))[0]
    _save(tmp_path / "a.png", grey)
    _save(tmp_path / "b.png", colour)
    data = load_dataset(DataConfig(dataset="folder", root=str(tmp_path), held_out=0.0))
    assert data.train.shape == (2, 3, 6, 6)
    # The grey image in all three channels, the colour one as saved (PNG is lossless).
    expected = torch.stack(
        [torch.from_numpy(grey).expand(3, 6, 6), torch.from_numpy(colour).permute(2, 0, 1)]
    )
    assert _rows(data.train) == _rows(expected)


def test_folder_mixed_sizes(tmp_path: Path) -> None:
    a, b = _tiny_images(1, seed=0, size=(6, 6))[0], _tiny_images(1, seed=1, size=(8, 8))[0]
    _save(tmp_path / "a.png", a)
    _save(tmp_path / "b.png", b)
    with pytest.raises(UserError, match="--image-size"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path)))
    data = load_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=4))
    expected = [resize(torch.from_numpy(image)[None, None], 4)[0] for image in (a, b)]
    assert _rows(torch.cat([data.train, data.held_out])) == _rows(torch.stack(expected))


def test_folder_non_square_needs_image_size(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _tiny_images(1, seed=0, size=(6, 8))[0])
    _save(tmp_path / "b.png", _tiny_images(1, seed=1, size=(6, 8))[0])
    with pytest.raises(UserError, match=r"not square.*--image-size"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path)))


def test_folder_without_images(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no image files"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path)))


# --- names and torchvision data sets ------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match="--dataset") as info:
        load_dataset(DataConfig(dataset="imagenet"))
    assert all(name in str(info.value) for name in DATASETS)


def test_cifar10_without_files_does_not_download(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(UserError, match="--download") as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "\n" not in message and "download=True" not in message
    assert list(tmp_path.iterdir()) == []


def test_celeba_without_files_does_not_download(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(UserError, match="--download") as info:
        load_dataset(DataConfig(dataset="celeba", root=str(tmp_path)))
    assert str(tmp_path / "celeba") in str(info.value)


@pytest.mark.parametrize("dataset", ["cifar10", "celeba", "folder", "npz"])
def test_missing_root(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(UserError, match="--data-root"):
        load_dataset(DataConfig(dataset=dataset))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(DataConfig(dataset=dataset, root=str(tmp_path / "absent")))


def test_image_data_rejects_bad_tensors() -> None:
    good = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    assert ImageData(train=good, held_out=good[:0], name="x").channels == 1
    with pytest.raises(ValueError, match="uint8"):
        ImageData(train=good.float(), held_out=good, name="x")
    with pytest.raises(ValueError, match="square"):
        ImageData(
            train=torch.zeros(2, 1, 4, 5, dtype=torch.uint8),
            held_out=torch.zeros(0, 1, 4, 5, dtype=torch.uint8),
            name="x",
        )


def test_npy_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "images.npy"
    images = _tiny_images(4, seed=9, size=(3, 3, 3))  # (N, H, W, C)
    np.save(path, images)
    data = load_dataset(DataConfig(dataset="npz", root=str(path), held_out=0.25))
    assert data.train.shape == (3, 3, 3, 3) and data.held_out.shape == (1, 3, 3, 3)
    assert _rows(data.train) + _rows(data.held_out) == _rows(torch.from_numpy(images).permute(0, 3, 1, 2))


def test_digits_read_from_the_bundled_file_are_scikit_learns() -> None:
    """The loader reads scikit-learn's digits.csv.gz without importing scikit-learn (1.2 s of an
    ablation's start): the same images, in the same order, as scikit-learn's own loader."""
    from sklearn.datasets import load_digits

    from flowdiag.settings.config import DataConfig
    from flowdiag.train.data import _digits_file, _nchw, load_dataset, split

    assert _digits_file() is not None
    expected = np.rint(load_digits().images * 255.0 / 16.0).astype(np.uint8)
    train, held_out = split(_nchw(expected), 0.1, 0)
    data = load_dataset(DataConfig())
    assert torch.equal(data.train, train) and torch.equal(data.held_out, held_out)
