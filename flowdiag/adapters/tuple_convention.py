"""Hand-written Glows whose layers return `(out, logdet)` (rosinality/glow-pytorch style).

The log-det may be a scalar, shape (B,), or None for a volume-preserving layer. Layers are found by
class name (ActNorm, InvConv2d / 1x1 conv, ...Coupling); forward hooks see them.
"""

from __future__ import annotations

from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach
from flowdiag.adapters.handwritten import HandwrittenParts
from flowdiag.adapters.walk import WalkedAdapter, as_logdet, kind_by_class_name


def _is_flow(module: nn.Module) -> bool:
    return kind_by_class_name(module) is not None


def _logdet(output: tuple, out: Tensor) -> Tensor | None:
    """(out, logdet) with logdet a tensor, a number or None (rosinality's additive coupling)."""
    return as_logdet(output[1], out) if len(output) > 1 and output[1] is not None else None


class TupleAdapter(HandwrittenParts, WalkedAdapter):
    name = "tuple"
    is_flow = staticmethod(_is_flow)

    def attach(self, capture: Capture) -> Detach:
        # (out, logdet) with logdet a tensor, a number or None (rosinality's additive coupling)
        return self.attach_output_hooks(
            capture,
            lambda output, out: (
                as_logdet(output[1], out) if len(output) > 1 and output[1] is not None else None
            ),
        )


ADAPTER = TupleAdapter
