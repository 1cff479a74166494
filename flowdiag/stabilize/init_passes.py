"""What both walks of Algorithm 1 through an adapter share: a pass of the model over one minibatch that
flowdiag's own hooks may stop, and the pooling of an ActNorm's sums over minibatches and ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowdiag.adapters.base import ActNormStats, FlowAdapter
from flowdiag.runtime.distributed import Pool


class Reached(Exception):
    """Raised inside the model's call to stop a pass once it has given what the init needs."""


def stopped_by_us(error: BaseException | None) -> bool:
    # Some containers re-raise a module's error as their own (FrEIA's GraphINN: RuntimeError from e).
    while error is not None:
        if isinstance(error, Reached):
            return True
        error = error.__cause__ or error.__context__
    return False


def run_until_stopped(adapter: FlowAdapter, x: Tensor) -> bool:
    """Run the model data -> latent on a copy of `x` (a forward may change its input in place: y0ast's
    adds its dequantization noise with `x +=`); True when one of flowdiag's hooks stopped the pass."""
    try:
        adapter.run_forward(x.clone())
    except Exception as error:
        if stopped_by_us(error):
            return True
        raise
    return False


def pooled(stats: Sequence[ActNormStats], pool: Pool) -> ActNormStats:
    """The sums of every minibatch, then of every rank (`pool` adds in place; a no-op in one process)."""
    total = stats[0]
    for more in stats[1:]:
        total = total.add(more)
    count = torch.tensor(float(total.count), dtype=torch.float64, device=total.total.device)
    pool([total.total, total.total_sq, count])
    return ActNormStats(int(count), total.total, total.total_sq)
