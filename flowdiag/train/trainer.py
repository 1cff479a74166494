"""The Glow trainer: config -> (model, Monitor) -> HDF5 file, checkpoint, samples, replay bundle.

One step: dequantize -> bits/dim -> + λ·penalty -> backward -> gradient norm -> Monitor.step (one host
copy of the step's row: loss, layer maxima, log-dets) -> divergence check -> optimizer step. The check
comes before the update, so at the onset the weights in memory are still those that produced it:
that is what the replay bundle saves. The Monitor is the same recorder users attach to their own
flows; here it runs with the flowdiag adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flowdiag.glow.model import Glow, bpd_from_log_prob, dequantize, validate_model_config
from flowdiag.record.inverse_check import SAMPLES, check_inverse
from flowdiag.record.monitor import Monitor
from flowdiag.record.run_state import RunState
from flowdiag.runtime import distributed
from flowdiag.runtime.environment import configure_threads, resolve_device, stop_on_signals
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CHECKPOINT_FILE, REPLAY_FILE, RUN_FILE, SAMPLES_FILE
from flowdiag.runtime.version import __version__
from flowdiag.settings.config import RunConfig, TrainConfig, validate_config
from flowdiag.stabilize.cumulative_init import cumulative_init
from flowdiag.train.batches import BatchStream
from flowdiag.train.checkpoint import load_payload, save_atomically
from flowdiag.train.data import ImageData, load_dataset
from flowdiag.train.flat import FlatParameters
from flowdiag.train.image_grid import save_grid
from flowdiag.train.objective import training_loss
from flowdiag.train.precision import autocast, check_supported, grad_scaler
from flowdiag.train.progress import ProgressSink
from flowdiag.train.radam import RAdam


@dataclass(frozen=True)
class RunResult:
    status: str
    out_dir: Path
    steps: int
    final_bpd: float
    best_eval_bpd: float
    nan_onset_step: int
    nan_onset_layer: str
    step2_peak: float  # max |output| over all flow layers at step 2 (after one update), Fig. 5
    early_peak: float  # the same over steps 1 and 2: a run that overflowed at step 1 has no step 2
    steps_per_second: float

    @property
    def h5_path(self) -> Path:
        return self.out_dir / RUN_FILE


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.epochs is not None:
        return cfg.epochs * -(-n_train // cfg.batch_size)
    return cfg.steps


class Trainer:
    """Holds one run's state; `run()` trains to the end and returns a RunResult."""

    def __init__(
        self,
        config: RunConfig,
        out_dir: Path,
        *,
        resume: bool = False,
        data: ImageData | None = None,
        progress: ProgressSink | None = None,
        instrument: Callable[[Glow], None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        checkpoint = self._load_checkpoint() if resume else None
        if checkpoint is not None:
            stored = RunConfig.from_json(checkpoint["config"])
            # A resumed run keeps its own settings; only the budget may grow.
            config = replace(
                stored, train=replace(stored.train, steps=config.train.steps, epochs=config.train.epochs)
            )
        validate_config(config)
        configure_threads(config.train.threads)
        self.ranks = distributed.from_environment()
        self.device = distributed.device_for(self.ranks, resolve_device(config.train.device))
        distributed.start(self.ranks, self.device, config.train.dist_timeout)
        self.data = data if data is not None else load_dataset(config.data)
        model_cfg = replace(config.model, in_channels=self.data.channels, image_size=self.data.image_size)
        validate_model_config(model_cfg)
        self.config = replace(config, model=model_cfg)
        self.total = total_steps(self.config.train, len(self.data.train))
        torch.manual_seed(self.config.train.seed)
        self.model = Glow(self.config.model).to(self.device)  # the same weights on every rank
        if self.ranks.enabled:  # and each rank its own dequantization noise
            torch.manual_seed(self.config.train.seed * 1009 + 1 + self.ranks.rank)
        # One flat tensor for the optimizer, the gradient norm and zero_grad (train/flat.py); under
        # DDP the parameters stay as they are, for its gradient buckets.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.flat = None if self.ranks.enabled else FlatParameters(trainable)
        self._optimized = [self.flat.flat] if self.flat is not None else trainable
        self.optimizer = RAdam(self._optimized, lr=self.config.train.lr, betas=(0.9, 0.999), eps=1e-8)
        # One seeded stream of global batches (batch size x ranks); each rank takes its own slice, so
        # ranks draw disjoint minibatches and a checkpoint of one stream resumes them all.
        batch, world = self.config.train.batch_size, self.ranks.world
        self.stream = BatchStream(len(self.data.train), batch * world, self.config.train.seed)
        self._slice = slice(self.ranks.rank * batch, (self.ranks.rank + 1) * batch)
        if instrument is not None:  # before the Monitor, so its hooks see what instrument changes
            instrument(self.model)
        check_supported(self.device, self.config.train.precision)
        self.scaler = grad_scaler(self.device, self.config.train.precision)
        # torch compiles at the first step, after the Monitor below attached its hooks: dynamo traces
        # them into the graph, so every layer is still recorded.
        self._log_prob = torch.compile(self.model.log_prob) if self.config.train.compile else None
        state = None  # `open` wraps the model in DDP when this is one rank of several
        if checkpoint is not None:
            self._restore(checkpoint)
            state = _run_state(checkpoint)
        # The Monitor refuses an existing run file unless resuming: nothing is written before that check.
        self.monitor = self._monitor(state)
        self.state = self.monitor.state
        self.progress = progress or ProgressSink()

    def _monitor(self, state: RunState | None) -> Monitor:
        monitor = Monitor(
            self.model,
            self.out_dir,
            adapter="flowdiag",
            config=self.config,
            diagnostics=self.config.train.diagnostics,
            total_steps=self.total,
            flush_every=self.config.train.flush_every,
            flush_seconds=self.config.train.flush_seconds,
            state=state,
            ranks=self.ranks,
        )
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"cannot create output folder {self.out_dir} ({error.strerror}): choose another --out"
            ) from None
        return monitor

    # --- set-up ----------------------------------------------------------------------------------

    def _load_checkpoint(self) -> dict[str, Any]:
        if not (self.out_dir / CHECKPOINT_FILE).exists():
            raise UserError(f"--resume: no checkpoint in {self.out_dir}; start it without --resume")
        return load_payload(self.out_dir / CHECKPOINT_FILE, "checkpoint")

    def _next_batch(self) -> Tensor:
        indices = self.stream.next_indices()[self._slice]
        return self.data.train[indices].to(self.device, non_blocking=True)

    def _initialize(self) -> None:
        """Algorithm 1 over the first M minibatches of the training stream."""
        n_bits = self.config.data.n_bits
        batches = [dequantize(self._next_batch(), n_bits) for _ in range(self.config.train.init_batches)]
        with self.monitor.paused():
            stats = cumulative_init(self.model, batches, adapter="flowdiag", pool=distributed.pool)
        self.monitor.record_init(stats)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.stream.load_state_dict(checkpoint["stream"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        ranks_rng = checkpoint.get("rng_cpu_ranks")
        torch.set_rng_state(ranks_rng[self.ranks.rank] if ranks_rng else checkpoint["rng_cpu"])
        if checkpoint.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng_cuda"], self.device)

    def _save_checkpoint(self) -> None:
        rngs = distributed.gather(torch.get_rng_state())  # every rank's noise stream, to resume each
        if not self.ranks.is_main:
            return
        save_atomically(
            {
                "flowdiag_version": __version__,
                "config": self.config.to_json(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "stream": self.stream.state_dict(),
                "state": self.state.to_dict(),
                "rng_cpu": rngs[0],
                "rng_cpu_ranks": rngs if self.ranks.enabled else None,
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
            self.out_dir / CHECKPOINT_FILE,
        )

    # --- one step --------------------------------------------------------------------------------

    def _learning_rate(self, step: int) -> float:
        warmup = self.config.train.warmup
        return self.config.train.lr * (min(1.0, step / warmup) if warmup else 1.0)

    def _save_replay(self, images: Tensor, rng_cpu: Tensor, rng_cuda: Tensor | None, layer: str) -> None:
        last = self.monitor.last
        save_atomically(
            {
                "flowdiag_version": __version__,
                "config": self.config.to_json(),
                "step": last.step,
                "device": str(self.device),
                "images": images.cpu(),
                "rng_cpu": rng_cpu,
                "rng_cuda": rng_cuda,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr": last.lr,
                "recorded": {"loss": last.loss, "bpd": last.bpd, "penalty": last.penalty},
                "onset_layer": layer,
            },
            self.out_dir / REPLAY_FILE,
        )

    def one_step(self) -> str | None:
        """One training step, recorded; returns the onset layer (None while all is finite).

        At an onset the update is skipped: the weights stay those that produced it.
        """
        lr = self._learning_rate(self.state.step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        images = self._next_batch()
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        cfg = self.config
        with autocast(self.device, cfg.train.precision):
            loss, bpd, penalty = training_loss(
                self.model, images, cfg.data.n_bits, cfg.train.lam, self._log_prob
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # the clipping and the record see true gradients
        else:
            loss.backward()
        max_norm = self.config.train.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._optimized, max_norm, foreach=True)
        onset = self.monitor.step(
            loss, bpd=bpd, penalty=penalty, grad_norm=grad_norm, lr=lr, loss_scaled=self.scaler is not None
        )
        if onset is None and self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped by the scaler itself when the gradient overflowed
            self.scaler.update()
        elif onset is None:
            self.optimizer.step()
        elif self.state.onset_step == self.state.step and self.ranks.is_main:  # what reproduces it
            self._save_replay(images, rng_cpu, rng_cuda, onset)
        return onset

    # --- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out bpd with fixed dequantization noise, so evaluations compare across steps."""
        held_out = self.data.held_out
        if len(held_out) == 0:
            return math.nan
        batch = max(self.config.train.batch_size, 64)
        chunks = held_out.split(batch)
        if self.config.train.eval_batches:
            chunks = chunks[: self.config.train.eval_batches]
        noise_gen = torch.Generator().manual_seed(12345)
        count = 0
        self.model.eval()
        with self.monitor.paused():
            bpds = []
            for chunk in chunks:
                noise = torch.rand(chunk.shape, generator=noise_gen).to(self.device)
                x = dequantize(chunk.to(self.device), self.config.data.n_bits, noise)
                bpds.append(
                    bpd_from_log_prob(
                        self.model.log_prob(x), self.model.n_dims, self.config.data.n_bits
                    ).sum()
                )
                count += len(chunk)
            total = float(torch.stack(bpds).sum())
        self.model.train()
        return total / count

    def _evaluate_and_check_early_stop(self) -> bool:
        """Evaluate on held-out data (once per step); True when the paper's early stop ends the run."""
        if self.state.last_eval_step == self.state.step:
            return False
        bpd = self.evaluate()
        if math.isnan(bpd):
            return False
        self.monitor.record_eval(bpd)
        self.progress.evaluated(self.state.step, bpd)
        if self.ranks.is_main:  # what it measures is the same on every rank; only rank 0 records
            self.run_inverse_check()
        patience = self.config.train.early_stop
        return bool(patience) and self.state.evals_without_improvement >= patience

    def run_inverse_check(self) -> None:
        """Sampling, reconstruction and conditioning at this evaluation (flowdiag.record.inverse_check)."""
        held_out = self.data.held_out if len(self.data.held_out) else self.data.train
        noise = torch.rand(held_out[:SAMPLES].shape, generator=torch.Generator().manual_seed(54321))
        batch = dequantize(held_out[:SAMPLES].to(self.device), self.config.data.n_bits, noise.to(self.device))
        self.model.eval()
        with self.monitor.paused():
            check = check_inverse(
                self.model, batch, self.config.train.sample_temperature, self.config.train.seed
            )
        self.model.train()
        self.monitor.record_inverse(check)

    def _save_samples(self) -> None:
        if not self.ranks.is_main:
            return
        # A forked RNG: drawing samples must not shift the noise of a run resumed from here.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.monitor.paused():
            torch.manual_seed(self.config.train.seed)
            samples = self.model.sample(64, self.config.train.sample_temperature)
        if torch.isfinite(samples).all():
            save_grid((samples + 0.5).clamp(0, 1), self.out_dir / SAMPLES_FILE, nrow=8)

    # --- the loop --------------------------------------------------------------------------------

    def open(self) -> None:
        """Create (or reopen) the run file and, on a fresh run, initialize: everything before step 1."""
        self.monitor.writer  # noqa: B018 -- creates the file (phase "init") before the init runs
        if not self.monitor.resumed:
            self.progress.phase("init")
            self._initialize()
        if self.ranks.enabled:  # after the init: DDP starts from rank 0's weights, the same on all
            ddp = distributed.data_parallel(self.model, self.device)
            self._log_prob = torch.compile(ddp) if self.config.train.compile else ddp
        self.progress.phase("train")
        self.model.train()

    def _train(self, stop_request: dict[str, str]) -> None:
        cfg = self.config.train
        while self.state.step < self.total:
            if stop_request:
                self.monitor.end("interrupted")
                return
            onset = self.one_step()
            if onset is not None and cfg.stop_on_divergence:
                return
            self.progress.advance(self.state.step, self.state.last_bpd, self._rate())
            due = cfg.eval_every and self.state.step % cfg.eval_every == 0
            if due and self._evaluate_and_check_early_stop():
                break
            if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                self.monitor.flush()
                self._save_checkpoint()
        if not self.state.diverged:  # a budget spent or an early stop: the run's last word
            self._evaluate_and_check_early_stop()
            self._save_samples()

    def _rate(self) -> float:
        return (self.state.step - self._first_step) / max(time.perf_counter() - self._started, 1e-9)

    def run(self) -> RunResult:
        cfg = self.config.train
        self._started, self._first_step = time.perf_counter(), self.state.step
        self.progress.start(self.total, f"M={cfg.init_batches} λ={cfg.lam:g} b={cfg.batch_size}")
        try:
            with stop_on_signals() as stop_request, self.monitor as monitor:
                self.open()
                self._first_step = self.state.step
                self._train(stop_request)
                self._save_checkpoint()
        except (RuntimeError, dist.DistBackendError) as error:
            if not self.ranks.enabled:
                raise
            # The Monitor has written `failed`: say why in one line, not a traceback per rank.
            reason = str(error).strip().splitlines()[0][:160]
            raise UserError(
                f"rank {self.ranks.rank}: another rank stopped answering within --dist-timeout "
                f"{cfg.dist_timeout:g} s ({reason}); the run ended as failed"
            ) from None
        finally:
            self.progress.stop()
            distributed.stop()
        return RunResult(
            status=monitor.close(),  # closed by the block already: this returns the status it wrote
            out_dir=self.out_dir,
            steps=self.state.step,
            final_bpd=self.state.last_bpd,
            best_eval_bpd=self.state.best_eval,
            nan_onset_step=self.state.onset_step,
            nan_onset_layer=self.state.onset_layer,
            step2_peak=self.state.step2_peak,
            early_peak=self.state.early_peak,
            steps_per_second=self._rate(),
        )


def _run_state(checkpoint: dict[str, Any]) -> RunState:
    """The run state a checkpoint holds (flowdiag 0.1 checkpoints kept only step and evaluations)."""
    if "state" in checkpoint:
        return RunState.from_dict(checkpoint["state"])
    return RunState(
        step=checkpoint["step"],
        best_eval=checkpoint["best_eval"],
        evals_without_improvement=checkpoint["evals_without_improvement"],
    )


def train(config: RunConfig, out_dir: Path, **kwargs: Any) -> RunResult:
    """Train one run into `out_dir` (see Trainer for the keyword arguments)."""
    return Trainer(config, out_dir, **kwargs).run()
