"""Cumulative ActNorm init (Algorithm 1): M minibatches equal the standard init on their
concatenation, every ActNorm is normalized on its own input, and the value counts are reported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from flowdiag.glow.model import dequantize
from flowdiag.runtime.errors import UserError
from flowdiag.stabilize.cumulative_init import cumulative_init

from .flows import tiny_glow, tiny_images


def _batches(m: int, batch: int, size: int = 8) -> list[Tensor]:
    x = dequantize(tiny_images(m * batch, size=size, seed=3), 8).double()
    return list(x.split(batch))


def _actnorm_params(model) -> dict[str, Tensor]:
    return {name: torch.cat([n.log_scale.flatten(), n.tau.flatten()]) for name, n in model.actnorms()}


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize(("m", "batch"), [(4, 2), (16, 1), (3, 5)])
def test_m_minibatches_equal_standard_init_on_concatenation(coupling: str, m: int, batch: int) -> None:
    cumulative = tiny_glow(coupling, init=False, image_size=8, n_levels=3)
    standard = copy.deepcopy(cumulative)
    batches = _batches(m, batch)
    cumulative_init(cumulative, batches)
    standard(torch.cat(batches))  # every uninitialized ActNorm initializes itself: standard Glow init
    got, want = _actnorm_params(cumulative), _actnorm_params(standard)
    assert (
        got.keys() == want.keys() and len(got) == 3 * 2 * 3
    )  # L=3, K=2, 3 ActNorms per step, incl. the coupling nets
    for name in got:
        assert torch.allclose(got[name], want[name], rtol=1e-9, atol=1e-9), name


def test_m_equals_one_is_standard_init() -> None:
    cumulative = tiny_glow(init=False, image_size=8, n_levels=3)
    standard = copy.deepcopy(cumulative)
    (batch,) = _batches(1, 4)
    cumulative_init(cumulative, [batch])
    standard(batch)
    # Equal to rounding: once its ActNorms are initialized a coupling net runs them folded into its
    # convs, while the self-initializing forward runs them unfolded; the sums differ in the last bits.
    for (name, a), (_, b) in zip(cumulative.actnorms(), standard.actnorms(), strict=True):
        assert torch.allclose(a.log_scale, b.log_scale, rtol=1e-12, atol=1e-12), name
        assert torch.allclose(a.tau, b.tau, rtol=1e-12, atol=1e-12), name


def test_every_actnorm_output_is_normalized_on_the_init_data() -> None:
    # Hooked ActNorms are called, not folded into their convs: the hooks see each one's own output.
    eps = 1e-2  # large, so var / (var + eps) is far from 1 and a wrong eps would show
    model = tiny_glow(init=False, image_size=8, n_levels=3, actnorm_eps=eps)
    batches = _batches(6, 2)
    cumulative_init(model, batches)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [
        norm.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out[0])))
        for name, norm in model.actnorms()
    ]
    with torch.no_grad():
        model(torch.cat(batches))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(model.actnorms())
    for name, (x, z) in seen.items():
        var_in = x.var(dim=(0, 2, 3), unbiased=False)
        assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros_like(var_in), atol=1e-9), name
        expected = var_in / (var_in + eps)
        assert torch.allclose(z.var(dim=(0, 2, 3), unbiased=False), expected, rtol=1e-8, atol=1e-12), name


def test_reports_how_many_values_each_actnorm_saw_and_what_it_got() -> None:
    model = tiny_glow(init=False, image_size=8, n_levels=3)
    m, batch = 5, 2
    batches = _batches(m, batch)
    stats = cumulative_init(model, batches)
    by_name = {s.name: s for s in stats}
    assert list(by_name) == [name for name, _ in model.actnorms()]
    # level 0 runs at 4x4, level 1 at 2x2, level 2 at 1x1 (coupling nets at the same size)
    for level, pixels in enumerate([16, 4, 1]):
        for name, stat in by_name.items():
            if name.startswith(f"levels.{level}."):
                assert stat.n_values == m * batch * pixels and stat.pixels == pixels, name
    inputs: dict[str, Tensor] = {}
    hooks = [
        norm.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
        for name, norm in model.actnorms()
    ]
    with torch.no_grad():
        model(torch.cat(batches))
    for hook in hooks:
        hook.remove()
    for name, norm in model.actnorms():
        stat, log_scale = by_name[name], norm.log_scale.detach()
        assert stat.log_scale_min == pytest.approx(float(log_scale.min()), rel=1e-9, abs=1e-12), name
        assert stat.log_scale_max == pytest.approx(float(log_scale.max()), rel=1e-9, abs=1e-12), name
        smallest = float(inputs[name].var(dim=(0, 2, 3), unbiased=False).min())
        assert stat.min_input_var == pytest.approx(smallest, rel=1e-6, abs=1e-12), name


def test_single_value_per_channel_gives_the_eps_scale() -> None:
    """Batch 1 at 1x1 spatial size: var = 0, so sigma = 1/sqrt(eps) -- the paper's failure mode."""
    model = tiny_glow(init=False, image_size=8, n_levels=3, actnorm_eps=1e-6)
    stats = cumulative_init(model, _batches(1, 1))
    top = next(s for s in stats if s.name == "levels.2.steps.0.actnorm")
    assert top.n_values == 1 and top.min_input_var == 0.0
    assert top.log_scale_max == pytest.approx(-0.5 * torch.log(torch.tensor(1e-6)).item())


def test_needs_a_minibatch() -> None:
    with pytest.raises(UserError, match="at least one minibatch"):
        cumulative_init(tiny_glow(init=False), [])
