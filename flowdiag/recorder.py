"""Forward hooks that watch every flow layer; the model knows nothing about them.

Per step and per flow layer (ActNorm, 1x1 conv, coupling, in forward order) the hooks keep, on the
device, max |output| and the batch-mean log-det. Nothing crosses to the host inside a hook: `row()`
packs the step into one tensor that the trainer copies once per step. max |output| is an inf-norm,
which propagates NaN and inf, so "non-finite output" is simply "max |output| is not finite".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from flowdiag.layers import FLOW_LAYER_KINDS
from flowdiag.model import Glow


class LayerRecorder:
    def __init__(self, model: Glow) -> None:
        layers = model.flow_layers()
        self.names = [name for name, _ in layers]
        self.kinds = [FLOW_LAYER_KINDS[type(module)] for _, module in layers]
        self._max_abs: list[Tensor | None] = [None] * len(layers)
        self._logdet: list[Tensor | None] = [None] * len(layers)
        self._active = True
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._hook_for(index)) for index, (_, module) in enumerate(layers)
        ]

    def _hook_for(self, index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
            if not self._active:
                return
            z, logdet = output
            self._max_abs[index] = torch.linalg.vector_norm(z.detach(), ord=float("inf"))
            self._logdet[index] = logdet.detach().mean()

        return hook

    @property
    def n_layers(self) -> int:
        return len(self.names)

    def layer_values(self, reference: Tensor) -> tuple[Tensor, Tensor]:
        """(max_abs, logdet) of the last forward, each (N,) on the device; NaN where a layer did not run."""
        if any(v is None for v in self._max_abs):
            # Only when a layer did not run (never in a normal step): new_full copies to the device.
            missing = reference.new_full((), float("nan"))
            self._max_abs = [missing if v is None else v for v in self._max_abs]
            self._logdet = [missing if v is None else v for v in self._logdet]
        max_abs = torch.stack([v.to(reference.dtype) for v in self._max_abs])  # type: ignore[union-attr]
        logdet = torch.stack([v.to(reference.dtype) for v in self._logdet])  # type: ignore[union-attr]
        return max_abs, logdet

    def reset(self) -> None:
        self._max_abs = [None] * self.n_layers
        self._logdet = [None] * self.n_layers

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation passes and sampling are not training steps: keep them out of the records."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
