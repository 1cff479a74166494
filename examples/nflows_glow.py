"""An nflows Glow (one level) on the 8x8 digits, recorded by flowdiag.Monitor.

python examples/nflows_glow.py [--batch-size 16] [--init-batches 8]

Run time here (2 CPU cores): about 6 s (one thread).
"""

from __future__ import annotations

import argparse

import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.nn.nets import ConvResidualNet
from nflows.transforms.base import CompositeTransform
from nflows.transforms.conv import OneByOneConvolution
from nflows.transforms.coupling import AffineCouplingTransform
from nflows.transforms.normalization import ActNorm
from nflows.transforms.reshape import SqueezeTransform

import flowdiag
from flowdiag.glow.model import dequantize
from flowdiag.runtime.environment import configure_threads
from flowdiag.settings.config import DataConfig
from flowdiag.train.data import load_dataset


def build_model(steps: int = 4, hidden: int = 32) -> Flow:
    """Squeeze 1x8x8 to 4x4x4, then K x [ActNorm, 1x1 conv, affine coupling]."""
    width = 4
    mask = torch.zeros(width)
    mask[width // 2 :] = 1
    transforms: list[torch.nn.Module] = [SqueezeTransform()]
    for _ in range(steps):
        transforms += [
            ActNorm(width),
            OneByOneConvolution(width),
            AffineCouplingTransform(
                mask, lambda c_in, c_out: ConvResidualNet(c_in, c_out, hidden, num_blocks=1)
            ),
        ]
    return Flow(CompositeTransform(transforms), StandardNormal([width, 4, 4]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--init-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    configure_threads()  # one CPU thread unless OMP_NUM_THREADS says: more only spin on a model this small

    images = load_dataset(DataConfig()).train
    model = build_model()
    batches = [dequantize(b) for b in images[torch.randperm(len(images))].split(args.batch_size)]
    flowdiag.cumulative_init(model, batches[: args.init_batches])  # Algorithm 1 on nflows' own ActNorms
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with flowdiag.Monitor(model, "runs/nflows-glow") as monitor:
        for step in range(args.steps):
            x = batches[step % len(batches)]
            optimizer.zero_grad()
            loss = -model.log_prob(x).mean()
            loss.backward()
            if monitor.step(loss) is not None:
                break
            optimizer.step()
    print("layers watched:", *zip(monitor.layer_names, monitor.layer_kinds, strict=True), sep="\n  ")


if __name__ == "__main__":
    main()
