"""Tiny float64 flows built with each library, for the adapter, stabilizer and audit tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowdiag.bench import zoo


def images(n: int, channels: int = 1, size: int = 4, seed: int = 0) -> Tensor:
    """Continuous image-like inputs (B, C, H, W) in float64, not centred, so an init has work to do."""
    gen = torch.Generator().manual_seed(seed)
    return 0.3 + 0.5 * torch.rand(n, channels, size, size, generator=gen, dtype=torch.float64)


def _randomize_zero_layers(model: nn.Module, scale: float = 0.1) -> None:
    """Libraries zero-initialize the last conv of each coupling; non-zero makes the log-dets non-trivial."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 0 and torch.count_nonzero(parameter) == 0 and parameter.shape[0] > 1:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=gen, dtype=parameter.dtype))


def normflows_glow(levels: int = 2, steps: int = 2, channels: int = 1, size: int = 4, hidden: int = 8):
    """normflows' multiscale Glow recipe, shrunk, in float64 with non-zero couplings."""
    model = zoo.normflows_glow(levels, steps, channels, size, hidden).double()
    _randomize_zero_layers(model)
    return model


def nflows_glow(channels: int = 1, size: int = 4, steps: int = 2, hidden: int = 8):
    """A one-level nflows Glow: squeeze, then K x [ActNorm, 1x1 conv, affine coupling]."""
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ConvResidualNet
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.conv import OneByOneConvolution
    from nflows.transforms.coupling import AffineCouplingTransform
    from nflows.transforms.normalization import ActNorm
    from nflows.transforms.reshape import SqueezeTransform

    width = channels * 4
    mask = torch.zeros(width)
    mask[width // 2 :] = 1

    def net(c_in: int, c_out: int) -> nn.Module:
        return ConvResidualNet(c_in, c_out, hidden_channels=hidden, num_blocks=1)

    transforms: list[nn.Module] = [SqueezeTransform()]
    for _ in range(steps):
        transforms += [ActNorm(width), OneByOneConvolution(width), AffineCouplingTransform(mask, net)]
    model = Flow(CompositeTransform(transforms), StandardNormal([width, size // 2, size // 2])).double()
    _randomize_zero_layers(model)
    return model


def freia_sequence(channels: int = 1, size: int = 4, steps: int = 2):
    """FrEIA SequenceINN: Haar downsampling, then K x [ActNorm, GLOW coupling, random permutation]."""
    import FrEIA.framework as ff
    import FrEIA.modules as fm

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 3, padding=1))

    inn = ff.SequenceINN(channels, size, size)
    inn.append(fm.HaarDownsampling)
    for _ in range(steps):
        inn.append(fm.ActNorm)
        inn.append(fm.GLOWCouplingBlock, subnet_constructor=subnet)
        inn.append(fm.PermuteRandom)
    return inn.double()


def freia_graph(channels: int = 1, size: int = 4):
    """FrEIA GraphINN with a split: one branch leaves after an ActNorm, the other goes on."""
    import FrEIA.framework as ff
    import FrEIA.modules as fm

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 3, padding=1))

    nodes = [ff.InputNode(channels, size, size, name="input")]
    nodes.append(ff.Node(nodes[-1], fm.HaarDownsampling, {}, name="haar"))
    nodes.append(ff.Node(nodes[-1], fm.ActNorm, {}, name="actnorm0"))
    nodes.append(ff.Node(nodes[-1], fm.GLOWCouplingBlock, {"subnet_constructor": subnet}, name="coupling0"))
    split = ff.Node(nodes[-1], fm.Split, {"section_sizes": [2, 2], "dim": 0}, name="split")
    nodes.append(split)
    nodes.append(ff.Node(split.out0, fm.ActNorm, {}, name="actnorm1"))
    nodes.append(ff.Node(nodes[-1], fm.GLOWCouplingBlock, {"subnet_constructor": subnet}, name="coupling1"))
    concat = ff.Node([nodes[-1].out0, split.out1], fm.Concat, {"dim": 0}, name="concat")
    nodes += [concat, ff.OutputNode(concat, name="output")]
    return ff.GraphINN(nodes).double()


def pyro_flow(channels: int = 4):
    """Two pyro GeneralizedChannelPermute layers (latent -> data order) and their TransformedDistribution."""
    import pyro.distributions as dist
    import pyro.distributions.transforms as T

    transforms = [T.GeneralizedChannelPermute(channels=channels).double() for _ in range(2)]
    with torch.no_grad():
        for t in transforms:
            t.LU.add_(0.2 * torch.randn(t.LU.shape, dtype=t.LU.dtype))
    base = dist.Normal(torch.zeros(channels, 4, 4, dtype=torch.float64), 1.0).to_event(3)
    return nn.ModuleList(transforms), dist.TransformedDistribution(base, transforms)


def zuko_flow(features: int = 3):
    import zuko

    return zuko.flows.MAF(features, transforms=2, hidden_features=[8]).double()


def plain_cnn() -> nn.Module:
    """Not a flow: for the "no recognizable flow layers" error."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())


def normflows_glow_at_risk() -> nn.Module:
    """Three levels on 8x8 images: the last level runs at 1x1, so batch 1 gives one value per channel."""
    return normflows_glow(levels=3, steps=1, size=8)
