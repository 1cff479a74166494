"""A y0ast-style Glow on the 8x8 digits, trained by PyTorch Lightning and recorded by flowdiag in one line.

Run time here (one CPU core): 18 s idle, about 28 s with other work running (300 optimizer steps of
2 x 4 images); --tiny about 7 s, most of it importing Lightning (6 steps of a smaller Glow: the test
suite runs this).

    python examples/lightning_glow.py
    python examples/lightning_glow.py --resume runs/lightning-glow/checkpoints/last.ckpt --steps 400
    flowdiag report runs/lightning-glow

The line (needs `pip install 'flowdiag[lightning]'`):

    callbacks=[FlowdiagCallback(init_batches=16, flow="flow", inputs=...)]

It runs Algorithm 1 over the first 16 batches of the train dataloader before the first step, writes
one row per optimizer step (both microbatches of `accumulate_grad_batches=2` in it) into --out/run.h5
(without out_dir: the logger's log dir), stops the fit at the first non-finite layer, and logs
flowdiag/max_abs & co. through `self.log`. `ckpt_path=` continues the same run file from its step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from flowdiag.bench.threaded_glow import ThreadedGlow  # a y0ast/Glow-PyTorch-style Glow: put yours here
from flowdiag.integrations.lightning import FlowdiagCallback
from flowdiag.settings.config import DataConfig
from flowdiag.train.data import load_dataset


def to_flow_input(images: Tensor) -> Tensor:
    """uint8 images -> [-0.5, 0.5) in 256 bins, as y0ast's preprocess; the model adds the U(0, 1/256)."""
    return images.float() / 256.0 - 0.5


class GlowModule(L.LightningModule):
    def __init__(self, flow: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.flow = flow
        self.lr = lr

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        _, bpd = self.flow(to_flow_input(batch[0]))
        loss = bpd.mean()
        self.log("train/bpd", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> Path:
    """Train (or resume); returns the run file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    parser.add_argument("--tiny", action="store_true", help="6 steps of a smaller Glow")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning-glow"))
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint of this script")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    levels, steps, hidden = (2, 2, 8) if args.tiny else (3, 4, 32)
    module = GlowModule(ThreadedGlow(channels=1, levels=levels, steps=steps, hidden=hidden))
    images = load_dataset(DataConfig()).train  # the 8x8 digits, uint8
    loader = DataLoader(TensorDataset(images), batch_size=4, shuffle=True)
    flowdiag = FlowdiagCallback(
        args.out,  # default: the trainer's log dir
        init_batches=16,
        flow="flow",  # the LightningModule's attribute that holds the flow
        inputs=lambda batch: to_flow_input(batch[0]),  # what training_step feeds the flow
        loss_is_bpd=True,  # the loss is the bpd: the report's curves
    )
    trainer = L.Trainer(
        max_steps=6 if args.tiny else args.steps,
        accumulate_grad_batches=2,
        callbacks=[
            flowdiag,
            ModelCheckpoint(args.out / "checkpoints", save_last=True, every_n_train_steps=100),
        ],
        logger=CSVLogger(args.out),
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    assert flowdiag.monitor is not None
    state = flowdiag.monitor.state
    onset = f", first non-finite at step {state.onset_step} in {state.onset_layer}" if state.diverged else ""
    print(f"{flowdiag.monitor.status} after {state.step} steps{onset}; report: flowdiag report {args.out}")
    return flowdiag.monitor.run_file


if __name__ == "__main__":
    main()
