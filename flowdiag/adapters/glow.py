"""flowdiag's own Glow (`flowdiag.glow.model.Glow`): layers, hooks and ActNorms straight from its modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdiag.adapters.base import ActNormAccess, ActNormStats, Capture, Detach, FlowAdapter, FlowLayer
from flowdiag.adapters.observe import observe_output
from flowdiag.glow.layers import FLOW_LAYER_KINDS, ActNorm
from flowdiag.glow.model import Glow


class GlowActNorm(ActNormAccess):
    """flowdiag's ActNorm: sigma = 1 / sqrt(biased var + eps), tau = -sigma · mean."""

    def __init__(self, name: str, module: ActNorm) -> None:
        self.name = name
        self.module: ActNorm = module

    def is_initialized(self) -> bool:
        return self.module.is_initialized

    def set_initialized(self, value: bool) -> None:
        self.module.initialized.fill_(value)
        self.module._ready = value

    def scale_from(self, stats: ActNormStats) -> Tensor:
        return self.module.scale_for(stats.var(unbiased=False))

    @torch.no_grad()
    def finalize(self, stats: ActNormStats) -> None:
        norm = self.module
        norm._sum.copy_(stats.total)
        norm._sum_sq.copy_(stats.total_sq)
        norm._count.fill_(stats.count)
        norm.finalize()


class GlowAdapter(FlowAdapter):
    name = "flowdiag"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.glow = _find_glow(model)
        if self.glow is None:
            raise TypeError(f"{type(model).__name__} holds no flowdiag.glow.model.Glow")
        self._prefix = next(n for n, m in model.named_modules() if m is self.glow)
        self._prefix = f"{self._prefix}." if self._prefix else ""

    @classmethod
    def recognizes(cls, model: nn.Module) -> bool:
        return _find_glow(model) is not None

    def layers(self) -> list[FlowLayer]:
        # Exactly Glow.flow_layers(): same names (relative to the Glow), same order.
        return [
            FlowLayer(
                name=self._prefix + name,
                kind=FLOW_LAYER_KINDS[type(module)],  # type: ignore[arg-type]
                module=module,
                pixels=pixels,
            )
            for (name, module), pixels in zip(
                self.glow.flow_layers(), self.glow.flow_layer_pixels(), strict=True
            )
        ]

    def attach(self, capture: Capture) -> Detach:
        # No `remembering`: the convs' h·w is the model's own geometry (conv_pixels), known without a
        # forward. Wrapped forwards, not hooks: same outputs, no slow module call (adapters.observe).
        undo = []
        for index, layer in enumerate(self.layers()):

            def observer(output: tuple[Tensor, Tensor], i: int = index) -> None:
                try:
                    capture(i, output[0], output[1])
                except Exception as error:  # never inside the user's forward: say so once instead
                    self.unreadable(i, error)

            undo.append(observe_output(layer.module, observer))
        return Detach(undo)

    def actnorms(self) -> list[ActNormAccess]:
        return [GlowActNorm(self._prefix + name, module) for name, module in self.glow.actnorms()]

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        return [(self._prefix + name, conv.log_abs_det()) for name, conv in self.glow.inv_convs()]

    def conv_pixels(self) -> list[int | None]:
        return [conv.pixels for _, conv in self.glow.inv_convs()]


def _find_glow(model: nn.Module) -> Glow | None:
    if isinstance(model, Glow):
        return model
    return next((m for m in model.modules() if isinstance(m, Glow)), None)


ADAPTER = GlowAdapter
