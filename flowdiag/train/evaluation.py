"""What the trainer measures besides the steps: held-out bits/dim and the inverse check.

Both use fixed dequantization noise (their own seeded generators, never the training stream's), so
evaluations compare across steps and a resumed run evaluates as the uninterrupted one would.
Both run the model in eval mode and give it back in training mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from flowdiag.glow.model import Glow, bpd_from_log_prob, dequantize
from flowdiag.record.inverse_check import SAMPLES, InverseCheck, check_inverse
from flowdiag.settings.config import RunConfig
from flowdiag.train.data import ImageData

EVAL_NOISE_SEED = 12345
INVERSE_NOISE_SEED = 54321


@contextmanager
def _evaluating(model: Glow) -> Iterator[None]:
    model.eval()
    try:
        yield
    finally:
        model.train()


@torch.no_grad()
def held_out_bpd(model: Glow, images: Tensor, n_bits: int, *, batch_size: int, max_batches: int = 0) -> float:
    """Mean bits/dim of uint8 `images` in minibatches of `batch_size` (the first `max_batches` of
    them; 0: all); NaN when there are no images."""
    if len(images) == 0:
        return math.nan
    chunks = images.split(batch_size)
    if max_batches:
        chunks = chunks[:max_batches]
    device = next(model.parameters()).device
    noise = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    sums = []
    with _evaluating(model):
        for chunk in chunks:
            x = dequantize(chunk.to(device), n_bits, torch.rand(chunk.shape, generator=noise).to(device))
            sums.append(bpd_from_log_prob(model.log_prob(x), model.n_dims, n_bits).sum())
    return float(torch.stack(sums).sum()) / sum(len(chunk) for chunk in chunks)


def inverse_check(model: Glow, data: ImageData, config: RunConfig) -> InverseCheck:
    """Sampling, reconstruction and conditioning (flowdiag.record.inverse_check) on the first held-out
    images (the training images when none are held out)."""
    images = (data.held_out if len(data.held_out) else data.train)[:SAMPLES]
    device = next(model.parameters()).device
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(INVERSE_NOISE_SEED))
    batch = dequantize(images.to(device), config.data.n_bits, noise.to(device))
    with _evaluating(model):
        return check_inverse(model, batch, config.train.sample_temperature, config.train.seed)
