"""Hand-written Glows whose layers return `(out, logdet)` (rosinality/glow-pytorch style).

The log-det may be a scalar, shape (B,), or None for a volume-preserving layer (rosinality's additive
coupling). Layers are found by class name (ActNorm, InvConv2d / 1x1 conv, ...Coupling, ...Split), the
walk stopping at the first one, so what a coupling's network holds is never a flow layer of its own;
forward hooks see them. A call that returns anything but such a tuple records nothing (said once).
"""

from __future__ import annotations

from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach
from flowdiag.adapters.handwritten import HandwrittenParts
from flowdiag.adapters.walk import WalkedAdapter, as_logdet, kind_by_class_name


def _is_flow(module: nn.Module) -> bool:
    return kind_by_class_name(module) is not None


def _logdet(output: tuple, out: Tensor) -> Tensor | None:
    if len(output) < 2:
        raise TypeError(f"returned a {len(output)}-tuple, not (output, logdet)")
    return None if output[1] is None else as_logdet(output[1], out)


class TupleAdapter(HandwrittenParts, WalkedAdapter):
    name = "tuple"
    is_flow = staticmethod(_is_flow)

    def attach(self, capture: Capture) -> Detach:
        return self.attach_output_hooks(capture, _logdet)


ADAPTER = TupleAdapter
