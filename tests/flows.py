"""Builders for small float64 flow layers and Glows whose couplings are not the identity."""

from __future__ import annotations

import torch
from torch import nn

from flowdiag.glow.layers import ZeroConv2d
from flowdiag.glow.model import Glow, dequantize
from flowdiag.settings.config import ModelConfig
from flowdiag.stabilize.cumulative_init import cumulative_init


def perturb_zero_convs(module: nn.Module, scale: float = 0.1) -> None:
    """Zero-initialized convs make every coupling the identity; give them small random weights."""
    with torch.no_grad():
        for conv in module.modules():
            if isinstance(conv, ZeroConv2d):
                conv.conv.weight.normal_(0.0, scale)
                conv.conv.bias.normal_(0.0, scale)


def tiny_images(n: int, channels: int = 1, size: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def tiny_glow(
    coupling: str = "additive",
    conv: str = "lu",
    affine_scale: str = "sigmoid",
    init: bool = True,
    **overrides,
) -> Glow:
    settings = dict(in_channels=1, image_size=4, n_levels=2, n_steps=2, hidden=8)
    settings.update(overrides)
    config = ModelConfig(coupling=coupling, conv=conv, affine_scale=affine_scale, **settings)
    model = Glow(config).double()
    perturb_zero_convs(model)
    if init:
        x = dequantize(tiny_images(8, config.in_channels, config.image_size), 8).double()
        cumulative_init(model, [x[:4], x[4:]])
    return model
