"""The sample grid: torchvision's `make_grid` + `save_image` layout and rounding, without torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from flowdiag.train.image_grid import image_grid, save_grid


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (10, 3, 5, 7), (3, 1, 4, 4)])
def test_the_grid_is_torchvisions(shape: tuple[int, ...]) -> None:
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    reference = make_grid(images, nrow=8, padding=2).mul(255).add_(0.5).clamp_(0, 255)
    assert torch.equal(image_grid(images), reference.permute(1, 2, 0).to(torch.uint8))


def test_save_grid_writes_that_png(tmp_path: Path) -> None:
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    save_grid(images, tmp_path / "grid.png", nrow=3)
    with Image.open(tmp_path / "grid.png") as png:
        assert np.array_equal(np.asarray(png), image_grid(images, nrow=3).numpy())
