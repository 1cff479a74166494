"""zuko: a `Flow` holds lazy transforms (`nn.Module`s) that return `torch.distributions.Transform`
objects; `log_prob` maps data -> latent through `Transform.call_and_ladj(x) -> (y, ladj)`.

A forward hook on each lazy transform patches the Transform it returns (a fresh object per call) so
its `call_and_ladj` reports to the capture. zuko has no ActNorm and no 1x1 conv.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from zuko.lazy import Flow, LazyTransform

from flowdiag.adapters.base import Capture, Detach, FlowAdapter
from flowdiag.adapters.walk import WalkedAdapter


def _is_flow(module: nn.Module) -> bool:
    return isinstance(module, LazyTransform)


def _per_sample(ladj: Tensor, out: Tensor) -> Tensor:
    # zuko flows act on vectors (event dim 1): an elementwise transform's ladj has the event dim too.
    extra = ladj.dim() - (out.dim() - 1)
    return ladj.sum(dim=tuple(range(-extra, 0))) if extra > 0 else ladj


def _recording(transform: Any, capture: Capture, index: int, adapter: FlowAdapter) -> Any:
    original = transform.call_and_ladj

    def call_and_ladj(x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = original(x)
        try:
            capture(index, y, _per_sample(ladj, y))
        except Exception as error:  # never inside the user's forward: say so once instead
            adapter.unreadable(index, error)
        return y, ladj

    transform.call_and_ladj = call_and_ladj
    return transform


class ZukoAdapter(WalkedAdapter):
    name = "zuko"
    is_flow = staticmethod(_is_flow)

    def attach(self, capture: Capture) -> Detach:
        handles = []
        for index, layer in enumerate(self._layers):

            def hook(module: nn.Module, args: tuple, transform: Any, i: int = index) -> Any:
                return _recording(transform, capture, i, self)

            handles.append(layer.module.register_forward_hook(hook))
        return Detach([handle.remove for handle in handles])

    def run_forward(self, x: Tensor) -> object:
        flow = next(m for m in self.model.modules() if isinstance(m, Flow))
        return flow().transform.call_and_ladj(x)


ADAPTER = ZukoAdapter
