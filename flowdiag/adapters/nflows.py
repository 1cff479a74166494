"""nflows: transforms map data -> noise in `forward(inputs) -> (outputs, logabsdet (B,))`, called
through `Module.__call__`, so plain forward hooks see every layer. Composite transforms run their
children in registration order."""

from __future__ import annotations

import torch
from nflows.flows.base import Flow
from nflows.transforms.base import Transform
from nflows.transforms.conv import OneByOneConvolution
from nflows.transforms.normalization import ActNorm
from torch import Tensor, nn

from flowdiag.adapters.base import ActNormAccess, ActNormStats, Capture, Detach, FlowLayer
from flowdiag.adapters.walk import WalkedAdapter, as_logdet


def _is_flow(module: nn.Module) -> bool:
    return isinstance(module, Transform)


class NflowsActNorm(ActNormAccess):
    """nflows ActNorm: log_scale = -log(std), shift = -mean / std; std unbiased, no eps (NaN at one
    value per channel). It initializes only in training mode, data -> noise."""

    def __init__(self, name: str, module: ActNorm) -> None:
        self.name = name
        self.module = module

    def is_initialized(self) -> bool:
        return bool(self.module.initialized)

    def set_initialized(self, value: bool) -> None:
        self.module.initialized.fill_(value)

    def scale_from(self, stats: ActNormStats) -> Tensor:
        return 1.0 / torch.sqrt(stats.var(unbiased=True))

    @torch.no_grad()
    def finalize(self, stats: ActNormStats) -> None:
        std = torch.sqrt(stats.var(unbiased=True))
        norm = self.module
        norm.log_scale.data = (-torch.log(std)).to(norm.log_scale.dtype)
        norm.shift.data = (-stats.mean() / std).to(norm.shift.dtype)
        self.set_initialized(True)


class NflowsAdapter(WalkedAdapter):
    name = "nflows"
    is_flow = staticmethod(_is_flow)

    def attach(self, capture: Capture) -> Detach:
        return self.attach_output_hooks(capture, lambda output, out: as_logdet(output[1], out))

    def actnorms(self) -> list[ActNormAccess]:
        return [
            NflowsActNorm(layer.name, layer.module)  # type: ignore[arg-type]
            for layer in self._layers
            if isinstance(layer.module, ActNorm)
        ]

    def invconvs(self) -> list[FlowLayer]:
        return [layer for layer in self._layers if isinstance(layer.module, OneByOneConvolution)]

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        return [(layer.name, layer.module.logabsdet()) for layer in self.invconvs()]

    def run_forward(self, x: Tensor) -> object:
        flow = next((m for m in self.model.modules() if isinstance(m, Flow)), None)
        if flow is not None:
            return flow._transform(x, context=None)
        top = next(m for m in self.model.modules() if isinstance(m, Transform))
        return top(x)


ADAPTER = NflowsAdapter
