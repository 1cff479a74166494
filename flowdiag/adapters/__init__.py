"""Adapters: one small module per flow library or hand-written convention, behind `base.FlowAdapter`.

Libraries are imported lazily, and only when the model's own classes come from them, so flowdiag
works without any of them installed. Adding a library is one entry in `_MODULES` (and `_ROOTS` when
"auto" should find it) plus one file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from flowdiag.runtime.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor, nn

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
CONVENTIONS = ("tuple", "accumulated")
ADAPTER_NAMES: tuple[str, ...] = tuple(_MODULES)
_LIBRARIES_TEXT = "flowdiag Glow, nflows, normflows, FrEIA, zuko or pyro classes"


def adapter_class(name: str) -> type[FlowAdapter]:
    if name not in _MODULES:
        raise UserError(f"unknown adapter {name!r}; choose one of: auto, {', '.join(ADAPTER_NAMES)}")
    return importlib.import_module(_MODULES[name]).ADAPTER


def _class_roots(model: nn.Module) -> set[str]:
    return {type(module).__module__.split(".")[0] for module in model.modules()}


def resolve_adapter(model: nn.Module, adapter: str = "auto", *, example: Tensor | None = None) -> FlowAdapter:
    """The adapter for `model`: named, or found by its classes; `example` lets "auto" probe one forward
    for the hand-written conventions (`probe_adapter`)."""
    if adapter != "auto":
        cls = adapter_class(adapter)
        if adapter not in CONVENTIONS and not cls.recognizes(model):
            raise UserError(
                f"adapter {adapter!r} found no {adapter} flow layers in {type(model).__name__}; "
                f"choose one of: auto, {', '.join(ADAPTER_NAMES)}"
            )
        instance = cls(model)
        _require_layers(instance, model)
        return instance
    roots = _class_roots(model)
    for name, root in _ROOTS.items():
        if root in roots:
            cls = adapter_class(name)
            if cls.recognizes(model):
                return cls(model)
    if example is not None:
        return probe_adapter(model, example)
    raise UserError(
        f"no recognizable flow layers in {type(model).__name__}: looked for {_LIBRARIES_TEXT}; "
        f"pass adapter= one of: {', '.join(ADAPTER_NAMES)} (tuple and accumulated are hand-written Glows)"
    )


def probe_adapter(model: nn.Module, example: Tensor) -> FlowAdapter:
    """Find the hand-written convention by running one forward on a copy of `model`."""
    from flowdiag.adapters.probe import probe_convention

    name = probe_convention(model, example)
    if name is None:
        raise UserError(
            f"no recognizable flow layers in {type(model).__name__}: looked for {_LIBRARIES_TEXT}, "
            "and modules returning (out, logdet) or taking a running logdet in one forward; "
            f"pass adapter= one of: {', '.join(ADAPTER_NAMES)}"
        )
    instance = adapter_class(name)(model)
    _require_layers(instance, model)
    return instance


def _require_layers(instance: FlowAdapter, model: nn.Module) -> None:
    if not instance.layers():
        raise UserError(
            f"adapter {instance.name!r} found no flow layers in {type(model).__name__}; "
            f"choose one of: auto, {', '.join(ADAPTER_NAMES)}"
        )


__all__ = ["ADAPTER_NAMES", "adapter_class", "probe_adapter", "resolve_adapter"]
