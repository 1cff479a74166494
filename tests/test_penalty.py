"""The log-det penalty of eq. (2) against each conv's actual W, and where its gradient goes."""

from __future__ import annotations

import pytest
import torch

from flowdiag.stabilize.penalty import conv_logdets, logdet_penalty

from .flows import tiny_glow


def _drift_convs(model) -> None:
    with torch.no_grad():
        for _, conv in model.inv_convs():
            if hasattr(conv, "log_abs_u"):
                conv.log_abs_u.add_(torch.randn_like(conv.log_abs_u) * 0.3)
            else:
                conv.w.mul_(1.0 + torch.rand(1, dtype=conv.w.dtype))


@pytest.mark.parametrize("conv", ["lu", "plain"])
def test_penalty_equals_sum_of_squared_spatial_logdets_of_actual_w(conv: str) -> None:
    model = tiny_glow(conv=conv, image_size=8, n_levels=3)
    _drift_convs(model)
    expected = torch.zeros((), dtype=torch.float64)
    sizes = {0: 4 * 4, 1: 2 * 2, 2: 1}
    for name, layer in model.inv_convs():
        level = int(name.split(".")[1])
        log_det = torch.linalg.slogdet(layer.weight().detach().double()).logabsdet
        expected += (sizes[level] * log_det) ** 2
    assert expected > 0
    assert torch.allclose(logdet_penalty(model), expected, rtol=1e-9)
    assert conv_logdets(model).shape == (len(model.inv_convs()),)


def test_penalty_is_zero_for_rotations() -> None:
    model = tiny_glow()
    assert logdet_penalty(model).abs() < 1e-10


def test_penalty_equals_invconv_layer_logdet() -> None:
    """The penalty's h·w·Σlog|u| is the log-det the layer itself returns at its size."""
    model = tiny_glow(image_size=8, n_levels=3)
    _drift_convs(model)
    recorded = {}
    hooks = [
        conv.register_forward_hook(lambda m, i, o, name=name: recorded.__setitem__(name, o[1][0]))
        for name, conv in model.inv_convs()
    ]
    model(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    for hook in hooks:
        hook.remove()
    assert torch.allclose(torch.stack(list(recorded.values())), conv_logdets(model).detach())


@pytest.mark.parametrize(("conv", "trained"), [("lu", "log_abs_u"), ("plain", "invconv.w")])
def test_penalty_gradient_reaches_only_the_log_det_parameters(conv: str, trained: str) -> None:
    model = tiny_glow(conv=conv)
    _drift_convs(model)
    logdet_penalty(model).backward()
    touched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert touched, "the penalty must have a gradient"
    assert all(n.endswith(trained) for n in touched), touched
    assert len(touched) == len(model.inv_convs())
