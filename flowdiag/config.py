"""Configs are data: one dataclass per concern, all of it serialisable to JSON.

Every HDF5 file and checkpoint carries `RunConfig.to_json()`, so a run can always be rebuilt from
its own output.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from flowdiag.errors import UserError

Coupling = Literal["additive", "affine"]
AffineScale = Literal["sigmoid", "exp"]
ConvKind = Literal["lu", "plain"]


@dataclass(frozen=True)
class ModelConfig:
    """Glow's shape. `in_channels` and `image_size` come from the data set."""

    in_channels: int = 1
    image_size: int = 8
    n_levels: int = 3  # L: squeeze -> K steps -> split, L times (no split on the last level)
    n_steps: int = 4  # K: steps of flow per level
    hidden: int = 32  # width of the coupling networks
    coupling: Coupling = "additive"
    # Official Glow bounds the affine scale as sigmoid(h + 2); the paper writes exp(s).
    affine_scale: AffineScale = "sigmoid"
    conv: ConvKind = "lu"
    learn_top: bool = True
    # eps of the ActNorm init, sigma = 1/sqrt(var + eps). 1e-6 as official Glow: a channel that saw a
    # single value per minibatch (var = 0) gets sigma = 1e3, which is the paper's failure mode.
    actnorm_eps: float = 1e-6


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    root: str | None = None
    n_bits: int = 8
    held_out: float = 0.1  # fraction of the images kept out of training, split by `split_seed`
    split_seed: int = 0
    download: bool = False  # torchvision data sets only; never implicit
    image_size: int | None = None  # resize to this many pixels a side (None: native size)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    init_batches: int = 1  # M of Algorithm 1; M = 1 is the standard Glow init
    lam: float = 0.0  # λ of eq. (2), against the loss in bits per dim
    lr: float = 1e-3
    steps: int = 200  # optimizer steps; `epochs` overrides when set
    epochs: int | None = None
    eval_every: int = 50  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 4  # held-out minibatches per evaluation (0: the whole held-out set)
    early_stop: int = 0  # the paper's early stop: N evaluations in a row without improvement (0: off)
    warmup: int = 0  # linear learning-rate warmup, in steps
    grad_clip: float = 0.0  # max gradient norm (0: off)
    seed: int = 0
    device: str = "auto"
    diagnostics: bool = True
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    flush_every: int = 50  # steps between HDF5 flushes
    stop_on_divergence: bool = True
    sample_temperature: float = 0.7


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return cls(
            model=ModelConfig(**raw.get("model", {})),
            data=DataConfig(**raw.get("data", {})),
            train=TrainConfig(**raw.get("train", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))


def validate_train_config(cfg: TrainConfig) -> None:
    positive = {"--batch-size": cfg.batch_size, "--init-batches": cfg.init_batches}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if cfg.epochs is None and cfg.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {cfg.steps}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise UserError(f"--epochs must be a positive integer, got {cfg.epochs}")
    checks = {
        "--lam": cfg.lam >= 0 and math.isfinite(cfg.lam),
        "--lr": cfg.lr > 0 and math.isfinite(cfg.lr),
        "--warmup": cfg.warmup >= 0,
        "--grad-clip": cfg.grad_clip >= 0,
        "--eval-every": cfg.eval_every >= 0,
        "--eval-batches": cfg.eval_batches >= 0,
        "--early-stop": cfg.early_stop >= 0,
        "--checkpoint-every": cfg.checkpoint_every >= 0,
        "--flush-every": cfg.flush_every >= 1,
    }
    for flag, ok in checks.items():
        if not ok:
            raise UserError(f"{flag} is out of range: {getattr(cfg, flag[2:].replace('-', '_'))}")
