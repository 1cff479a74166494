"""Reference flows built with other libraries, as their users build them: for `flowdiag bench` and
the tests. Each library is imported inside its builder (they are optional extras)."""

from __future__ import annotations

from torch import nn


def normflows_glow(
    levels: int = 3, steps: int = 2, channels: int = 1, size: int = 8, hidden: int = 32
) -> nn.Module:
    """normflows' multiscale Glow recipe (its README's `MultiscaleFlow` of `GlowBlock`s), float32."""
    import normflows as nf

    q0, merges, flows = [], [], []
    for i in range(levels):
        width = channels * 2 ** (levels + 1 - i)
        level = [nf.flows.GlowBlock(width, hidden, split_mode="channel", scale=True) for _ in range(steps)]
        flows.append([*level, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            factor = 2 ** (levels - i)
            latent = (channels * factor, size // factor, size // factor)
        else:
            latent = (channels * 2 ** (levels + 1), size // 2**levels, size // 2**levels)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
