"""A normflows multiscale Glow on the 8x8 digits at batch 1: the first NaN, found and fixed.

    python examples/normflows_glow.py            # M = 1: ActNorm init from one image -> NaN at step 1
    python examples/normflows_glow.py --fix      # cumulative_init over 256 minibatches: trains finite

Run time here (2 CPU cores): about 4 s without --fix, about 7 s with it (one thread each).

The last level runs at 1x1, so at batch 1 its ActNorms' first-batch init sees one value per channel:
normflows takes the unbiased std of one value (NaN) and the whole model is NaN from then on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import normflows as nf
import torch

import flowdiag
from flowdiag.glow.model import dequantize
from flowdiag.runtime.environment import configure_threads
from flowdiag.settings.config import DataConfig
from flowdiag.train.data import load_dataset


def build_model(levels: int = 3, steps: int = 2, hidden: int = 32, seed: int = 0) -> nf.MultiscaleFlow:
    """normflows' own Glow recipe (README), for 1-channel 8x8 images."""
    torch.manual_seed(seed)
    channels, size = 1, 8
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


def minibatches(n: int, batch_size: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """n dequantized minibatches of the embedded digits, in [-0.5, 0.5)."""
    images = load_dataset(DataConfig()).train
    gen = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(images), (n * batch_size,), generator=gen)
    return [dequantize(images[order[i : i + batch_size]]) for i in range(0, n * batch_size, batch_size)]


def train(
    model: nf.MultiscaleFlow,
    steps: int = 200,
    *,
    fix: bool = False,
    out_dir: str | None = None,
    seed: int = 0,
) -> str | None:
    """Train at batch 1; returns the first non-finite layer (None when every step stayed finite)."""
    data = minibatches(steps, seed=seed)
    if fix:
        flowdiag.cumulative_init(model, minibatches(256, seed=seed + 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # What the report groups runs by: M (init minibatches), batch size and seed.
    settings = {"train": {"init_batches": 256 if fix else 1, "batch_size": 1, "seed": seed, "lam": 0.0}}
    with flowdiag.Monitor(model, out_dir or "runs/normflows-glow", config=settings) as monitor:
        for x in data:
            optimizer.zero_grad()
            loss = model.forward_kld(x)
            loss.backward()
            onset = monitor.step(loss)
            if onset is not None:
                return onset
            optimizer.step()
    return None


def main(argv: list[str] | None = None) -> None:
    """python examples/normflows_glow.py [--fix] [--seed N] [--out DIR]"""
    args = sys.argv[1:] if argv is None else argv
    # One CPU thread unless OMP_NUM_THREADS says otherwise: torch's default of one per core only
    # spins on a model this small (measured: --fix took 2 min on a busy 2-core machine, 6 s on one).
    configure_threads()
    fix = "--fix" in args
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
    default = Path("runs") / ("normflows-glow-fixed" if fix else "normflows-glow")
    out_dir = Path(args[args.index("--out") + 1]) if "--out" in args else default
    onset = train(build_model(seed=seed), fix=fix, out_dir=str(out_dir), seed=seed)
    print(f"first non-finite layer: {onset}" if onset else "200 steps, every value finite")
    print(f"report: flowdiag report {out_dir}")


if __name__ == "__main__":
    main()
