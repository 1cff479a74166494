"""The log-Jacobian-determinant penalty of eq. (2): λ · Σ over 1x1 convs of (h · w · log|det W|)².

For the LU form log|det W| = Σ log|u|, so the gradient reaches only the log|u| parameters. It pulls
each W towards |det W| = 1 while the conv keeps shuffling channels. flowdiag's own Glow knows every
conv's h·w from its geometry; any other flow goes through its adapter, which remembers the h·w each
conv ran at in the last forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import FlowAdapter
from flowdiag.glow.model import Glow
from flowdiag.runtime.errors import UserError

_PENALTY = "_flowdiag_penalty_adapter"


def conv_logdets(model: Glow) -> Tensor:
    """h · w · log|det W| of every 1x1 conv of flowdiag's Glow at the size it runs at, forward order."""
    return torch.stack([conv.pixels * conv.log_abs_det() for _, conv in model.inv_convs()])


def _penalty_adapter(model: nn.Module, adapter: str | FlowAdapter) -> FlowAdapter:
    """One adapter per model, kept on it with a watcher that remembers each conv's spatial size."""
    cached = model.__dict__.get(_PENALTY)
    wanted = adapter if isinstance(adapter, str) else adapter.name
    if cached is not None and wanted in ("auto", cached[0].name):
        return cached[0]
    if cached is not None:
        cached[1].remove()
    flow = resolve_adapter(model, adapter)
    model.__dict__[_PENALTY] = (flow, flow.watch_convs())
    return flow


def logdet_penalty(model: nn.Module, *, adapter: str | FlowAdapter = "auto") -> Tensor:
    """Σ over the invertible 1x1 convs of (h·w · log|det W|)², differentiable, without λ.

    h·w is the spatial size each conv ran at in the last data -> latent forward: the first call starts
    watching the convs, so call it once before training (or train inside `flowdiag.Monitor`, or run
    `cumulative_init` first, both of which see every conv run). `adapter`: "auto" (libraries by their
    classes, hand-written flows by their modules), a name, or an adapter instance.

    A fresh LU conv starts at |det W| = 1 (a rotation), so the penalty starts at 0, and grows as the
    convs' log-dets drift:

    >>> import torch
    >>> from flowdiag.glow.model import Glow
    >>> from flowdiag.settings.config import ModelConfig
    >>> model = Glow(ModelConfig(in_channels=1, image_size=8, n_levels=2, n_steps=1, hidden=8))
    >>> float(logdet_penalty(model).detach()) < 1e-8
    True
    >>> conv = model.levels[0].steps[0].invconv  # 4 channels at 4x4 = 16 positions
    >>> with torch.no_grad():
    ...     _ = conv.log_abs_u.add_(0.1)  # log|det W| = 0.4
    >>> round(float(logdet_penalty(model).detach()), 2)  # (16 · 0.4)²
    40.96
    """
    if isinstance(model, Glow) and adapter in ("auto", "flowdiag"):
        return (conv_logdets(model) ** 2).sum()
    flow = _penalty_adapter(model, adapter)
    convs = flow.conv_logabsdets()
    if not convs:
        reference = next(model.parameters(), None)
        return torch.zeros((), dtype=reference.dtype if reference is not None else None)
    pixels = flow.conv_pixels()
    missing = [name for (name, _), size in zip(convs, pixels, strict=True) if size is None]
    if missing:
        raise UserError(
            f"logdet_penalty: 1x1 conv {missing[0]} has not run since flowdiag started watching, so its h·w "
            "is unknown; call logdet_penalty(model) once before the first forward"
        )
    terms = [(size * logabsdet) ** 2 for (_, logabsdet), size in zip(convs, pixels, strict=True)]
    return torch.stack(terms).sum()


def watch_conv_sizes(model: nn.Module, *, adapter: str | FlowAdapter = "auto") -> None:
    """Start remembering each 1x1 conv's spatial size now, so the first `logdet_penalty` after the next
    forward knows it (not needed inside `flowdiag.Monitor` or after `cumulative_init`)."""
    _penalty_adapter(model, adapter)
