"""Additive and affine coupling (NICE / RealNVP / Glow) and the coupling network of official Glow.

The input splits along channels into (x_a, x_b); x_a passes through unchanged and conditions the
transform of x_b. The network is official Glow's: conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm
-> ReLU -> zero-initialized conv3x3, so every coupling starts as the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdiag.glow.layers.actnorm import ActNorm
from flowdiag.glow.layers.numerics import at_least_float32

NormFactory = Callable[[int], ActNorm]  # channels -> an ActNorm with the model's eps and formula


class ZeroConv2d(nn.Module):
    """3x3 conv initialized to zero, output scaled by exp(3 · logs) as official Glow's Conv2dZeros."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # (W x + b) · e^(3 logs) folded into one conv: (W e) x + b e, exact, one pass fewer.
        scale = torch.exp(3.0 * self.logs).view(-1)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x, weight, self.conv.bias * scale, self.conv.stride, self.conv.padding)


class CouplingNet(nn.Module):
    """The conditioner: `layers` is a flat sequence so the cumulative init can walk it in order."""

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, make_norm: NormFactory = ActNorm
    ) -> None:
        super().__init__()
        conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        conv_mid = nn.Conv2d(hidden, hidden, 1, bias=False)
        for conv in (conv_in, conv_mid):
            nn.init.normal_(conv.weight, std=0.05)  # official Glow's default_initializer
        self.layers = nn.ModuleList(
            [
                conv_in,
                make_norm(hidden),
                nn.ReLU(),
                conv_mid,
                make_norm(hidden),
                nn.ReLU(),
                ZeroConv2d(hidden, out_channels),
            ]
        )

    def run(self, x: Tensor, stop: int | None = None) -> Tensor:
        """Apply `layers[:stop]` (all of them by default); ActNorm's log-det is not part of the flow."""
        # Index, don't slice: slicing a ModuleList builds a new Module on every call (~2 ms).
        for index in range(len(self.layers) if stop is None else stop):
            layer = self.layers[index]
            x = layer(x)[0] if isinstance(layer, ActNorm) else layer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """conv -> ActNorm -> ReLU -> conv -> ActNorm -> ReLU -> zero conv, each ActNorm folded into the
        bias-free conv before it (exact: conv(x, W)·σ + τ = conv(x, σW) + τ), so the activations are
        traversed once per conv instead of three times. The plain path runs before the init (which it
        does) and while anyone hooks these ActNorms (the audit, a user's probe): they must be called."""
        conv_in, norm_in, _, conv_mid, norm_mid, _, zero = self.layers
        if not (norm_in.is_initialized and norm_mid.is_initialized) or _hooked(norm_in) or _hooked(norm_mid):
            return self.run(x)
        h = F.relu(_conv_then_actnorm(x, conv_in, norm_in), inplace=True)  # (B, hidden, H, W)
        h = F.relu(_conv_then_actnorm(h, conv_mid, norm_mid), inplace=True)
        return zero(h)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _conv_then_actnorm(x: Tensor, conv: nn.Conv2d, norm: ActNorm) -> Tensor:
    sigma = torch.exp(norm.log_scale).view(-1, 1, 1, 1)
    return F.conv2d(x, conv.weight * sigma, norm.tau.view(-1), conv.stride, conv.padding)


class _Coupling(nn.Module):
    def __init__(self, channels: int, hidden: int, out_factor: int, make_norm: NormFactory) -> None:
        super().__init__()
        self.channels = channels
        self.n_a = channels // 2
        self.net = CouplingNet(self.n_a, out_factor * (channels - self.n_a), hidden, make_norm)

    def split_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, : self.n_a], x[:, self.n_a :]


class AdditiveCoupling(_Coupling):
    """z_b = x_b + t(x_a); volume-preserving, so the log-det is zeros(B)."""

    def __init__(self, channels: int, hidden: int, make_norm: NormFactory = ActNorm) -> None:
        super().__init__(channels, hidden, 1, make_norm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = self.split_input(x)
        z = torch.cat([x_a, x_b + self.net(x_a)], dim=1)
        return z, x.new_zeros(x.shape[0])

    def reverse(self, z: Tensor) -> Tensor:
        z_a, z_b = self.split_input(z)
        return torch.cat([z_a, z_b - self.net(z_a)], dim=1)


class AffineCoupling(_Coupling):
    """Official Glow: z_b = (x_b + t) · sigmoid(s + 2). The paper: z_b = x_b · exp(s) + t."""

    def __init__(
        self, channels: int, hidden: int, make_norm: NormFactory = ActNorm, scale: str = "sigmoid"
    ) -> None:
        super().__init__(channels, hidden, 2, make_norm)
        if scale not in ("sigmoid", "exp"):
            raise ValueError(f"affine scale must be 'sigmoid' or 'exp', not {scale!r}")
        self.scale = scale

    def _shift_and_log_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        h = at_least_float32(self.net(x_a))  # the log-det is summed from these: never in 16 bits
        shift, raw = h[:, 0::2], h[:, 1::2]
        log_scale = F.logsigmoid(raw + 2.0) if self.scale == "sigmoid" else raw
        return shift, log_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = self.split_input(x)
        shift, log_scale = self._shift_and_log_scale(x_a)
        if self.scale == "sigmoid":
            z_b = (x_b + shift) * torch.exp(log_scale)
        else:
            z_b = x_b * torch.exp(log_scale) + shift
        return torch.cat([x_a, z_b], dim=1), log_scale.sum(dim=(1, 2, 3))

    def reverse(self, z: Tensor) -> Tensor:
        z_a, z_b = self.split_input(z)
        shift, log_scale = self._shift_and_log_scale(z_a)
        if self.scale == "sigmoid":
            x_b = z_b * torch.exp(-log_scale) - shift
        else:
            x_b = (z_b - shift) * torch.exp(-log_scale)
        return torch.cat([z_a, x_b], dim=1)


Coupling = AdditiveCoupling | AffineCoupling
