"""Listing a library model's flow layers: the finest modules that are flows, in data -> latent order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach, FlowAdapter, FlowLayer, LayerKind

Children = Callable[[nn.Module], Iterable[tuple[str, nn.Module]]]


def kind_by_class_name(module: nn.Module) -> LayerKind | None:
    """actnorm / invconv / coupling / split from the class name (libraries and hand-written Glows agree)."""
    name = type(module).__name__.lower()
    if "actnorm" in name or "act_norm" in name:
        return "actnorm"
    if any(part in name for part in ("1x1", "onebyone", "invconv", "invertibleconv", "channelpermute")):
        return "invconv"
    if "coupling" in name:
        return "coupling"
    if "split" in name:
        return "split"
    return None


def walk_flow_layers(
    root: nn.Module,
    *,
    is_flow: Callable[[nn.Module], bool],
    children: Children | None = None,
    kind_of: Callable[[nn.Module], LayerKind | None] = kind_by_class_name,
) -> list[FlowLayer]:
    """A flow whose kind is known is a layer (not descended); a flow with no flow inside is an
    "other" layer; anything else is a container whose children are walked in `children` order."""
    order = children or (lambda module: module.named_children())
    layers: list[FlowLayer] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if is_flow(module):
            kind = kind_of(module)
            if kind is not None:
                layers.append(FlowLayer(prefix, kind, module))
                return
            if not any(is_flow(m) for m in list(module.modules())[1:]):
                layers.append(FlowLayer(prefix, "other", module))
                return
        for name, child in order(module):
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", root)
    return layers


def output_tensor(output: object) -> Tensor:
    """A layer's output as one tensor: a split's several outputs are flattened and joined."""
    if isinstance(output, Tensor):
        return output
    tensors = [t for t in output if isinstance(t, Tensor)]  # type: ignore[union-attr]
    if len(tensors) == 1:
        return tensors[0]
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


def as_logdet(logdet: object, like: Tensor) -> Tensor:
    """A library's log-det as a tensor: a plain number (0 for volume-preserving layers) becomes a scalar,
    made on the device by a fill (`new_tensor` would copy it from the host)."""
    if isinstance(logdet, Tensor):
        return logdet
    return like.new_full((), float(logdet))  # type: ignore[arg-type]


class WalkedAdapter(FlowAdapter):
    """An adapter whose layers are the library's flow modules, found by `walk_flow_layers`.

    Subclasses say what a flow module is (`is_flow`) and, where the library needs it, the order to
    visit children in and how to tell the kinds; the listing itself is written once, here.
    """

    children: ClassVar[Children | None] = None
    kind_of: ClassVar[Callable[[nn.Module], LayerKind | None]] = staticmethod(kind_by_class_name)

    @staticmethod
    def is_flow(module: nn.Module) -> bool:
        raise NotImplementedError

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._layers = walk_flow_layers(
            model, is_flow=self.is_flow, children=self.children, kind_of=self.kind_of
        )

    @classmethod
    def recognizes(cls, model: nn.Module) -> bool:
        return any(cls.is_flow(m) for m in model.modules())

    def layers(self) -> list[FlowLayer]:
        return self._layers

    def attach_output_hooks(
        self, capture: Capture, logdet_of: Callable[[tuple, Tensor], Tensor | None]
    ) -> Detach:
        """Forward hooks on every layer of a library whose modules return (out, logdet, ...); a call
        whose output is not such a tuple records nothing (`unreadable`)."""
        capture = self.remembering(capture)
        handles = []
        for index, layer in enumerate(self._layers):

            def hook(module: nn.Module, args: tuple, output: tuple, i: int = index) -> None:
                try:
                    if not isinstance(output, tuple | list):
                        raise TypeError(f"returned {type(output).__name__}, not (output, logdet, ...)")
                    out = output_tensor(output[0])
                    capture(i, out, logdet_of(output, out))
                except Exception as error:  # never inside the user's forward: say so once instead
                    self.unreadable(i, error)

            handles.append(layer.module.register_forward_hook(hook))
        return Detach([handle.remove for handle in handles])
