"""The multi-scale plumbing: squeeze, and the split with its learned conditional Gaussian prior."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowdiag.glow.layers.coupling import ZeroConv2d
from flowdiag.glow.layers.numerics import at_least_float32

_LOG_2PI = math.log(2 * math.pi)


def squeeze(x: Tensor) -> Tensor:
    """2x2 space-to-depth, official Glow's ordering: (B, C, H, W) -> (B, 4C, H/2, W/2)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Inverse of `squeeze`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c4, h, w = x.shape
    c = c4 // 4
    x = x.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, 2 * h, 2 * w)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Sum over all but the batch dimension of log N(z; mean, exp(log_std)²), in float32 at least."""
    z, mean, log_std = (at_least_float32(t) for t in (z, mean, log_std))
    log_p = -0.5 * (_LOG_2PI + 2.0 * log_std + (z - mean) ** 2 * torch.exp(-2.0 * log_std))
    return log_p.flatten(1).sum(dim=1)


class Split(nn.Module):
    """Keep the first half of the channels; the second half leaves as a latent with prior p(z | kept)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.n_keep = channels // 2
        self.prior = ZeroConv2d(self.n_keep, 2 * (channels - self.n_keep))

    def prior_params(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        h = self.prior(kept)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (kept, z, log p(z | kept))."""
        kept, z = x[:, : self.n_keep], x[:, self.n_keep :]
        mean, log_std = self.prior_params(kept)
        return kept, z, gaussian_log_prob(z, mean, log_std)

    def reverse(self, kept: Tensor, z: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """Concatenate `kept` with z; z=None samples it from the prior at `temperature`."""
        if z is None:
            mean, log_std = self.prior_params(kept)
            z = mean + torch.exp(log_std) * temperature * torch.randn_like(mean)
        return torch.cat([kept, z], dim=1)


class TopPrior(nn.Module):
    """Gaussian prior of the last level: learned per-channel mean and log-std (official `learntop`)."""

    def __init__(self, channels: int, learn: bool = True) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)
        self.log_std = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn)

    def log_prob(self, z: Tensor) -> Tensor:
        return gaussian_log_prob(z, self.mean, self.log_std)

    def sample(self, n: int, size: int, temperature: float = 1.0) -> Tensor:
        shape = (n, self.mean.shape[1], size, size)
        eps = torch.randn(shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(self.log_std) * temperature * eps
