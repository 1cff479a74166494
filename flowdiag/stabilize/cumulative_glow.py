"""The cumulative init (Algorithm 1) on flowdiag's own Glow: every ActNorm from M minibatches.

Each ActNorm must see its own input: the data as transformed by the already initialized layers
before it. Pushing all M minibatches through at once (y0ast's trick) costs M times the activation
memory; this walks the flow layer by layer instead, keeping only the *frontier* -- each minibatch's
current activation at the top level, which is the size of the data itself -- and recomputing inside
each coupling network, which holds two ActNorms, from that frontier. Cost: about three plain forward
passes per minibatch; memory: the M minibatches plus one minibatch's activations.

With equal minibatch sizes the result equals the standard (M = 1) init on their concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowdiag.glow.layers import ActNorm, CouplingNet, squeeze
from flowdiag.glow.model import Glow
from flowdiag.runtime.distributed import Pool


def _init_actnorm(norm: ActNorm, inputs: Sequence[Tensor], pool: Pool) -> None:
    for x in inputs:
        norm.accumulate(x)
    pool(norm.accumulators())
    norm.finalize()


def _init_coupling_net(net: CouplingNet, inputs: Sequence[Tensor], pool: Pool) -> None:
    """Initialize the net's ActNorms in order, recomputing the layers before each from `inputs`."""
    for index, layer in enumerate(net.layers):
        if isinstance(layer, ActNorm):
            for x in inputs:
                layer.accumulate(net.run(x, stop=index))
            pool(layer.accumulators())
            layer.finalize()


def _advance(layer: nn.Module, frontier: list[Tensor]) -> list[Tensor]:
    return [layer(x)[0] for x in frontier]


@torch.no_grad()
def cumulative_init_glow(model: Glow, minibatches: Sequence[Tensor], pool: Pool) -> None:
    """Initialize every ActNorm of `model` from `minibatches` (dequantized, on the model's device).

    M = len(minibatches); M = 1 is the standard Glow init. `pool` sums each ActNorm's accumulators
    over data-parallel ranks before it is finalized, so every rank gets the init of all ranks'
    minibatches together.
    """
    was_training = model.training
    model.eval()
    try:
        frontier = list(minibatches)
        for level in model.levels:
            frontier = [squeeze(x) for x in frontier]
            for step in level.steps:
                _init_actnorm(step.actnorm, frontier, pool)
                frontier = _advance(step.actnorm, frontier)
                frontier = _advance(step.invconv, frontier)
                halves = [step.coupling.split_input(x)[0] for x in frontier]
                _init_coupling_net(step.coupling.net, halves, pool)
                frontier = _advance(step.coupling, frontier)
            if level.split is not None:
                frontier = [level.split(x)[0] for x in frontier]
    finally:
        model.train(was_training)
