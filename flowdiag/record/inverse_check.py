"""Where a drifting 1x1 conv does its damage first: the inverse and the conv's conditioning.

The training forward can stay finite while sampling (latent -> data) overflows, a reconstruction
f^-1(f(x)) no longer returns x, or a W grows ill-conditioned (Behrmann et al., "Understanding and
mitigating exploding inverses in invertible neural networks"). At every evaluation the trainer runs
`check_inverse`: per flow layer the max |output| while sampling, the reconstruction error on a fixed
held-out batch, the fraction of non-finite samples, and each conv's log|det W| and condition number.
It runs in float32 whatever the training precision: it measures the weights, not the format.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flowdiag.glow.model import Glow

SAMPLES = 16  # images drawn per check: one small batch (the cost stays a few % of a run)


@dataclass(frozen=True)
class InverseCheck:
    max_abs: np.ndarray  # (N,) per flow layer, in layers/ order, latent -> data; NaN: did not run
    nonfinite: np.ndarray  # (N,) bool: the layer's inverse output held inf or NaN
    onset_layer: str  # first non-finite layer in latent -> data order; "" when all finite
    recon_error: float  # max |x - f^-1(f(x))| on the fixed held-out batch (NaN/inf kept)
    nonfinite_samples: float  # fraction of samples holding inf or NaN
    conv_logabsdet: np.ndarray  # (C,) log|det W| of each 1x1 conv, forward order
    conv_cond: np.ndarray  # (C,) its condition number, from a float64 SVD


def conv_condition(weight: Tensor) -> tuple[float, float]:
    """(log|det W|, condition number) of a square matrix, in float64."""
    w = weight.detach().to(torch.float64)
    singular = torch.linalg.svdvals(w)
    smallest = float(singular.min())
    cond = float(singular.max()) / smallest if smallest > 0 else math.inf
    return float(torch.linalg.slogdet(w).logabsdet), cond


@contextmanager
def _watching_reverse(layers: list[tuple[str, nn.Module]]) -> Iterator[list[tuple[int, Tensor, Tensor]]]:
    """Record (layer index, min, max) of every flow layer's `reverse` output, in call order.

    The layers' `reverse` is wrapped per instance for the length of the block (an instance attribute
    shadows the class method), so the model needs no hook of its own for the inverse direction.
    """
    calls: list[tuple[int, Tensor, Tensor]] = []

    def wrapped(index: int, original: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def reverse(z: Tensor) -> Tensor:
            out = original(z)
            low, high = torch.aminmax(out.detach())
            calls.append((index, low, high))
            return out

        return reverse

    for index, (_, module) in enumerate(layers):
        module.reverse = wrapped(index, module.reverse)  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        for _, module in layers:
            del module.reverse


@torch.no_grad()
def check_inverse(model: Glow, batch: Tensor, temperature: float, seed: int) -> InverseCheck:
    """Sample (seeded, the caller's RNG untouched), reconstruct `batch` (dequantized, on the model's
    device) and measure every conv. Call with the recorder paused: these are not training steps."""
    layers = model.flow_layers()
    n = len(layers)
    device = batch.device
    with _watching_reverse(layers) as calls:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            samples = model.sample(SAMPLES, temperature)
        sampled = list(calls)
    zs, _ = model(batch)
    recon = model.reverse(zs)
    finite_samples = torch.isfinite(samples.flatten(1)).all(dim=1)
    scalars = torch.stack(
        [(batch - recon).abs().amax(), 1.0 - finite_samples.float().mean()]
        + [t for _, low, high in sampled for t in (low, high)]
    ).to(torch.float64)
    host = scalars.cpu().numpy()  # one copy for the whole check
    ran = np.zeros(n, dtype=bool)
    max_abs = np.full(n, np.nan)
    with np.errstate(invalid="ignore"):
        for k, (index, _, _) in enumerate(sampled):  # call order: latent -> data
            ran[index] = True
            max_abs[index] = np.maximum(host[3 + 2 * k], -host[2 + 2 * k])  # NaN stays NaN
    nonfinite = ran & ~np.isfinite(max_abs)
    onset = next((layers[index][0] for index, _, _ in sampled if nonfinite[index]), "")
    figures = [conv_condition(conv.weight()) for _, conv in model.inv_convs()]
    return InverseCheck(
        max_abs=max_abs,
        nonfinite=nonfinite,
        onset_layer=onset,
        recon_error=float(host[0]),
        nonfinite_samples=float(host[1]),
        conv_logabsdet=np.array([f[0] for f in figures]),
        conv_cond=np.array([f[1] for f in figures]),
    )
