"""Write a batch of images as one PNG grid.

The layout is torchvision's `save_image` (a 2-pixel black border around every tile, `nrow` tiles a
row, rounding to 0..255 the same way), written with Pillow directly: importing torchvision.utils
imports torchvision.ops and with it torch._dynamo (measured 1.1 s), in every process that saves
samples.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flowdiag.runtime.atomic import write_atomically

PADDING = 2


def image_grid(images: Tensor, nrow: int = 8) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (H', W', C) uint8, with C 1 made 3 as torchvision does."""
    images = images.detach().cpu().float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = torch.zeros(c, rows * (h + PADDING) + PADDING, cols * (w + PADDING) + PADDING)
    for i, image in enumerate(images):
        top, left = (i // cols) * (h + PADDING) + PADDING, (i % cols) * (w + PADDING) + PADDING
        grid[:, top : top + h, left : left + w] = image
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def save_grid(images: Tensor, path: Path, nrow: int = 8) -> None:
    """The grid as a PNG at `path`, put in place whole (flowdiag.runtime.atomic)."""
    from PIL import Image

    picture = Image.fromarray(image_grid(images, nrow).numpy())
    write_atomically(path, lambda handle: picture.save(handle, format="PNG"))
