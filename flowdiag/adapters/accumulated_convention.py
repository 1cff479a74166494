"""Hand-written Glows that thread a running log-det: `layer(x, logdet=None, reverse=False) -> (x, total)`
(y0ast/Glow-PyTorch, chaiyujin/glow-pytorch).

A layer's log-det is its output total minus its input total, read with a pre-hook and a forward hook
(both with kwargs). Those projects write the coupling inline in `FlowStep.forward`, so a module that
threads the log-det and holds only leaf layers (the step) is listed too, after its children, with its
own residual: the step's difference minus its children's.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach, FlowAdapter, FlowLayer
from flowdiag.adapters.handwritten import HandwrittenParts
from flowdiag.adapters.walk import kind_by_class_name, output_tensor


def threads_logdet(module: nn.Module) -> bool:
    try:
        return "logdet" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments.get(name)


class AccumulatedAdapter(HandwrittenParts, FlowAdapter):
    name = "accumulated"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._layers: list[FlowLayer] = []
        self._parent: list[int | None] = []  # index of the residual layer a leaf reports to
        self._walk("", model, None)

    def _walk(self, prefix: str, module: nn.Module, parent: int | None) -> None:
        inner = [(n, m) for n, m in module.named_modules() if n and threads_logdet(m)]
        if threads_logdet(module) and not inner and prefix:
            self._layers.append(FlowLayer(prefix, kind_by_class_name(module) or "other", module))
            self._parent.append(parent)
            return
        holds_only_leaves = (
            threads_logdet(module)
            and prefix
            and inner
            and all(not any(threads_logdet(c) for c in list(m.modules())[1:]) for _, m in inner)
        )
        if holds_only_leaves:
            # The step: its children first, then its own residual (the inline coupling).
            residual = FlowLayer(prefix, "coupling", module)
            start = len(self._layers)
            for name, child in module.named_children():
                self._walk(f"{prefix}.{name}", child, None)
            self._parent[start:] = [len(self._layers)] * (len(self._layers) - start)
            self._layers.append(residual)
            self._parent.append(parent)
            return
        for name, child in module.named_children():
            self._walk(f"{prefix}.{name}" if prefix else name, child, parent)

    @classmethod
    def recognizes(cls, model: nn.Module) -> bool:
        return any(threads_logdet(m) for m in model.modules())

    def layers(self) -> list[FlowLayer]:
        return self._layers

    def attach(self, capture: Capture) -> Detach:
        capture = self.remembering(capture)
        inputs: dict[int, Tensor | float] = {}
        children_sum: dict[int, Tensor | float] = {}
        handles = []
        for index, layer in enumerate(self._layers):

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict, i: int = index) -> None:
                if _argument(module, args, kwargs, "reverse"):
                    return
                total = _argument(module, args, kwargs, "logdet")
                inputs[i] = 0.0 if total is None else total
                children_sum[i] = 0.0

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple, i: int = index) -> None:
                if i not in inputs:
                    return
                out = output_tensor(output[0])
                delta = output[1] - inputs.pop(i)
                own = delta - children_sum.pop(i)
                parent = self._parent[i]
                if parent is not None and parent in children_sum:
                    children_sum[parent] = children_sum[parent] + delta
                capture(i, out, own if isinstance(own, Tensor) else out.new_tensor(own))

            handles.append(layer.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        return Detach([handle.remove for handle in handles])


ADAPTER = AccumulatedAdapter
