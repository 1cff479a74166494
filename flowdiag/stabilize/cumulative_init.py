"""The cumulative init (Algorithm 1 of the paper) for any supported flow, and the figures it leaves.

Each ActNorm is initialized from its own inputs pooled over M minibatches, in data -> latent order,
never from their concatenation: flowdiag's own Glow by its frontier walk (`cumulative_glow`), every
other library through its adapter (`cumulative_adapters`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import FlowAdapter
from flowdiag.adapters.glow import GlowAdapter
from flowdiag.glow.layers import ActNorm
from flowdiag.glow.model import Glow
from flowdiag.runtime.distributed import Pool, no_pool
from flowdiag.runtime.errors import UserError
from flowdiag.stabilize.cumulative_adapters import cumulative_init_adapter
from flowdiag.stabilize.cumulative_glow import cumulative_init_glow


@dataclass(frozen=True)
class ActNormInitStats:
    """What the reports need to judge an ActNorm's init."""

    name: str
    log_scale_min: float
    log_scale_max: float
    min_input_var: float
    n_values: int  # values per channel its statistics came from: M · batch · h · w
    pixels: int  # h · w of its input


def cumulative_init(
    model: nn.Module,
    minibatches: Sequence[Tensor],
    *,
    adapter: str | FlowAdapter = "auto",
    pool: Pool = no_pool,
) -> list[ActNormInitStats]:
    """Algorithm 1: initialize each of the model's own ActNorms from its inputs pooled over all M
    minibatches, in data -> latent order, with its library's formula; then mark it initialized.

    `minibatches` are model inputs (as the training loop feeds them), on the model's device; they are
    never changed (each pass runs on a copy). `adapter`: "auto", a name, or an adapter instance. `pool`
    sums the statistics over data-parallel ranks (`flowdiag.runtime.distributed.pool`), so every
    replica gets the init of all ranks' minibatches. Returns, per ActNorm, the log-scale range it got,
    its smallest input variance and its values per channel.

    At batch 1 a Glow's deepest level sees one value per channel; 16 minibatches give it 16:

    >>> import torch
    >>> from flowdiag.glow.model import Glow
    >>> from flowdiag.settings.config import ModelConfig
    >>> model = Glow(ModelConfig(in_channels=1, image_size=8, n_levels=3, n_steps=1, hidden=8))
    >>> minibatches = [torch.rand(1, 1, 8, 8) - 0.5 for _ in range(16)]
    >>> stats = cumulative_init(model, minibatches)
    >>> deepest = stats[-1]
    >>> deepest.name, deepest.pixels, deepest.n_values
    ('levels.2.steps.0.coupling.net.layers.4', 1, 16)
    """
    batches = list(minibatches)
    if not batches:
        raise UserError("cumulative_init needs at least one minibatch; pass a list of M >= 1 input batches")
    flow = resolve_adapter(model, adapter)
    if isinstance(flow, GlowAdapter):
        cumulative_init_glow(flow.glow, batches, pool)
        return glow_init_stats(flow.glow)
    figures = []
    images = sum(int(x.shape[0]) for x in batches)
    for norm, stats in cumulative_init_adapter(flow, batches, pool):
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


def _actnorms_with_pixels(model: Glow) -> list[tuple[str, ActNorm, int]]:
    """Every ActNorm in forward order with the h·w of its level (coupling networks' included)."""
    found = []
    for i, level in enumerate(model.levels):
        for k, step in enumerate(level.steps):
            for name, module in step.named_modules():
                if isinstance(module, ActNorm):
                    found.append((f"levels.{i}.steps.{k}.{name}", module, level.pixels))
    return found


def glow_init_stats(model: Glow) -> list[ActNormInitStats]:
    """The figures of every ActNorm of an initialized Glow, coupling networks' included, forward order."""
    stats = []
    for name, norm, pixels in _actnorms_with_pixels(model):
        if not norm.is_initialized:
            raise RuntimeError(f"ActNorm {name} was not initialized")
        log_scale = norm.log_scale.detach().double()
        stats.append(
            ActNormInitStats(
                name=name,
                log_scale_min=float(log_scale.min()),
                log_scale_max=float(log_scale.max()),
                min_input_var=float(norm.init_min_var),
                n_values=int(norm.init_count),
                pixels=pixels,
            )
        )
    return stats
