"""Preflight audit: would this model's ActNorm init fail at this batch size and M?

An ActNorm's data-dependent init sees, per channel, M · batch · h · w values (h · w of its input). At
one value per channel its variance is 0 (biased) or 0/0 (unbiased): every library then gives NaN
(unbiased std) or 1/sqrt(eps) (biased variance + eps). The audit runs the init on a copy of the model,
so the model itself is left untouched, and reports what each ActNorm would see and get.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import FlowAdapter
from flowdiag.runtime.distributed import no_pool
from flowdiag.stabilize.cumulative_adapters import cumulative_init_adapter


@dataclass(frozen=True)
class ActNormAudit:
    name: str
    values_per_channel: int  # what its init sees at this batch size and M
    min_input_var: float  # smallest per-channel (biased) variance of its inputs in the audited batches
    scale_min: float  # the multiplicative scale its library's init would give (NaN if any channel's is)
    scale_max: float
    at_risk: bool  # one value per channel: the scale is NaN or 1/sqrt(eps)
    inits_when_sampling: bool  # uninitialized, and its library would initialize it on a sampling call


@dataclass(frozen=True)
class AuditResult:
    adapter: str
    batch_size: int
    init_batches: int
    actnorms: list[ActNormAudit]
    min_safe_init_batches: int  # smallest M that gives every ActNorm at least 2 values per channel

    @property
    def at_risk(self) -> list[str]:
        return [norm.name for norm in self.actnorms if norm.at_risk]


@torch.no_grad()
def audit(
    model: nn.Module,
    example_batch: Tensor | Sequence[Tensor],
    *,
    init_batches: int = 1,
    adapter: str | FlowAdapter = "auto",
) -> AuditResult:
    """Audit every ActNorm of `model` at the example's batch size and M = `init_batches`.

    `example_batch` is one training minibatch (as the loop feeds the model) or a list of M of them;
    `adapter`: "auto", a name, or an adapter instance. The model is left as it was.
    The counts are exact for M; the variances and scales come from the minibatches given (with one
    minibatch and M > 1, from that one).

    >>> import torch
    >>> from flowdiag.glow.model import Glow
    >>> from flowdiag.settings.config import ModelConfig
    >>> model = Glow(ModelConfig(in_channels=1, image_size=8, n_levels=3, n_steps=1, hidden=8))
    >>> result = audit(model, torch.rand(1, 1, 8, 8) - 0.5)  # batch 1, M = 1
    >>> len(result.at_risk) > 0, result.min_safe_init_batches  # the 1x1 level sees one value per channel
    (True, 2)
    """
    if init_batches < 1:
        raise ValueError("init_batches must be at least 1")
    batches = [example_batch] if isinstance(example_batch, Tensor) else list(example_batch)
    flow = resolve_adapter(model, adapter)
    sampling = {norm.name: norm.inits_when_sampling and not norm.is_initialized() for norm in flow.actnorms()}
    # The init runs on a copy of the adapter, and so of the model it holds (one deepcopy keeps the two
    # together, a user's own adapter class included): the model and its "initialized" flags stay as
    # they were.
    copied = copy.deepcopy(flow)
    results = cumulative_init_adapter(copied, batches[:init_batches], no_pool)
    per_batch = [stats.count // len(batches[:init_batches]) for _, stats in results]
    norms = []
    for (norm, stats), count in zip(results, per_batch, strict=True):
        values = count * init_batches
        scale = norm.scale_from(stats)
        norms.append(
            ActNormAudit(
                name=norm.name,
                values_per_channel=values,
                min_input_var=float(stats.var(unbiased=False).min()),
                scale_min=float(scale.min()) if torch.isfinite(scale).all() else math.nan,
                scale_max=float(scale.max()) if torch.isfinite(scale).all() else math.nan,
                at_risk=values < 2,
                inits_when_sampling=sampling[norm.name],
            )
        )
    safe = max((math.ceil(2 / count) for count in per_batch), default=1)
    return AuditResult(
        adapter=flow.name,
        batch_size=int(batches[0].shape[0]),
        init_batches=init_batches,
        actnorms=norms,
        min_safe_init_batches=safe,
    )
