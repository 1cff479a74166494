"""Adapters: one small module per flow library or hand-written convention, behind `base.FlowAdapter`.

Libraries are imported lazily, and only when the model's own classes come from them, so flowdiag
works without any of them installed. Adding a library is one entry in `_MODULES` (and `_ROOTS` when
"auto" should find it) plus one file. A flow no adapter here knows takes an adapter instance of the
user's own (`base.FlowAdapter`'s docstring): every entry point accepts a name or an instance.

"auto" needs no forward: a library is known by its classes; a hand-written flow by its modules'
signatures and names, in this order: layers that take a running `logdet` (accumulated), a stack of
attention blocks (transformer), layers named ActNorm / InvConv / ...Coupling (tuple).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from flowdiag.runtime.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from flowdiag.adapters.base import FlowAdapter

# adapter name -> the module holding its `ADAPTER` class.
_MODULES: dict[str, str] = {
    "flowdiag": "flowdiag.adapters.glow",
    "nflows": "flowdiag.adapters.nflows",
    "normflows": "flowdiag.adapters.normflows",
    "freia": "flowdiag.adapters.freia",
    "zuko": "flowdiag.adapters.zuko",
    "pyro": "flowdiag.adapters.pyro",
    "tuple": "flowdiag.adapters.tuple_convention",
    "accumulated": "flowdiag.adapters.accumulated_convention",
    "transformer": "flowdiag.adapters.transformer",
}
# Libraries "auto" recognizes by class: adapter name -> the top-level package their classes live in.
_ROOTS: dict[str, str] = {
    "flowdiag": "flowdiag",
    "nflows": "nflows",
    "normflows": "normflows",
    "freia": "FrEIA",
    "zuko": "zuko",
    "pyro": "pyro",
}
# Hand-written conventions, in the order "auto" tries them (see the module docstring).
CONVENTIONS = ("accumulated", "transformer", "tuple")
ADAPTER_NAMES: tuple[str, ...] = tuple(_MODULES)
_LOOKED_FOR = (
    "flowdiag Glow, nflows, normflows, FrEIA, zuko or pyro classes, layers taking a running logdet, "
    "a stack of attention blocks, or layers named ActNorm / InvConv / ...Coupling"
)


def adapter_class(name: str) -> type[FlowAdapter]:
    if name not in _MODULES:
        raise UserError(f"unknown adapter {name!r}; choose one of: auto, {', '.join(ADAPTER_NAMES)}")
    return importlib.import_module(_MODULES[name]).ADAPTER


def _class_roots(model: nn.Module) -> set[str]:
    return {type(module).__module__.split(".")[0] for module in model.modules()}


def resolve_adapter(model: nn.Module, adapter: str | FlowAdapter = "auto") -> FlowAdapter:
    """The adapter for `model`: an instance as given, a name, or "auto" (see the module docstring)."""
    if not isinstance(adapter, str):
        return adapter
    if adapter != "auto":
        cls = adapter_class(adapter)
        if adapter not in CONVENTIONS and not cls.recognizes(model):
            raise UserError(
                f"adapter {adapter!r} found no {adapter} flow layers in {type(model).__name__}; "
                f"choose one of: auto, {', '.join(ADAPTER_NAMES)}"
            )
        return _with_layers(cls(model), model)
    roots = _class_roots(model)
    for name, root in _ROOTS.items():
        if root in roots:
            cls = adapter_class(name)
            if cls.recognizes(model):
                return cls(model)
    for name in CONVENTIONS:
        cls = adapter_class(name)
        if cls.recognizes(model):
            instance = cls(model)
            if instance.layers():
                return instance
    raise UserError(
        f"no recognizable flow layers in {type(model).__name__}: looked for {_LOOKED_FOR}; "
        f"pass adapter= one of: {', '.join(ADAPTER_NAMES)}, or an instance of your own "
        "flowdiag.adapters.base.FlowAdapter"
    )


def _with_layers(instance: FlowAdapter, model: nn.Module) -> FlowAdapter:
    if not instance.layers():
        raise UserError(
            f"adapter {instance.name!r} found no flow layers in {type(model).__name__}; "
            f"choose one of: auto, {', '.join(ADAPTER_NAMES)}"
        )
    return instance


__all__ = ["ADAPTER_NAMES", "CONVENTIONS", "adapter_class", "resolve_adapter"]
