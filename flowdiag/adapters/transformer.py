"""Transformer flows (apple/ml-tarflow's TarFlow and flows written like it): a stack of autoregressive
transformer blocks on token sequences (B, T, D), each called as `block(x, ...) -> (z, logdet, ...)`.

The blocks are the elements of the outermost ModuleList (or Sequential) whose every element holds an
attention module (`nn.MultiheadAttention`, `nn.TransformerEncoderLayer`, or a class named *Attention*
/ *Attn*); forward hooks see them, and their `reverse` (sampling) never runs through `forward`.

A block's log-det may come per element (B, T, D) or per token (B, T): those are summed over the sample.
A per-sample log-det (B,) is, by default, the per-dimension *mean* TarFlow returns (`-xa.mean(dim=[1,
2])`, so that its loss is per dimension): it is scaled back to the true log-det by the block output's
elements per sample, T · D. Blocks that return the per-sample sum take `TransformerAdapter(model,
logdet="sum")`. Under bf16 autocast the log-det is scaled in float32 at least (the model's own total
stays in its own dtype).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach, FlowAdapter, FlowLayer
from flowdiag.adapters.handwritten import HandwrittenParts


def _is_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention | nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        return True
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


def _holds_attention(module: nn.Module) -> bool:
    return any(_is_attention(m) for m in module.modules())


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the outermost list of attention-holding modules; empty if there is none."""
    for prefix, module in model.named_modules():  # pre-order: the outermost list comes first
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > 0:
            children = list(module.named_children())
            if all(_holds_attention(child) for _, child in children):
                return [(f"{prefix}.{name}" if prefix else name, child) for name, child in children]
    return []


def _read(output: Any) -> tuple[Tensor, Tensor]:
    """(z, logdet) from a block's (z, logdet, ...): the log-det is the first tensor after z."""
    if not isinstance(output, tuple | list) or not output or not isinstance(output[0], Tensor):
        raise TypeError(f"returned {type(output).__name__}, not (z, logdet, ...)")
    logdet = next((item for item in output[1:] if isinstance(item, Tensor)), None)
    if logdet is None:
        raise TypeError("returned no log-det tensor after z")
    return output[0], logdet


class TransformerAdapter(HandwrittenParts, FlowAdapter):
    name = "transformer"

    def __init__(self, model: nn.Module, *, logdet: Literal["mean", "sum"] = "mean") -> None:
        super().__init__(model)
        if logdet not in ("mean", "sum"):
            raise ValueError(f"logdet must be 'mean' or 'sum', not {logdet!r}")
        self._mean = logdet == "mean"
        self._layers = [FlowLayer(name, "coupling", block) for name, block in transformer_blocks(model)]

    @classmethod
    def recognizes(cls, model: nn.Module) -> bool:
        return bool(transformer_blocks(model))

    def layers(self) -> list[FlowLayer]:
        return self._layers

    def true_logdet(self, logdet: Tensor, z: Tensor) -> Tensor:
        """The block's log-det per sample, (B,) or a scalar, in its true (summed) units."""
        if logdet.dim() >= 2:  # per token or per element: each is a log-det of its own
            return logdet.sum(dim=tuple(range(1, logdet.dim())))
        if not self._mean:
            return logdet
        wide = logdet.to(torch.promote_types(logdet.dtype, torch.float32))
        return wide * (z[0].numel() if z.dim() > 0 else 1)

    def attach(self, capture: Capture) -> Detach:
        handles = []
        for index, layer in enumerate(self._layers):

            def hook(module: nn.Module, args: tuple, output: Any, i: int = index) -> None:
                try:
                    z, logdet = _read(output)
                    capture(i, z, self.true_logdet(logdet, z))
                except Exception as error:  # never inside the user's forward: say so once instead
                    self.unreadable(i, error)

            handles.append(layer.module.register_forward_hook(hook))
        return Detach([handle.remove for handle in handles])


ADAPTER = TransformerAdapter
