"""FrEIA: `SequenceINN` and `GraphINN` of `InvertibleModule`s, each called as
`module(x_tuple, rev=..., jac=...) -> ((out, ...), log_jac_det)`; only rev=False is data -> latent.

Forward hooks with kwargs see every call. GraphINN keeps its modules in topological order, so the
registration order is the data -> latent order for both containers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from FrEIA.modules import ActNorm, InvertibleModule
from torch import Tensor, nn

from flowdiag.adapters.base import ActNormAccess, ActNormStats, Capture, Detach
from flowdiag.adapters.walk import WalkedAdapter, as_logdet, kind_by_class_name, output_tensor


def _is_flow(module: nn.Module) -> bool:
    return isinstance(module, InvertibleModule)


def _kind(module: nn.Module) -> Any:
    if type(module).__name__ == "AllInOneBlock":
        return "coupling"  # coupling + global affine + Householder permutation in one module
    kind = kind_by_class_name(module)
    # Fixed1x1Conv is frozen: nothing to learn, nothing for the penalty.
    return None if kind == "invconv" else kind


def _reverse(kwargs: dict[str, Any], args: tuple[Any, ...]) -> bool:
    # InvertibleModule.forward(x_or_z, c=None, rev=False, jac=True); both containers pass rev by keyword.
    if "rev" in kwargs:
        return bool(kwargs["rev"])
    return len(args) > 2 and bool(args[2])


class FreiaActNorm(ActNormAccess):
    """FrEIA ActNorm: scale = log(1 / std), bias = -mean / std; std unbiased, no eps. Version 0.2 keeps
    a plain `init_on_next_batch` attribute; later versions an `is_initialized` buffer."""

    inits_when_sampling = True  # it initializes on the next call in either direction

    def __init__(self, name: str, module: ActNorm) -> None:
        self.name = name
        self.module = module

    def is_initialized(self) -> bool:
        flag = getattr(self.module, "is_initialized", None)
        if isinstance(flag, Tensor):
            return bool(flag)
        return not self.module.init_on_next_batch

    def set_initialized(self, value: bool) -> None:
        flag = getattr(self.module, "is_initialized", None)
        if isinstance(flag, Tensor):
            flag.fill_(value)
        if hasattr(self.module, "init_on_next_batch"):
            self.module.init_on_next_batch = not value

    def scale_from(self, stats: ActNormStats) -> Tensor:
        return 1.0 / torch.sqrt(stats.var(unbiased=True))

    @torch.no_grad()
    def finalize(self, stats: ActNormStats) -> None:
        std = torch.sqrt(stats.var(unbiased=True))
        scale, bias = self.module.scale, self.module.bias
        scale.data.view(-1)[:] = torch.log(1.0 / std).to(scale.dtype)
        bias.data.view(-1)[:] = (-stats.mean() / std).to(bias.dtype)
        self.set_initialized(True)

    def watch_input(self, callback: Callable[[Tensor], None]) -> Detach:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not _reverse(kwargs, args):
                callback(args[0][0])

        handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return Detach([handle.remove])


class FreiaAdapter(WalkedAdapter):
    name = "freia"
    is_flow = staticmethod(_is_flow)
    kind_of = staticmethod(_kind)

    def attach(self, capture: Capture) -> Detach:
        handles = []
        for index, layer in enumerate(self._layers):

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple, i: int = index) -> None:
                try:
                    if _reverse(kwargs, args):
                        return
                    out = output_tensor(output[0])
                    capture(i, out, as_logdet(output[1], out))
                except Exception as error:  # never inside the user's forward: say so once instead
                    self.unreadable(i, error)

            handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        return Detach([handle.remove for handle in handles])

    def actnorms(self) -> list[ActNormAccess]:
        return [
            FreiaActNorm(layer.name, layer.module)  # type: ignore[arg-type]
            for layer in self._layers
            if isinstance(layer.module, ActNorm)
        ]

    def run_forward(self, x: Tensor) -> object:
        top = next(m for m in self.model.modules() if _is_flow(m))
        return top(x)


ADAPTER = FreiaAdapter
