"""A Glow written the way people copy y0ast/Glow-PyTorch and chaiyujin/glow-pytorch (flowdiag's
"accumulated" convention), written here from scratch: the foreign Glow `flowdiag bench --parts library`
times the Monitor on, and the tests' model of that convention.

What those projects do, and this keeps:
- every flow layer is `layer(x, logdet=None, reverse=False) -> (x, logdet)`, adding its log-det to the
  running total it is given (a layer given None returns None);
- the affine coupling is written inline in `FlowStep.forward`; its network's convolutions end in an
  ActNorm called as `x, _ = self.actnorm(x)`, its log-det dropped (two per step);
- ActNorms initialize on their first forward from that minibatch (biased variance + 1e-6, times
  `actnorm_scale`), flagged by a plain attribute `inited`, and refuse to in eval();
- a split adds its prior's log-likelihood of the factored-out half to the running total;
- the model dequantizes its input *in place* (`x += U(0, 1/256)`), as y0ast's does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_LOG_2PI = math.log(2 * math.pi)
Total = Tensor | float | None  # the running log-det a layer is given and returns


def _added(logdet: Total, change: Tensor, reverse: bool) -> Total:
    if logdet is None:
        return None
    return logdet - change if reverse else logdet + change


class ActNorm2d(nn.Module):
    def __init__(self, channels: int, scale: float = 1.0) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = float(scale)
        self.inited = False

    def initialize(self, x: Tensor) -> None:
        if not self.training:
            raise ValueError("ActNorm2d is not initialized and the model is in eval mode")
        with torch.no_grad():
            bias = -x.mean(dim=(0, 2, 3), keepdim=True)
            var = ((x + bias) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            self.bias.copy_(bias)
            self.logs.copy_(torch.log(self.scale / (var.sqrt() + 1e-6)))
            self.inited = True

    def forward(self, x: Tensor, logdet: Total = None, reverse: bool = False) -> tuple[Tensor, Total]:
        if not self.inited:
            self.initialize(x)
        change = x.shape[2] * x.shape[3] * self.logs.sum()
        if reverse:
            return x * torch.exp(-self.logs) - self.bias, _added(logdet, change, True)
        return (x + self.bias) * torch.exp(self.logs), _added(logdet, change, False)


class InvConv1x1(nn.Module):
    """LU-decomposed, log|s| in `log_s` (what the penalty reads)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(lower)
        self.log_s = nn.Parameter(torch.log(s.abs()))
        self.upper = nn.Parameter(torch.triu(upper, 1))

    def weight(self) -> Tensor:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def forward(self, x: Tensor, logdet: Total = None, reverse: bool = False) -> tuple[Tensor, Total]:
        change = x.shape[2] * x.shape[3] * self.log_s.sum()
        weight = self.weight()
        if reverse:
            weight = torch.linalg.inv(weight.double()).to(weight.dtype)
        return F.conv2d(x, weight[:, :, None, None]), _added(logdet, change, reverse)


class ConvActNorm(nn.Module):
    """A network's convolution, then an ActNorm whose log-det is dropped."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.conv.weight.data.normal_(0.0, 0.05)
        self.actnorm = ActNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x, _ = self.actnorm(self.conv(x))
        return x


class ZeroConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * 3)


class FlowStep(nn.Module):
    def __init__(self, channels: int, hidden: int, affine: bool = True) -> None:
        super().__init__()
        self.affine = affine
        self.actnorm = ActNorm2d(channels)
        self.invconv = InvConv1x1(channels)
        half = channels // 2
        out = 2 * (channels - half) if affine else channels - half
        self.block = nn.Sequential(
            ConvActNorm(half, hidden),
            nn.ReLU(),
            ConvActNorm(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv(hidden, out),
        )

    def _coupling(self, z: Tensor, logdet: Total, reverse: bool) -> tuple[Tensor, Total]:
        z1, z2 = z[:, : z.shape[1] // 2], z[:, z.shape[1] // 2 :]
        h = self.block(z1)
        if not self.affine:
            return torch.cat([z1, z2 - h if reverse else z2 + h], 1), logdet
        shift, scale = h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)
        z2 = z2 / scale - shift if reverse else (z2 + shift) * scale
        return torch.cat([z1, z2], 1), _added(logdet, torch.log(scale).sum(dim=(1, 2, 3)), reverse)

    def forward(self, x: Tensor, logdet: Total = None, reverse: bool = False) -> tuple[Tensor, Total]:
        if reverse:
            x, logdet = self._coupling(x, logdet, True)
            x, logdet = self.invconv(x, logdet, True)
            return self.actnorm(x, logdet, True)
        x, logdet = self.actnorm(x, logdet=logdet, reverse=False)
        x, logdet = self.invconv(x, logdet, False)
        return self._coupling(x, logdet, False)


class Squeeze(nn.Module):
    def forward(self, x: Tensor, logdet: Total = None, reverse: bool = False) -> tuple[Tensor, Total]:
        b, c, h, w = x.shape
        if reverse:
            x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
            return x.reshape(b, c // 4, 2 * h, 2 * w), logdet
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2), logdet


def gaussian_log_likelihood(z: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    return (-0.5 * (_LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))).sum(dim=(1, 2, 3))


class Split2d(nn.Module):
    """Keeps half the channels; adds log p(other half | kept) to the running total."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ZeroConv(channels // 2, channels)

    def forward(self, x: Tensor, logdet: Total = 0.0, reverse: bool = False) -> tuple[Tensor, Total]:
        if reverse:
            h = self.conv(x)
            return torch.cat([x, h[:, 0::2]], 1), logdet  # the prior's mean: enough for these flows
        z1, z2 = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2 :]
        h = self.conv(z1)
        return z1, gaussian_log_likelihood(z2, h[:, 0::2], h[:, 1::2]) + logdet


class FlowNet(nn.Module):
    def __init__(self, channels: int, levels: int, steps: int, hidden: int, affine: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for level in range(levels):
            channels *= 4
            self.layers.append(Squeeze())
            self.layers.extend(FlowStep(channels, hidden, affine) for _ in range(steps))
            if level < levels - 1:
                self.layers.append(Split2d(channels))
                channels //= 2
        self.out_channels = channels

    def forward(self, x: Tensor, logdet: Total = 0.0, reverse: bool = False) -> tuple[Tensor, Total]:
        for layer in reversed(self.layers) if reverse else self.layers:
            x, logdet = layer(x, logdet, reverse=reverse)
        return x, logdet


class ThreadedGlow(nn.Module):
    """`model(x) -> (z, bits per dim)`; `noise=False` leaves out the in-place dequantization noise."""

    def __init__(
        self,
        channels: int = 1,
        levels: int = 2,
        steps: int = 4,
        hidden: int = 32,
        *,
        affine: bool = True,
        noise: bool = True,
    ) -> None:
        super().__init__()
        self.flow = FlowNet(channels, levels, steps, hidden, affine)
        self.noise = noise

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dims = x[0].numel()
        if self.noise:
            x += torch.zeros_like(x).uniform_(0, 1.0 / 256)  # in place, as y0ast's uniform_binning_correction
        start = torch.full((x.shape[0],), -math.log(256.0) * dims, dtype=x.dtype, device=x.device)
        z, objective = self.flow(x, logdet=start)
        objective = objective + gaussian_log_likelihood(z, torch.zeros_like(z), torch.zeros_like(z))
        return z, -objective / (math.log(2.0) * dims)
