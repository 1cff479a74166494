"""Invertible 1x1 convolutions: LU-decomposed (Glow's W = P L U) and plain.

Both expose `log_abs_det()` = log|det W|; the layer's log-det is `pixels * log_abs_det()`, and the
paper's penalty (eq. 2) squares exactly that at the spatial size the conv runs at, which the model
passes in as `pixels`. Inverses and slogdets are taken in float64 and cast back: at float32 a
drifting W loses its inverse long before it is singular.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _random_rotation(channels: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
    return q


class InvConvLU(nn.Module):
    """W = P · (L + I) · (U + diag(sign · exp(log_abs_u))); P fixed, L, U and log|u| trained."""

    def __init__(self, channels: int, pixels: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.pixels = pixels
        p, lower, upper = torch.linalg.lu(_random_rotation(channels))
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_u", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_abs_u = nn.Parameter(torch.log(torch.abs(diag)).float())

    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_u * torch.exp(self.log_abs_u))
        return self.perm @ lower @ upper  # (C, C)

    def log_abs_det(self) -> Tensor:
        return self.log_abs_u.sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = F.conv2d(x, self.weight().view(self.channels, self.channels, 1, 1))
        logdet = (x.shape[2] * x.shape[3] * self.log_abs_det()).expand(x.shape[0])
        return z, logdet

    def reverse(self, z: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight().to(torch.float64)).to(z.dtype)
        return F.conv2d(z, w_inv.view(self.channels, self.channels, 1, 1))


class InvConvPlain(nn.Module):
    """A free C x C matrix W, initialized as a random rotation; log|det W| by slogdet in float64."""

    def __init__(self, channels: int, pixels: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.pixels = pixels
        self.w = nn.Parameter(_random_rotation(channels).float())

    def weight(self) -> Tensor:
        return self.w

    def log_abs_det(self) -> Tensor:
        return torch.linalg.slogdet(self.w.to(torch.float64)).logabsdet.to(self.w.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = F.conv2d(x, self.w.view(self.channels, self.channels, 1, 1))
        logdet = (x.shape[2] * x.shape[3] * self.log_abs_det()).expand(x.shape[0])
        return z, logdet

    def reverse(self, z: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.w.to(torch.float64)).to(z.dtype)
        return F.conv2d(z, w_inv.view(self.channels, self.channels, 1, 1))


InvConv = InvConvLU | InvConvPlain
