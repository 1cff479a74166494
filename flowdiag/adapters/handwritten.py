"""ActNorms of hand-written Glows, recognized by their attribute names (they are copied, not imported).

- (loc, scale, initialized): rosinality/glow-pytorch style, z = scale · (x + loc);
  init loc = -mean, scale = 1 / (unbiased std + 1e-6), so one value per channel gives NaN.
- (bias, logs, inited): y0ast / chaiyujin style, z = (x + bias) · exp(logs);
  init bias = -mean, logs = log(scale / (sqrt(biased var) + 1e-6)), `scale` their `actnorm_scale`
  (1.0 by default), so one value gives 1e6.

Every such ActNorm of the model is Algorithm 1's, wherever it sits: those in a coupling's network too,
which are no flow layers of the record (they add nothing to the model's log-det).
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
        target = getattr(self.module, "scale", 1.0)  # their actnorm_scale, a plain number
        target = float(target) if isinstance(target, int | float) else 1.0
        return target / (torch.sqrt(stats.var(unbiased=False)) + _EPS)

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
    """ActNorms, 1x1 convs and the units of a hand-written flow: what the `tuple`, `accumulated` and
    `transformer` adapters share (mixed into a FlowAdapter, whose `model` and `layers` it reads)."""

    def actnorms(self) -> list[ActNormAccess]:
        """Every ActNorm of the model by its attributes, flow layers' and networks' alike, in module order."""
        found = [handwritten_actnorm(name, module) for name, module in self.model.named_modules()]  # type: ignore[attr-defined]
        return [access for access in found if access is not None]

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        found = [(layer.name, handwritten_logabsdet(layer.module)) for layer in self.invconvs()]  # type: ignore[attr-defined]
        return [(name, value) for name, value in found if value is not None]

    def units(self) -> list[nn.Module]:
        """The listed layers no other listed layer holds (a step, not its ActNorm), each once."""
        modules = [layer.module for layer in self.layers()]  # type: ignore[attr-defined]
        inner = {id(m) for outer in modules for m in list(outer.modules())[1:]}
        units: dict[int, nn.Module] = {}
        for module in modules:
            if id(module) not in inner:
                units.setdefault(id(module), module)
        return list(units.values())
