"""Setting a run up: one pass from its settings to everything its first step needs.

`set_up` reads the settings once, in the order the parts depend on each other: a resumed run's
checkpoint fixes its settings; the data fix the model's shape; the model is built on the host under
the run's seed and goes where the run computes (threads and device, `flowdiag.runtime.environment`);
the minibatches, the optimizer and the precision follow it there. Nothing here writes: the run file
and a data-parallel run's process group belong to the run's opening (`Trainer.open`), so a set-up
that fails leaves the run folder as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdiag.glow.model import Glow
from flowdiag.record.run_state import RunState
from flowdiag.runtime import distributed
from flowdiag.runtime.distributed import Ranks
from flowdiag.runtime.environment import place
from flowdiag.runtime.files import CHECKPOINT_FILE, RUN_FILE, check_run_folder
from flowdiag.settings.config import RunConfig, TrainConfig
from flowdiag.train.checkpoint import load_payload
from flowdiag.train.data import Batches, ImageData, load_dataset
from flowdiag.train.flat import FlatParameters
from flowdiag.train.precision import check_supported, grad_scaler
from flowdiag.train.radam import RAdam


@dataclass
class RunSetup:
    """Everything a run's first step needs, made by `set_up`."""

    config: RunConfig  # as the run uses it: the model's shape from the data, a resumed run's settings
    out_dir: Path
    total: int  # steps in the budget
    data: ImageData
    model: Glow
    ranks: Ranks
    device: torch.device
    batches: Batches
    optimizer: RAdam
    flat: FlatParameters | None  # one flat tensor in one process; the parameters as they are under DDP
    optimized: list[Tensor]  # what the optimizer steps and the gradient clipping sees
    scaler: torch.amp.GradScaler | None  # fp16 only
    # --compile: torch compiles at the first step, after the Monitor attached its hooks, and dynamo
    # traces them into the graph, so every layer is still recorded. None: the model's own.
    log_prob: Callable[[Tensor], Tensor] | None
    resumed: RunState | None = None  # the run state to continue the run file from; None: a new file
    initialized: bool = False  # Algorithm 1 has run (a checkpoint from before it resumes into it)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """The budget: `--epochs` over the training images when set, else `--steps`."""
    if cfg.epochs is not None:
        return cfg.epochs * -(-n_train // cfg.batch_size)
    return cfg.steps


def set_up(
    config: RunConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    data: ImageData | None = None,
    instrument: Callable[[Glow], None] | None = None,
) -> RunSetup:
    """The run `config` describes, ready for its first step.

    `resume`: continue from `out_dir`'s checkpoint; where the run stopped before it saved anything
    (no checkpoint, no run file), it starts afresh. `data`: images already loaded (an ablation's
    workers share them); `instrument`: called with the model before anything records it (tests
    inject faults with it).
    """
    out_dir = Path(out_dir)
    check_run_folder(out_dir, resume)
    saved = resume and (out_dir / CHECKPOINT_FILE).exists()
    checkpoint = load_payload(out_dir / CHECKPOINT_FILE, "checkpoint") if saved else None
    config = _own_settings(config, checkpoint)
    ranks = distributed.from_environment()
    data = data if data is not None else load_dataset(config.data)
    config = replace(
        config, model=replace(config.model, in_channels=data.channels, image_size=data.image_size)
    )
    train = config.train
    torch.manual_seed(train.seed)
    model = Glow(config.model)  # the same weights on every rank
    device = place(train.device, train.threads, ranks)
    model.to(device)
    if ranks.enabled:  # and each rank its own dequantization noise
        torch.manual_seed(train.seed * 1009 + 1 + ranks.rank)
    if instrument is not None:
        instrument(model)
    batches = Batches(data.train, train.batch_size, train.seed, device, ranks)
    total = total_steps(train, len(data.train))
    flat, optimized = _flat_parameters(model, ranks)
    optimizer = RAdam(optimized, lr=train.lr, betas=(0.9, 0.999), eps=1e-8)
    check_supported(device, train.precision)
    scaler = grad_scaler(device, train.precision)
    log_prob = torch.compile(model.log_prob) if train.compile else None
    run = RunSetup(
        config,
        out_dir,
        total,
        data,
        model,
        ranks,
        device,
        batches,
        optimizer,
        flat,
        optimized,
        scaler,
        log_prob,
    )
    if checkpoint is not None:
        _restore(run, checkpoint)
    return run


def _own_settings(config: RunConfig, checkpoint: dict[str, Any] | None) -> RunConfig:
    """A resumed run keeps its own settings; only the budget may grow."""
    if checkpoint is None:
        return config
    stored = RunConfig.from_json(checkpoint["config"])
    return replace(stored, train=replace(stored.train, steps=config.train.steps, epochs=config.train.epochs))


def _flat_parameters(model: Glow, ranks: Ranks) -> tuple[FlatParameters | None, list[Tensor]]:
    """One flat tensor for the optimizer, the gradient norm and zero_grad (train/flat.py); under DDP
    the parameters stay as they are, for its gradient buckets."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if ranks.enabled:
        return None, trainable
    flat = FlatParameters(trainable)
    return flat, [flat.flat]


def _restore(run: RunSetup, checkpoint: dict[str, Any]) -> None:
    """Weights, optimizer, minibatch stream, loss scale, this rank's RNG and the run state."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.batches.load_state_dict(checkpoint["stream"])
    if run.scaler is not None and checkpoint.get("scaler") is not None:
        run.scaler.load_state_dict(checkpoint["scaler"])
    ranks_rng = checkpoint.get("rng_cpu_ranks")
    torch.set_rng_state(ranks_rng[run.ranks.rank] if ranks_rng else checkpoint["rng_cpu"])
    if checkpoint.get("rng_cuda") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(checkpoint["rng_cuda"], run.device)
    # flowdiag 0.2 checkpoints were all written after the init; one from before it (a fresh run's
    # first) continues a run file only if the run got as far as making one.
    run.initialized = checkpoint.get("initialized", True)
    if run.initialized or (run.out_dir / RUN_FILE).exists():
        run.resumed = _run_state(checkpoint)


def _run_state(checkpoint: dict[str, Any]) -> RunState:
    """The run state a checkpoint holds (flowdiag 0.1 checkpoints kept only step and evaluations)."""
    if "state" in checkpoint:
        return RunState.from_dict(checkpoint["state"])
    return RunState(
        step=checkpoint["step"],
        best_eval=checkpoint["best_eval"],
        evals_without_improvement=checkpoint["evals_without_improvement"],
    )
