"""The cumulative init (Algorithm 1) on any library's ActNorms, one layer at a time, without
concatenating minibatches.

For each ActNorm in data -> latent order, every minibatch runs forward until that ActNorm is about
to see its input; the input's per-channel sums are added to a float64 accumulator and the pass is
stopped with a private exception, so the layers after it never run. The ActNorm is then set from the
pooled sums with its library's own formula, before the next ActNorm's passes, which therefore see
their inputs through already initialized layers, as the library's init on the concatenation would.

Memory: the minibatches plus one minibatch's activations. Cost: about (number of ActNorms) x M
partial forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowdiag.adapters.base import ActNormAccess, ActNormStats, FlowAdapter
from flowdiag.runtime.distributed import Pool


class _Reached(Exception):
    """Raised inside the library's call to stop the pass once the ActNorm's input is seen."""


def _pooled_input_stats(
    adapter: FlowAdapter, norm: ActNormAccess, minibatches: Sequence[Tensor], pool: Pool
) -> ActNormStats:
    pooled: list[ActNormStats] = []

    def grab(x: Tensor) -> None:
        pooled.append(norm.stats_of(x))
        raise _Reached

    detach = norm.watch_input(grab)
    try:
        for x in minibatches:
            try:
                adapter.run_forward(x)
            except Exception as error:
                if _stopped_by_us(error):
                    continue
                raise
            raise RuntimeError(f"ActNorm {norm.name} did not run in a data -> latent pass of the model")
    finally:
        detach.remove()
    total = pooled[0]
    for stats in pooled[1:]:
        total = total.add(stats)
    return _across_ranks(total, pool)


def _across_ranks(stats: ActNormStats, pool: Pool) -> ActNormStats:
    """The sums of every rank's minibatches (`pool` adds them in place; a no-op in one process)."""
    count = torch.tensor(float(stats.count), dtype=torch.float64, device=stats.total.device)
    pool([stats.total, stats.total_sq, count])
    return ActNormStats(int(count), stats.total, stats.total_sq)


def _stopped_by_us(error: BaseException | None) -> bool:
    # Some containers re-raise a module's error as their own (FrEIA's GraphINN: RuntimeError from e).
    while error is not None:
        if isinstance(error, _Reached):
            return True
        error = error.__cause__ or error.__context__
    return False


@torch.no_grad()
def cumulative_init_adapter(
    adapter: FlowAdapter, minibatches: Sequence[Tensor], pool: Pool
) -> list[tuple[ActNormAccess, ActNormStats]]:
    """Initialize every ActNorm of `adapter` from `minibatches` (and, through `pool`, every rank's);
    returns each with its pooled stats."""
    if not minibatches:
        raise ValueError("the cumulative init needs at least one minibatch")
    norms = adapter.actnorms()
    if not norms:
        return []
    model = adapter.model
    was_training = model.training
    # eval(): the partial passes must not move BatchNorm statistics or draw dropout masks.
    model.eval()
    # Marked first, so no ActNorm can initialize itself from one minibatch on any pass.
    for norm in norms:
        norm.set_initialized(True)
    results = []
    try:
        for norm in norms:
            stats = _pooled_input_stats(adapter, norm, minibatches, pool)
            norm.finalize(stats)
            results.append((norm, stats))
        # One full pass records the spatial size every 1x1 conv runs at, for the penalty.
        detach = adapter.watch_convs()
        try:
            adapter.run_forward(minibatches[0])
        finally:
            detach.remove()
    finally:
        model.train(was_training)
    return results
