"""Two tiny hand-written Glow steps, one per convention the adapters support (written for these tests)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ActNorm(nn.Module):
    """z = scale · (x + loc); data-dependent init on the first forward (unbiased std + 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.initialized.item() == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.data.copy_(-flat.mean(1).view_as(self.loc))
                self.scale.data.copy_((1 / (flat.std(1) + 1e-6)).view_as(self.scale))
                self.initialized.fill_(1)
        logdet = x.shape[2] * x.shape[3] * torch.log(self.scale.abs()).sum()  # scalar
        return self.scale * (x + self.loc), logdet


class InvConv1x1(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        self.weight = nn.Parameter((q * 1.3).view(channels, channels, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logabsdet = torch.linalg.slogdet(self.weight.squeeze(-1).squeeze(-1)).logabsdet
        return nn.functional.conv2d(x, self.weight), x.shape[2] * x.shape[3] * logabsdet


class AdditiveCoupling(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Conv2d(channels // 2, channels - channels // 2, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, b + self.net(a)], dim=1), None


class TupleGlow(nn.Module):
    """(out, logdet) per layer; the model sums them (None counts as 0)."""

    def __init__(self, channels: int = 4, steps: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(steps):
            layers += [ActNorm(channels), InvConv1x1(channels), AdditiveCoupling(channels)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, logdet = layer(x)
            if logdet is not None:
                total = total + logdet
        return x, total


class AccActNorm(nn.Module):
    """z = (x + bias) · exp(logs); init from biased variance + 1e-6; takes and returns the running logdet."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.inited = False

    def forward(
        self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        if not self.inited:
            with torch.no_grad():
                mean = x.mean(dim=(0, 2, 3), keepdim=True)
                var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
                self.bias.data.copy_(-mean)
                self.logs.data.copy_(torch.log(1 / (var.sqrt() + 1e-6)))
                self.inited = True
        change = x.shape[2] * x.shape[3] * self.logs.sum()
        if reverse:
            return x * torch.exp(-self.logs) - self.bias, (0 if logdet is None else logdet) - change
        return (x + self.bias) * torch.exp(self.logs), (0 if logdet is None else logdet) + change


class AccInvConv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        self.weight = nn.Parameter((q * 0.8).view(channels, channels, 1, 1))

    def forward(
        self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        change = x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight[..., 0, 0]).logabsdet
        return nn.functional.conv2d(x, self.weight), (0 if logdet is None else logdet) + change


class AccFlowStep(nn.Module):
    """ActNorm, 1x1 conv, then an affine coupling written inline (as those projects do)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.actnorm = AccActNorm(channels)
        self.invconv = AccInvConv(channels)
        self.net = nn.Conv2d(channels // 2, 2 * (channels - channels // 2), 3, padding=1)

    def forward(
        self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        x, logdet = self.actnorm(x, logdet)
        x, logdet = self.invconv(x, logdet)
        a, b = x.chunk(2, dim=1)
        shift, raw = self.net(a).chunk(2, dim=1)
        log_scale = nn.functional.logsigmoid(raw + 2.0)
        return torch.cat([a, (b + shift) * torch.exp(log_scale)], 1), logdet + log_scale.sum(dim=(1, 2, 3))


class AccumulatedGlow(nn.Module):
    def __init__(self, channels: int = 4, steps: int = 2) -> None:
        super().__init__()
        self.steps = nn.ModuleList(AccFlowStep(channels) for _ in range(steps))

    def forward(
        self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0]) if logdet is None else logdet
        for step in self.steps:
            x, logdet = step(x, logdet)
        return x, logdet
