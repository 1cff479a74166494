"""ActNorms of hand-written Glows, recognized by their attribute names (they are copied, not imported).

- (loc, scale, initialized): rosinality/glow-pytorch style, z = scale · (x + loc);
  init loc = -mean, scale = 1 / (unbiased std + 1e-6), so one value per channel gives NaN.
- (bias, logs, inited): y0ast / chaiyujin style, z = (x + bias) · exp(logs);
  init bias = -mean, logs = log(1 / (sqrt(biased var) + 1e-6)), so one value gives 1e6.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdiag.adapters.base import ActNormAccess, ActNormStats

_EPS = 1e-6


class LocScaleActNorm(ActNormAccess):
    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    def is_initialized(self) -> bool:
        return bool(self.module.initialized)

    def set_initialized(self, value: bool) -> None:
        flag = self.module.initialized
        if isinstance(flag, Tensor):
            flag.fill_(int(value))
        else:
            self.module.initialized = value

    def scale_from(self, stats: ActNormStats) -> Tensor:
        return 1.0 / (torch.sqrt(stats.var(unbiased=True)) + _EPS)

    @torch.no_grad()
    def finalize(self, stats: ActNormStats) -> None:
        norm = self.module
        norm.loc.data.copy_((-stats.mean()).view_as(norm.loc))
        norm.scale.data.copy_(self.scale_from(stats).view_as(norm.scale))
        self.set_initialized(True)


class BiasLogsActNorm(ActNormAccess):
    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    def is_initialized(self) -> bool:
        return bool(self.module.inited)

    def set_initialized(self, value: bool) -> None:
        self.module.inited = value

    def scale_from(self, stats: ActNormStats) -> Tensor:
        return 1.0 / (torch.sqrt(stats.var(unbiased=False)) + _EPS)

    @torch.no_grad()
    def finalize(self, stats: ActNormStats) -> None:
        norm = self.module
        norm.bias.data.copy_((-stats.mean()).view_as(norm.bias))
        norm.logs.data.copy_(torch.log(self.scale_from(stats)).view_as(norm.logs))
        self.set_initialized(True)


def handwritten_actnorm(name: str, module: nn.Module) -> ActNormAccess | None:
    if all(hasattr(module, a) for a in ("loc", "scale", "initialized")):
        return LocScaleActNorm(name, module)
    if all(hasattr(module, a) for a in ("bias", "logs", "inited")):
        return BiasLogsActNorm(name, module)
    return None


def handwritten_logabsdet(module: nn.Module) -> Tensor | None:
    """log|det W| of a hand-written 1x1 conv: its LU log-diagonal, else slogdet of its weight."""
    for attribute in ("w_s", "log_s", "log_S", "logs"):
        value = getattr(module, attribute, None)
        if isinstance(value, Tensor):
            return value.sum()
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        matrix = weight.reshape(weight.shape[0], weight.shape[1])
        return torch.linalg.slogdet(matrix.to(torch.float64)).logabsdet.to(weight.dtype)
    return None


class HandwrittenParts:
    """ActNorms and 1x1 convs of a hand-written Glow, recognized by their attributes: what the `tuple`
    and `accumulated` adapters share (mixed into a FlowAdapter, whose `layers` it reads)."""

    def actnorms(self) -> list[ActNormAccess]:
        found = [
            handwritten_actnorm(layer.name, layer.module)
            for layer in self.layers()  # type: ignore[attr-defined]
            if layer.kind == "actnorm"
        ]
        return [access for access in found if access is not None]

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        found = [(layer.name, handwritten_logabsdet(layer.module)) for layer in self.invconvs()]  # type: ignore[attr-defined]
        return [(name, value) for name, value in found if value is not None]
