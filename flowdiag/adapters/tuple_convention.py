"""Hand-written Glows whose layers return `(out, logdet)` (rosinality/glow-pytorch style).

The log-det may be a scalar, shape (B,), or None for a volume-preserving layer. Layers are found by
class name (ActNorm, InvConv2d / 1x1 conv, ...Coupling); forward hooks see them.
"""

from __future__ import annotations

from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach
from flowdiag.adapters.handwritten import HandwrittenParts
from flowdiag.adapters.walk import WalkedAdapter, kind_by_class_name, output_tensor


def _is_flow(module: nn.Module) -> bool:
    return kind_by_class_name(module) is not None


class TupleAdapter(HandwrittenParts, WalkedAdapter):
    name = "tuple"
    is_flow = staticmethod(_is_flow)

    def attach(self, capture: Capture) -> Detach:
        capture = self.remembering(capture)
        handles = []
        for index, layer in enumerate(self._layers):

            def hook(module: nn.Module, args: tuple, output: tuple, i: int = index) -> None:
                out = output_tensor(output[0])
                logdet = output[1] if len(output) > 1 else None
                capture(
                    i, out, logdet if isinstance(logdet, Tensor) or logdet is None else out.new_tensor(logdet)
                )

            handles.append(layer.module.register_forward_hook(hook))
        return Detach([handle.remove for handle in handles])


ADAPTER = TupleAdapter
