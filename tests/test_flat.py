"""Flat parameters: the same training as per-tensor parameters, with one tensor for the optimizer."""

from __future__ import annotations

import copy

import torch

from flowdiag.glow.model import bpd_from_log_prob, dequantize
from flowdiag.train.flat import FlatParameters

from .flows import tiny_glow, tiny_images


def test_flat_parameters_train_exactly_like_separate_ones() -> None:
    separate = tiny_glow("affine")
    flat_model = copy.deepcopy(separate)
    flat = FlatParameters([p for p in flat_model.parameters() if p.requires_grad])
    opt_separate = torch.optim.RAdam(separate.parameters(), lr=1e-2)
    opt_flat = torch.optim.RAdam([flat.flat], lr=1e-2)
    x = dequantize(
        tiny_images(6), 8, torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ).double()
    for _ in range(3):
        opt_separate.zero_grad(set_to_none=True)
        flat.zero_grad()
        for model in (separate, flat_model):
            bpd_from_log_prob(model.log_prob(x), model.n_dims).mean().backward()
        opt_separate.step()
        opt_flat.step()
    for (name, a), (_, b) in zip(separate.named_parameters(), flat_model.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
    # Every parameter and its gradient still live inside the two flat tensors.
    assert flat.flat.grad is not None
    start, end = flat.flat.data_ptr(), flat.flat.data_ptr() + flat.flat.numel() * flat.flat.element_size()
    grad_start = flat.flat.grad.data_ptr()
    for p in flat_model.parameters():
        assert start <= p.data_ptr() < end
        assert p.grad is not None and grad_start <= p.grad.data_ptr() < grad_start + end - start
