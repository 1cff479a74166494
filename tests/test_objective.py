"""The objective's arithmetic: dequantization's range and bins, and bits per dimension of a known density."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flowdiag.glow.model import bits_per_dim, bpd_from_log_prob, dequantize

ALL_LEVELS = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)


@pytest.mark.parametrize("n_bits", [5, 8])
def test_dequantize_bins_and_range(n_bits: int) -> None:
    bins = 2**n_bits
    low = dequantize(ALL_LEVELS, n_bits, noise=torch.zeros(ALL_LEVELS.shape))
    # Noise 0 puts every pixel on the lower edge of its bin: exactly `bins` values k/bins - 1/2.
    expected = torch.arange(bins, dtype=torch.float32) / bins - 0.5
    assert torch.equal(torch.unique(low), expected)
    # 8-bit value v falls in bin floor(v / 2^(8 - n_bits)).
    assert torch.equal(
        low.flatten(), torch.floor(ALL_LEVELS.flatten().float() / 2 ** (8 - n_bits)) / bins - 0.5
    )
    high = dequantize(ALL_LEVELS, n_bits, noise=torch.full(ALL_LEVELS.shape, 0.999))
    assert float(high.max()) < 0.5 and float(low.min()) == -0.5
    drawn = dequantize(ALL_LEVELS.repeat(64, 1, 1, 1), n_bits)
    # <= rather than <: noise within 2^-24 of 1 rounds the top bin's edge to 0.5 in float32.
    assert float(drawn.min()) >= -0.5 and float(drawn.max()) <= 0.5
    assert torch.all((drawn - low) * bins < 1.0) and torch.all(drawn >= low)  # noise stays inside a bin


@pytest.mark.parametrize("n_bits", [5, 8])
def test_uniform_density_is_n_bits_per_dim(n_bits: int) -> None:
    # The uniform density on [-1/2, 1/2)^D has log p = 0: each dimension costs exactly n_bits bits.
    d = 64
    assert torch.allclose(bpd_from_log_prob(torch.zeros(3), d, n_bits), torch.full((3,), float(n_bits)))


class _StandardNormal(nn.Module):
    """A 'flow' whose log-density is the standard normal's: bits/dim follows in closed form."""

    def __init__(self, n_dims: int) -> None:
        super().__init__()
        self.n_dims = n_dims
        self.unused = nn.Parameter(torch.zeros(()))  # bits_per_dim reads the device off a parameter

    def log_prob(self, x: Tensor) -> Tensor:
        return (-0.5 * x**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(dim=1)


@pytest.mark.parametrize("n_bits", [5, 8])
def test_bits_per_dim_of_a_known_density(n_bits: int) -> None:
    images = ALL_LEVELS.repeat(4, 1, 1, 1)
    model = _StandardNormal(n_dims=256)
    torch.manual_seed(3)
    bpd = bits_per_dim(model, images, n_bits)
    torch.manual_seed(3)
    x = dequantize(images, n_bits)  # the same noise
    nats = (0.5 * x**2 + 0.5 * math.log(2 * math.pi)).flatten(1).sum(dim=1)  # -log p(x)
    expected = (nats / 256 + n_bits * math.log(2)) / math.log(2)
    assert torch.allclose(bpd, expected, rtol=1e-6)
    # Sanity: a density that spreads over [-1/2, 1/2) less well than uniform costs more than n_bits.
    assert bool((bpd > n_bits).all())
