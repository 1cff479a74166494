"""The two stabilizers for any supported flow: Algorithm 1's cumulative ActNorm init and the eq. (2)
log-det penalty. flowdiag's own Glow goes through `flowdiag.init` and `flowdiag.penalty`; every other
library goes through its adapter (`flowdiag.adapters`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import FlowAdapter
from flowdiag.adapters.glow import GlowAdapter
from flowdiag.adapters.init_pass import initialize_actnorms
from flowdiag.init import ActNormInitStats, cumulative_actnorm_init
from flowdiag.runtime.errors import UserError

_PENALTY = "_flowdiag_penalty_adapter"


def cumulative_init(
    model: nn.Module, minibatches: Sequence[Tensor], *, adapter: str = "auto"
) -> list[ActNormInitStats]:
    """Algorithm 1: initialize each of the model's own ActNorms from its inputs pooled over all M
    minibatches, in data -> latent order, with its library's formula; then mark it initialized.

    `minibatches` are model inputs (as the training loop feeds them), on the model's device. Returns,
    per ActNorm, the log-scale range it got, its smallest input variance and its values per channel.
    """
    batches = list(minibatches)
    if not batches:
        raise UserError("cumulative_init needs at least one minibatch; pass a list of M >= 1 input batches")
    flow = resolve_adapter(model, adapter, example=batches[0])
    if isinstance(flow, GlowAdapter):
        return cumulative_actnorm_init(flow.glow, batches)
    figures = []
    images = sum(int(x.shape[0]) for x in batches)
    for norm, stats in initialize_actnorms(flow, batches):
        log_scale = torch.log(norm.scale_from(stats))
        figures.append(
            ActNormInitStats(
                name=norm.name,
                log_scale_min=float(log_scale.min()),
                log_scale_max=float(log_scale.max()),
                min_input_var=float(stats.var(unbiased=False).min()),
                n_values=stats.count,
                pixels=stats.count // images,  # values per channel per image: h·w of its input
            )
        )
    return figures


def _penalty_adapter(model: nn.Module, adapter: str) -> FlowAdapter:
    """One adapter per model, kept on it with a watcher that remembers each conv's spatial size."""
    cached = model.__dict__.get(_PENALTY)
    if cached is not None and adapter in ("auto", cached[0].name):
        return cached[0]
    if cached is not None:
        cached[1].remove()
    flow = resolve_adapter(model, adapter)
    model.__dict__[_PENALTY] = (flow, flow.watch_convs())
    return flow


def logdet_penalty(model: nn.Module, *, adapter: str = "auto") -> Tensor:
    """Σ over the invertible 1x1 convs of (h·w · log|det W|)², differentiable, without λ.

    h·w is the spatial size each conv ran at in the last data -> latent forward: the first call starts
    watching the convs, so call it once before training (or train inside `flowdiag.Monitor`, or run
    `cumulative_init` first, both of which see every conv run).
    """
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


def watch_conv_sizes(model: nn.Module, *, adapter: str = "auto") -> None:
    """Start remembering each 1x1 conv's spatial size now, so the first `logdet_penalty` after the next
    forward knows it (not needed inside `flowdiag.Monitor` or after `cumulative_init`)."""
    _penalty_adapter(model, adapter)
