"""Glow (Kingma & Dhariwal 2018) as the paper uses it, mapping data -> latent.

    for each of L levels:   squeeze -> K x [ActNorm -> 1x1 conv -> coupling] -> split (not on the last)

`model(x)` returns `(zs, logdet)`: zs[i] is the latent that level i factors out (zs[-1] the top
latent), logdet (B,) the flow's log|det J|. `log_prob(x)` adds the learned priors. Input x is the
dequantized image scaled to [-0.5, 0.5), see `dequantize`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from flowdiag.glow.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    InvConvLU,
    InvConvPlain,
    Split,
    TopPrior,
    squeeze,
    unsqueeze,
)
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import ModelConfig, geometry_error


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> invertible 1x1 conv -> coupling."""

    def __init__(self, channels: int, pixels: int, config: ModelConfig) -> None:
        super().__init__()
        make_norm = functools.partial(ActNorm, eps=config.actnorm_eps, formula=config.actnorm_init)
        self.actnorm = make_norm(channels)
        conv_class = InvConvLU if config.conv == "lu" else InvConvPlain
        self.invconv = conv_class(channels, pixels)
        if config.coupling == "additive":
            self.coupling: nn.Module = AdditiveCoupling(channels, config.hidden, make_norm)
        else:
            self.coupling = AffineCoupling(channels, config.hidden, make_norm, config.affine_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, ld_norm = self.actnorm(x)
        x, ld_conv = self.invconv(x)
        x, ld_coupling = self.coupling(x)
        return x, ld_norm + ld_conv + ld_coupling

    def reverse(self, z: Tensor) -> Tensor:
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(z)))


class GlowLevel(nn.Module):
    def __init__(self, channels: int, size: int, config: ModelConfig, split: bool) -> None:
        super().__init__()
        # `channels` and `size` are after this level's squeeze.
        self.pixels = size * size  # h·w every layer of this level runs at
        self.steps = nn.ModuleList(FlowStep(channels, self.pixels, config) for _ in range(config.n_steps))
        self.split = Split(channels) if split else None


class Glow(nn.Module):
    """Glow mapping data -> latent: `model(x)` gives one latent per level and the log-det (B,).

    >>> import torch
    >>> from flowdiag.settings.config import ModelConfig
    >>> model = Glow(ModelConfig(in_channels=1, image_size=8, n_levels=2, n_steps=2, hidden=8))
    >>> x = torch.rand(3, 1, 8, 8) - 0.5
    >>> zs, logdet = model(x)
    >>> [tuple(z.shape) for z in zs], tuple(logdet.shape)
    ([(3, 2, 4, 4), (3, 8, 2, 2)], (3,))
    >>> bool(torch.allclose(model.reverse(zs), x, atol=1e-5))  # the exact inverse
    True
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        validate_model_config(config)
        self.config = config
        channels, size = config.in_channels, config.image_size
        levels = []
        for level in range(config.n_levels):
            channels, size = channels * 4, size // 2
            is_last = level == config.n_levels - 1
            levels.append(GlowLevel(channels, size, config, split=not is_last))
            if not is_last:
                channels -= channels // 2
        self.levels = nn.ModuleList(levels)
        self.top_prior = TopPrior(channels, learn=config.learn_top)
        self.top_size = size

    @property
    def n_dims(self) -> int:
        return self.config.in_channels * self.config.image_size**2

    def _encode(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """(zs, flow log-det, prior log-density), all from one pass."""
        zs: list[Tensor] = []
        logdet = x.new_zeros(x.shape[0])
        log_pz = x.new_zeros(x.shape[0])
        for level in self.levels:
            x = squeeze(x)  # (B, 4C, H/2, W/2)
            for step in level.steps:
                x, ld = step(x)
                logdet = logdet + ld
            if level.split is not None:
                x, z, log_p = level.split(x)  # x keeps half the channels
                zs.append(z)
                log_pz = log_pz + log_p
        zs.append(x)
        log_pz = log_pz + self.top_prior.log_prob(x)
        return zs, logdet, log_pz

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        zs, logdet, _ = self._encode(x)
        return zs, logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats, (B,), for the continuous input x."""
        _, logdet, log_pz = self._encode(x)
        return log_pz + logdet

    def reverse(self, zs: list[Tensor] | None, n: int = 1, temperature: float = 1.0) -> Tensor:
        """Invert `model(x)`'s latents exactly; with zs=None sample n images at `temperature`."""
        if zs is not None and len(zs) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents, got {len(zs)}")
        x = zs[-1] if zs is not None else self.top_prior.sample(n, self.top_size, temperature)
        for index in reversed(range(len(self.levels))):
            level = self.levels[index]
            if level.split is not None:
                x = level.split.reverse(x, zs[index] if zs is not None else None, temperature)
            for step in reversed(level.steps):
                x = step.reverse(x)
            x = unsqueeze(x)
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        return self.reverse(None, n=n, temperature=temperature)

    FLOW_STEP_PARTS = ("actnorm", "invconv", "coupling")  # forward order within a step

    def flow_layers(self) -> list[tuple[str, nn.Module]]:
        """Every ActNorm, 1x1 conv and coupling on the flow path, by module path, in forward order."""
        return [
            (f"levels.{i}.steps.{k}.{part}", getattr(step, part))
            for i, level in enumerate(self.levels)
            for k, step in enumerate(level.steps)
            for part in self.FLOW_STEP_PARTS
        ]

    def flow_layer_pixels(self) -> list[int]:
        """h·w each of `flow_layers()` runs at, from the model's own geometry."""
        return [level.pixels for level in self.levels for _ in level.steps for _ in self.FLOW_STEP_PARTS]

    def actnorms(self) -> list[tuple[str, ActNorm]]:
        """All ActNorms, those inside coupling networks included, in forward order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, ActNorm)]

    def inv_convs(self) -> list[tuple[str, InvConvLU | InvConvPlain]]:
        # Cached: the penalty asks every step, and walking named_modules costs ~2 ms on this model.
        # A plain list in __dict__, so the convs are not registered twice as submodules.
        if "_inv_convs" not in self.__dict__:
            convs = [(n, m) for n, m in self.named_modules() if isinstance(m, InvConvLU | InvConvPlain)]
            self.__dict__["_inv_convs"] = convs
        return self.__dict__["_inv_convs"]

    def couplings(self) -> list[tuple[str, AdditiveCoupling | AffineCoupling]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, AdditiveCoupling | AffineCoupling)]


def validate_model_config(config: ModelConfig) -> None:
    """The geometry (flowdiag.settings.config.geometry_error): the ranges a config checks itself, but
    this needs the data's image size."""
    error = geometry_error(config.n_levels, config.image_size)
    if error:
        raise UserError(error)


def dequantize(x: Tensor, n_bits: int = 8, noise: Tensor | None = None) -> Tensor:
    """Uniform dequantization of 8-bit images to [-0.5, 0.5), keeping the top `n_bits` bits."""
    bins = 2**n_bits
    x = torch.floor(x.to(torch.float32) / 2 ** (8 - n_bits))
    if noise is None:
        noise = torch.rand_like(x)
    return (x + noise) / bins - 0.5


def bpd_from_log_prob(log_prob: Tensor, n_dims: int, n_bits: int = 8) -> Tensor:
    """Bits per dimension of the discrete data: -(log p(x) - D log 2^n_bits) / (D log 2)."""
    return (-log_prob + n_dims * n_bits * math.log(2.0)) / (n_dims * math.log(2.0))


def bits_per_dim(model: Glow, images: Tensor, n_bits: int = 8) -> Tensor:
    """Per-image bits/dim of uint8 images under `model`, with fresh uniform dequantization noise.

    >>> import torch
    >>> from flowdiag.settings.config import ModelConfig
    >>> model = Glow(ModelConfig(in_channels=1, image_size=8, n_levels=2, n_steps=1, hidden=8))
    >>> images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    >>> bpd = bits_per_dim(model, images)
    >>> tuple(bpd.shape), bool(torch.isfinite(bpd).all())
    ((4,), True)
    """
    x = dequantize(images.to(next(model.parameters()).device), n_bits)
    return bpd_from_log_prob(model.log_prob(x), model.n_dims, n_bits)
