"""The cumulative init (Algorithm 1) on any library's ActNorms, one at a time, in data -> latent order,
without concatenating minibatches: each ActNorm is set from its inputs' sums pooled over the M
minibatches before the next one's inputs are read, so those come through it, as the library's own
init on the concatenation would see them.

Two walks give that result:
- where the adapter names the model's units (hand-written Glows, transformer flows), each unit's
  inputs are kept across the minibatches (`cumulative_units`), in the memory of the M inputs plus one
  minibatch's activations. Measured on y0ast-style Glows (batch 16, M = 8 or 16): 1.9 to 2.1 times
  the convolutions of M plain forwards, 2.3 to 2.9 times their CPU time (24 ActNorms at 1x8x8 and
  3x16x16, 72 at 3x32x32), where the per-ActNorm passes took 10.5 to 39 times;
- otherwise, and where the model is no sequence of units, per ActNorm every minibatch runs forward
  until that ActNorm is about to see its input, and a private exception stops the pass: about
  (number of ActNorms) / 2 forwards per minibatch, the same memory.

Both run the model in eval() (no BatchNorm statistics move, no dropout) with every ActNorm marked
initialized (none initializes itself from one minibatch), on a copy of each minibatch (the user's are
never changed, whatever the forward does in place), and never into a Monitor's record. If anything
fails, every ActNorm gets its flag and parameters back as they were before the error is re-raised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowdiag.adapters.base import ActNormAccess, ActNormStats, FlowAdapter, internal_passes
from flowdiag.runtime.distributed import Pool
from flowdiag.stabilize.cumulative_units import NotSequential, walk_units
from flowdiag.stabilize.init_passes import Reached, pooled, run_until_stopped

Saved = list[tuple[bool, dict[str, Tensor]]]


def _pooled_input_stats(
    adapter: FlowAdapter, norm: ActNormAccess, minibatches: Sequence[Tensor], pool: Pool
) -> ActNormStats:
    """One ActNorm's input sums over every minibatch, each pass stopped as the ActNorm is reached."""
    grabbed: list[ActNormStats] = []

    def grab(x: Tensor) -> None:
        grabbed.append(norm.stats_of(x))
        raise Reached

    watcher = norm.watch_input(grab)
    try:
        for x in minibatches:
            if not run_until_stopped(adapter, x):
                raise RuntimeError(f"ActNorm {norm.name} did not run in a data -> latent pass of the model")
    finally:
        watcher.remove()
    return pooled(grabbed, pool)


def _saved(norms: Sequence[ActNormAccess]) -> Saved:
    return [
        (norm.is_initialized(), {k: v.detach().clone() for k, v in norm.module.state_dict().items()})
        for norm in norms
    ]


def _restore(norms: Sequence[ActNormAccess], saved: Saved) -> None:
    for norm, (flag, state) in zip(norms, saved, strict=True):
        norm.module.load_state_dict(state)
        norm.set_initialized(flag)


def _walk(
    adapter: FlowAdapter,
    norms: Sequence[ActNormAccess],
    minibatches: Sequence[Tensor],
    pool: Pool,
    saved: Saved,
) -> list[tuple[ActNormAccess, ActNormStats]]:
    if adapter.units():
        try:
            return walk_units(adapter, norms, minibatches, pool)
        except NotSequential:  # start again the slow way, from the ActNorms as they were
            _restore(norms, saved)
            for norm in norms:
                norm.set_initialized(True)
    results = []
    for norm in norms:
        stats = _pooled_input_stats(adapter, norm, minibatches, pool)
        norm.finalize(stats)
        results.append((norm, stats))
    return results


@torch.no_grad()
def cumulative_init_adapter(
    adapter: FlowAdapter, minibatches: Sequence[Tensor], pool: Pool
) -> list[tuple[ActNormAccess, ActNormStats]]:
    """Initialize every ActNorm of `adapter` from `minibatches` (and, through `pool`, every rank's);
    returns each with its pooled stats, in the order they were set (data -> latent)."""
    if not minibatches:
        raise ValueError("the cumulative init needs at least one minibatch")
    norms = adapter.actnorms()
    if not norms:
        return []
    model = adapter.model
    was_training = model.training
    saved = _saved(norms)
    model.eval()  # the passes must not move BatchNorm statistics or draw dropout masks
    # The convs' h·w, for the penalty, is remembered as they run in the walk's passes.
    sizes = adapter.watch_convs()
    try:
        with internal_passes():
            for norm in norms:  # marked first, so no ActNorm initializes itself from one minibatch
                norm.set_initialized(True)
            results = _walk(adapter, norms, minibatches, pool, saved)
            if any(size is None for size in adapter.conv_pixels()):  # a pass stopped before some conv
                run_until_stopped(adapter, minibatches[0])
    except BaseException:
        _restore(norms, saved)
        raise
    finally:
        sizes.remove()
        model.train(was_training)
    return results
