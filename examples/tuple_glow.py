"""A small Glow written by hand in the `tuple` convention: every layer returns (out, logdet), where
logdet is a scalar (the same for every image), shape (B,), or None (volume-preserving).

    python examples/tuple_glow.py

Run time here (2 CPU cores): about 4 s (one thread).

flowdiag finds the layers by their class names (ActNorm, InvConv..., ...Coupling) and watches them with
forward hooks; adapter="tuple" says which convention the model follows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flowdiag
from flowdiag.glow.model import dequantize
from flowdiag.runtime.environment import configure_threads
from flowdiag.settings.config import DataConfig
from flowdiag.train.data import load_dataset


class ActNorm(nn.Module):
    """y = scale · (x + loc) per channel; set from the first batch it sees (unless initialized before)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.initialized:
            with torch.no_grad():
                per_channel = x.transpose(0, 1).flatten(1)  # (C, B·H·W)
                self.loc.copy_(-per_channel.mean(1).view_as(self.loc))
                self.scale.copy_((1.0 / (per_channel.std(1) + 1e-6)).view_as(self.scale))
                self.initialized.fill_(True)
        logdet = x.shape[2] * x.shape[3] * self.scale.abs().log().sum()  # a scalar
        return self.scale * (x + self.loc), logdet


class InvConv1x1(nn.Module):
    """A free C x C matrix, started as a random rotation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels))
        self.weight = nn.Parameter(rotation.view(channels, channels, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        matrix = self.weight[:, :, 0, 0].double()
        logdet = x.shape[2] * x.shape[3] * torch.linalg.slogdet(matrix).logabsdet.to(x.dtype)
        return F.conv2d(x, self.weight), logdet


class AdditiveCoupling(nn.Module):
    """The second half of the channels moves by a function of the first; the volume does not change."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        half = channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(half, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels - half, 3, padding=1)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        kept, moved = x.split([x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
        return torch.cat([kept, moved + self.net(kept)], dim=1), None


def squeeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)  # (B, 4C, H/2, W/2)


class HandGlow(nn.Module):
    """One squeeze, then K x [ActNorm, 1x1 conv, coupling]; log p(x) under a standard normal latent."""

    def __init__(self, steps: int = 4, hidden: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(steps):
            layers += [ActNorm(4), InvConv1x1(4), AdditiveCoupling(4, hidden)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        """log p(x) in nats, (B,)."""
        z, total = squeeze(x), x.new_zeros(x.shape[0])
        for layer in self.layers:
            z, logdet = layer(z)
            if logdet is not None:
                total = total + logdet
        log_pz = -0.5 * (z**2 + math.log(2 * math.pi)).flatten(1).sum(1)
        return log_pz + total


def main() -> None:
    configure_threads()  # one CPU thread unless OMP_NUM_THREADS says: more only spin on a model this small
    images = load_dataset(DataConfig()).train
    batches = [dequantize(b) for b in images[torch.randperm(len(images))].split(16)]
    model = HandGlow()
    flowdiag.cumulative_init(model, batches[:8], adapter="tuple")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with flowdiag.Monitor(model, "runs/tuple-glow", adapter="tuple") as monitor:
        for step in range(200):
            optimizer.zero_grad()
            loss = -model(batches[step % len(batches)]).mean()
            loss = loss + 1e-4 * flowdiag.logdet_penalty(model, adapter="tuple")
            loss.backward()
            if monitor.step(loss) is not None:
                break
            optimizer.step()


if __name__ == "__main__":
    main()
