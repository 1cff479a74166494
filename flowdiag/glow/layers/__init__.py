"""Flow layers. Each flow layer maps data -> latent: `layer(x)` returns `(z, logdet)`, logdet (B,)."""

from flowdiag.glow.layers.actnorm import ActNorm
from flowdiag.glow.layers.coupling import AdditiveCoupling, AffineCoupling, CouplingNet, ZeroConv2d
from flowdiag.glow.layers.invconv import InvConvLU, InvConvPlain
from flowdiag.glow.layers.multiscale import Split, TopPrior, squeeze, unsqueeze

FLOW_LAYER_KINDS: dict[type, str] = {
    ActNorm: "actnorm",
    InvConvLU: "invconv",
    InvConvPlain: "invconv",
    AdditiveCoupling: "coupling",
    AffineCoupling: "coupling",
}

__all__ = [
    "FLOW_LAYER_KINDS",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "CouplingNet",
    "InvConvLU",
    "InvConvPlain",
    "Split",
    "TopPrior",
    "ZeroConv2d",
    "squeeze",
    "unsqueeze",
]
