"""One suite for every flow layer and for whole small Glows: shape, round trip and the autograd Jacobian
(through the shared invertibility base, tests/invertibility.py), gradients, and state_dict round trips.
Everything in float64."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from flowdiag.glow.layers import ActNorm, AdditiveCoupling, AffineCoupling, InvConvLU, InvConvPlain
from flowdiag.glow.layers.multiscale import Split
from flowdiag.glow.model import Glow, dequantize
from flowdiag.settings.config import ModelConfig

from .flows import perturb_zero_convs, tiny_glow, tiny_images
from .invertibility import assert_logdet_is_jacobian, assert_round_trip


def _initialized_actnorm() -> ActNorm:
    norm = ActNorm(4).double()
    norm(torch.randn(3, 4, 2, 2, dtype=torch.float64) * 2 + 1)  # standard data init
    return norm


def _coupling(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layer = factory().double()
        perturb_zero_convs(layer, scale=0.3)
        layer(torch.randn(3, 4, 2, 2, dtype=torch.float64))  # initializes the net's ActNorms
        return layer

    return build


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "actnorm": _initialized_actnorm,
    "invconv_lu": lambda: InvConvLU(4).double(),
    "invconv_plain": lambda: InvConvPlain(4).double(),
    "additive": _coupling(lambda: AdditiveCoupling(4, hidden=8)),
    "affine_sigmoid": _coupling(lambda: AffineCoupling(4, hidden=8, scale="sigmoid")),
    "affine_exp": _coupling(lambda: AffineCoupling(4, hidden=8, scale="exp")),
}

GLOWS: dict[str, Callable[[], Glow]] = {
    f"glow_{coupling}_{conv}": (lambda coupling=coupling, conv=conv: tiny_glow(coupling, conv))
    for coupling in ("additive", "affine")
    for conv in ("lu", "plain")
}
GLOWS["glow_affine_exp"] = lambda: tiny_glow("affine", "lu", affine_scale="exp")


def _glow_input(n: int) -> Tensor:
    return dequantize(tiny_images(n, seed=1), 8).double()


# --- single layers -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_layer_shape_and_finite(name: str) -> None:
    layer = LAYERS[name]()
    x = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    z, logdet = layer(x)
    assert z.shape == x.shape
    assert logdet is not None and logdet.shape == (5,)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize("name", LAYERS)
def test_layer_round_trip(name: str) -> None:
    layer = LAYERS[name]()
    assert_round_trip(layer, layer.reverse, torch.randn(5, 4, 2, 2, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_logdet_matches_autograd_jacobian(name: str) -> None:
    assert_logdet_is_jacobian(LAYERS[name](), torch.randn(3, 4, 2, 2, dtype=torch.float64))


def _split_as_flow(split: Split) -> tuple[Callable, Callable]:
    """The split as a bijection x -> (kept, z): volume-preserving; its prior is a density, not a log-det."""

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        kept, z, _ = split(x)
        return torch.cat([kept, z], 1), x.new_zeros(x.shape[0])

    def inverse(joined: Tensor) -> Tensor:
        return split.reverse(joined[:, : split.n_keep], joined[:, split.n_keep :])

    return forward, inverse


def test_split_round_trip_and_jacobian() -> None:
    split = Split(4).double()
    perturb_zero_convs(split, scale=0.3)
    forward, inverse = _split_as_flow(split)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(inverse(forward(x)[0]), x, rtol=0, atol=0)
    assert_logdet_is_jacobian(forward, x)
    kept, z, log_p = split(x)
    assert log_p.shape == (3,) and torch.isfinite(log_p).all() and kept.shape == z.shape == (3, 2, 2, 2)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_every_parameter_gets_a_gradient(name: str) -> None:
    layer = LAYERS[name]()
    z, logdet = layer(torch.randn(3, 4, 2, 2, dtype=torch.float64))
    ((z**2).sum() - logdet.sum()).backward()
    for pname, param in layer.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", LAYERS)
def test_layer_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(1)
    layer = LAYERS[name]()
    torch.manual_seed(2)  # a different random init for the copy, so only the state_dict can agree
    fresh = type(layer)(*_ctor_args(layer)).double()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64) * 5  # other data: no re-initialization allowed
    z, logdet = layer(x)
    z2, logdet2 = fresh(x)
    assert torch.equal(z, z2) and torch.equal(logdet, logdet2)


def _ctor_args(layer: nn.Module) -> tuple:
    if isinstance(layer, ActNorm):
        return (layer.channels,)
    if isinstance(layer, InvConvLU | InvConvPlain):
        return (layer.channels,)
    if isinstance(layer, AffineCoupling):
        return (layer.channels, 8, ActNorm, layer.scale)
    return (layer.channels, 8)


# --- whole Glows -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GLOWS)
def test_glow_round_trip_and_shapes(name: str) -> None:
    model = GLOWS[name]()
    x = _glow_input(4)
    zs, logdet = model(x)
    assert [tuple(z.shape) for z in zs] == [(4, 2, 2, 2), (4, 8, 1, 1)]
    assert logdet.shape == (4,)
    assert_round_trip(model, model.reverse, x, atol=1e-5)


@pytest.mark.parametrize("name", GLOWS)
def test_glow_logdet_matches_autograd_jacobian(name: str) -> None:
    assert_logdet_is_jacobian(GLOWS[name](), _glow_input(2))


@pytest.mark.parametrize("name", GLOWS)
def test_glow_every_parameter_gets_a_gradient(name: str) -> None:
    model = GLOWS[name]()
    model.log_prob(_glow_input(4)).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", GLOWS)
def test_glow_state_dict_round_trip_keeps_log_prob(name: str) -> None:
    model = GLOWS[name]()
    fresh = Glow(model.config).double()  # uninitialized, other random weights
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    other = _glow_input(3) * 0.1  # data that would give other ActNorm parameters on re-init
    assert all(norm.is_initialized for _, norm in fresh.actnorms())
    assert torch.equal(model.log_prob(other), fresh.log_prob(other))


@pytest.mark.parametrize("name", GLOWS)
def test_glow_sample_is_finite_and_inverts(name: str) -> None:
    model = GLOWS[name]()
    x = model.sample(3, temperature=0.5)
    assert x.shape == (3, 1, 4, 4) and torch.isfinite(x).all()
    zs, _ = model(x)
    assert torch.allclose(model.reverse(zs), x, atol=1e-5)


def test_glow_lists_flow_layers_in_forward_order() -> None:
    model = tiny_glow()
    names = [name for name, _ in model.flow_layers()]
    assert names[:3] == ["levels.0.steps.0.actnorm", "levels.0.steps.0.invconv", "levels.0.steps.0.coupling"]
    assert len(names) == 3 * 2 * 2
    assert not any(".net." in name for name in names)


@pytest.mark.parametrize(("formula", "expected"), [("paper", 1e3), ("glow", 1e6)])
def test_actnorm_formula_on_one_value_per_channel(formula: str, expected: float) -> None:
    """One value per channel: var = 0. The paper's 1/sqrt(var + eps) gives 1e3, official Glow's
    1/(sqrt(var) + eps) gives 1e6 (eps = 1e-6); on spread data the two agree to eps."""
    norm = ActNorm(3, eps=1e-6, formula=formula).double()
    norm(torch.randn(1, 3, 1, 1, dtype=torch.float64))
    assert torch.allclose(norm.log_scale.exp().flatten(), torch.full((3,), expected, dtype=torch.float64))
    spread = ActNorm(3, eps=1e-6, formula=formula).double()
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    z, _ = spread(x)
    assert torch.allclose(z.var(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)


def test_glow_builds_its_actnorms_with_the_configured_formula() -> None:
    model = Glow(ModelConfig(actnorm_init="glow", actnorm_eps=1e-5))
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert norms and all(n.formula == "glow" and n.eps == 1e-5 for n in norms)


def test_folded_coupling_net_is_the_unfolded_one() -> None:
    """Each ActNorm folded into the conv before it (and the zero conv's scale into its weights) is the
    same function, to rounding, and gives the same gradients."""
    glow = tiny_glow("affine")
    with torch.no_grad():
        for module in glow.modules():
            if isinstance(module, ActNorm):  # away from identity, so a wrong fold would show
                module.log_scale.normal_(0.0, 0.3)
                module.tau.normal_(0.0, 0.3)
    net = glow.levels[0].steps[0].coupling.net
    x = torch.randn(3, net.layers[0].in_channels, 4, 4, dtype=torch.float64, requires_grad=True)
    folded, unfolded = net(x), net.run(x)
    assert torch.allclose(folded, unfolded, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), [x, *net.parameters()]) for out in (folded, unfolded)]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
