"""The Glow trainer: a set-up run (flowdiag.train.setup) -> HDF5 run file, checkpoints, samples, replay.

One step: dequantize -> bits/dim -> + λ·penalty -> backward -> gradient norm -> Monitor.step (one host
copy of the step's row: loss, layer maxima, log-dets) -> divergence check -> optimizer step. The check
comes before the update, so at the onset the weights in memory are still those that produced it:
that is what the replay bundle saves. The Monitor is the same recorder users attach to their own
flows; here it runs with the flowdiag adapter.

The checkpoint follows the run file: a checkpoint is written only after the rows up to its step
reached the file, and one exists from before step 1 on, so a run stopped by anything (a signal, a
full disk, a lost rank) continues with `--resume` from a step its run file holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdiag.glow.model import Glow, dequantize
from flowdiag.record.monitor import Monitor
from flowdiag.record.run_state import RunState
from flowdiag.runtime import distributed
from flowdiag.runtime.environment import stop_on_signals
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CHECKPOINT_FILE, REPLAY_FILE, RUN_FILE, SAMPLES_FILE
from flowdiag.runtime.version import __version__
from flowdiag.settings.config import RunConfig
from flowdiag.stabilize.cumulative_init import cumulative_init
from flowdiag.train.checkpoint import save_atomically
from flowdiag.train.data import ImageData
from flowdiag.train.evaluation import held_out_bpd, inverse_check
from flowdiag.train.image_grid import save_grid
from flowdiag.train.objective import training_loss
from flowdiag.train.precision import autocast
from flowdiag.train.progress import ProgressSink
from flowdiag.train.setup import RunSetup, set_up


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


class Trainer:
    """Trains one run to its end: the run file opened, Algorithm 1, the steps, evaluations,
    checkpoints and samples. What it trains is set up in one pass by `flowdiag.train.setup`."""

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
        self.setup: RunSetup = set_up(config, out_dir, resume=resume, data=data, instrument=instrument)
        self.progress = progress or ProgressSink()
        self.monitor: Monitor | None = None  # attached when the run opens
        self._log_prob = self.setup.log_prob  # DDP's forward replaces it when the run opens

    # What callers (tests, `flowdiag bench`) look at: the set-up's parts.
    @property
    def config(self) -> RunConfig:
        return self.setup.config

    @property
    def out_dir(self) -> Path:
        return self.setup.out_dir

    @property
    def data(self) -> ImageData:
        return self.setup.data

    @property
    def model(self) -> Glow:
        return self.setup.model

    @property
    def device(self) -> torch.device:
        return self.setup.device

    # --- opening: the process group, the run file, Algorithm 1 ----------------------------------

    def _start(self) -> None:
        """Join the other ranks, make the run folder and, for a fresh run, save its first checkpoint
        before any run file exists: from here on, `--resume` always has a start to go back to."""
        run = self.setup
        distributed.start(run.ranks, run.device, run.config.train.dist_timeout)
        try:
            run.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"cannot create output folder {run.out_dir} ({error.strerror}): choose another --out"
            ) from None
        if not run.initialized and run.resumed is None:
            self._save_checkpoint(initialized=False)

    def _attach_monitor(self) -> Monitor:
        """The recorder, which refuses an existing run file unless resuming."""
        run, cfg = self.setup, self.setup.config.train
        self.monitor = Monitor(
            run.model,
            run.out_dir,
            adapter="flowdiag",
            config=run.config,
            diagnostics=cfg.diagnostics,
            total_steps=run.total,
            flush_every=cfg.flush_every,
            flush_seconds=cfg.flush_seconds,
            state=run.resumed,
            ranks=run.ranks,
        )
        self.state = self.monitor.state
        return self.monitor

    def open(self) -> None:
        """Everything before step 1: the run file (made, or reopened at the checkpoint's step) and
        Algorithm 1 where it has not run yet."""
        if self.monitor is None:
            self._start()
            self._attach_monitor()
        run = self.setup
        self.monitor.writer  # noqa: B018 -- creates the file (phase "init") before the init runs
        if not run.initialized:
            self.progress.phase("init")
            self._initialize()
            run.initialized = True
        if run.ranks.enabled:  # after the init: DDP starts from rank 0's weights, the same on all
            ddp = distributed.data_parallel(run.model, run.device)
            self._log_prob = torch.compile(ddp) if run.config.train.compile else ddp
        self.progress.phase("train")
        run.model.train()

    def _initialize(self) -> None:
        """Algorithm 1 over the first M minibatches of the training stream."""
        run = self.setup
        n_bits = run.config.data.n_bits
        batches = [dequantize(run.batches.next(), n_bits) for _ in range(run.config.train.init_batches)]
        with self.monitor.paused():
            stats = cumulative_init(run.model, batches, adapter="flowdiag", pool=distributed.pool)
        self.monitor.record_init(stats)

    # --- what is saved ---------------------------------------------------------------------------

    def _save_checkpoint(self, *, initialized: bool = True) -> None:
        """The run file first, then the checkpoint: the file always holds the checkpoint's step.
        `initialized` False: a fresh run's first, from before Algorithm 1, the recorder and its file."""
        run = self.setup
        state = self.monitor.state if initialized else RunState()
        if initialized:
            self.monitor.flush()
        rngs = distributed.gather(torch.get_rng_state())  # every rank's noise stream, to resume each
        if not run.ranks.is_main:
            return
        save_atomically(
            {
                "flowdiag_version": __version__,
                "config": run.config.to_json(),
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                "stream": run.batches.state_dict(),
                "state": state.to_dict(),
                "initialized": initialized,
                "rng_cpu": rngs[0],
                "rng_cpu_ranks": rngs if run.ranks.enabled else None,
                "rng_cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
            },
            run.out_dir / CHECKPOINT_FILE,
        )

    def _save_replay(self, images: Tensor, rng_cpu: Tensor, rng_cuda: Tensor | None, layer: str) -> None:
        """What reproduces the onset step: the weights before it, its minibatch and RNG states."""
        run, last = self.setup, self.monitor.last
        save_atomically(
            {
                "flowdiag_version": __version__,
                "config": run.config.to_json(),
                "step": last.step,
                "device": str(run.device),
                "images": images.cpu(),
                "rng_cpu": rng_cpu,
                "rng_cuda": rng_cuda,
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "lr": last.lr,
                "recorded": {"loss": last.loss, "bpd": last.bpd, "penalty": last.penalty},
                "onset_layer": layer,
            },
            run.out_dir / REPLAY_FILE,
        )

    def _save_samples(self) -> None:
        run = self.setup
        if not run.ranks.is_main:
            return
        # A forked RNG: drawing samples must not shift the noise of a run resumed from here.
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.monitor.paused():
            torch.manual_seed(run.config.train.seed)
            samples = run.model.sample(64, run.config.train.sample_temperature)
        if torch.isfinite(samples).all():
            save_grid((samples + 0.5).clamp(0, 1), run.out_dir / SAMPLES_FILE, nrow=8)

    # --- one step --------------------------------------------------------------------------------

    def _learning_rate(self, step: int) -> float:
        train = self.setup.config.train
        return train.lr * (min(1.0, step / train.warmup) if train.warmup else 1.0)

    def _backward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, bpd, penalty, gradient norm before clipping) of one minibatch, gradients in place."""
        run = self.setup
        if run.flat is not None:
            run.flat.zero_grad()
        else:
            run.optimizer.zero_grad(set_to_none=True)
        with autocast(run.device, run.config.train.precision):
            loss, bpd, penalty = training_loss(
                run.model, images, run.config.data.n_bits, run.config.train.lam, self._log_prob
            )
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)  # the clipping and the record see true gradients
        else:
            loss.backward()
        max_norm = run.config.train.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(run.optimized, max_norm, foreach=True)
        return loss, bpd, penalty, grad_norm

    def one_step(self) -> str | None:
        """One training step, recorded; returns the onset layer (None while all is finite).

        At an onset the update is skipped: the weights stay those that produced it.
        """
        run = self.setup
        lr = self._learning_rate(self.state.step + 1)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
        images = run.batches.next()
        loss, bpd, penalty, grad_norm = self._backward(images)
        onset = self.monitor.step(
            loss, bpd=bpd, penalty=penalty, grad_norm=grad_norm, lr=lr, loss_scaled=run.scaler is not None
        )
        if onset is None and run.scaler is not None:
            run.scaler.step(run.optimizer)  # skipped by the scaler itself when the gradient overflowed
            run.scaler.update()
        elif onset is None:
            run.optimizer.step()
        elif self.state.onset_step == self.state.step and run.ranks.is_main:  # what reproduces it
            self._save_replay(images, rng_cpu, rng_cuda, onset)
        return onset

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Mean held-out bpd with fixed dequantization noise, so evaluations compare across steps."""
        run = self.setup
        with self.monitor.paused():
            return held_out_bpd(
                run.model,
                run.data.held_out,
                run.config.data.n_bits,
                batch_size=max(run.config.train.batch_size, 64),
                max_batches=run.config.train.eval_batches,
            )

    def _evaluate_and_check_early_stop(self) -> bool:
        """Evaluate on held-out data (once per step); True when the paper's early stop ends the run."""
        if self.state.last_eval_step == self.state.step:
            return False
        bpd = self.evaluate()
        if math.isnan(bpd):
            return False
        self.monitor.record_eval(bpd)
        self.progress.evaluated(self.state.step, bpd)
        if self.setup.ranks.is_main:  # what it measures is the same on every rank; only rank 0 records
            self.run_inverse_check()
        patience = self.setup.config.train.early_stop
        return bool(patience) and self.state.evals_without_improvement >= patience

    def run_inverse_check(self) -> None:
        """Sampling, reconstruction and conditioning at this evaluation (flowdiag.record.inverse_check)."""
        with self.monitor.paused():
            check = inverse_check(self.setup.model, self.setup.data, self.setup.config)
        self.monitor.record_inverse(check)

    # --- the loop --------------------------------------------------------------------------------

    def _train(self, stop_request: dict[str, str]) -> bool:
        """Steps until the budget, an early stop, an onset or a signal; True when the run finished
        (budget or early stop), after its last evaluation."""
        cfg = self.setup.config.train
        while self.state.step < self.setup.total:
            if stop_request:
                self.monitor.end("interrupted")
                return False
            onset = self.one_step()
            if onset is not None and cfg.stop_on_divergence:
                return False
            self.progress.advance(self.state.step, self.state.last_bpd, self._rate())
            due = cfg.eval_every and self.state.step % cfg.eval_every == 0
            if due and self._evaluate_and_check_early_stop():
                break
            if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                self._save_checkpoint()
        if self.state.diverged:  # kept going past an onset: no samples of a diverged model
            return False
        self._evaluate_and_check_early_stop()
        return True

    def _rate(self) -> float:
        return (self.state.step - self._first_step) / max(time.perf_counter() - self._started, 1e-9)

    def _open_and_train(self, stop_request: dict[str, str]) -> None:
        self.open()
        self._first_step = self.state.step
        finished = self._train(stop_request)
        self._save_checkpoint()
        if finished:
            self._save_samples()

    def run(self) -> RunResult:
        """Open, train, save: the run to its end; a lost rank or a failed write is one UserError."""
        cfg = self.setup.config.train
        self._started, self._first_step = time.perf_counter(), 0
        self.progress.start(self.setup.total, f"M={cfg.init_batches} λ={cfg.lam:g} b={cfg.batch_size}")
        try:
            with stop_on_signals() as stop_request:
                self._start()
                with self._attach_monitor() as monitor:
                    self._open_and_train(stop_request)
        except RuntimeError as error:
            if not (self.setup.ranks.enabled and distributed.lost_peer(error)):
                raise
            # The Monitor has written `failed`: say why in one line, not a traceback per rank.
            raise UserError(
                f"rank {self.setup.ranks.rank}: another rank stopped answering within --dist-timeout "
                f"{cfg.dist_timeout:g} s ({distributed.first_line(error)}); the run ended as failed"
            ) from None
        finally:
            self.progress.stop()
            distributed.stop()
        return self._result(monitor.close())  # closed by the block: this returns the status it wrote

    def _result(self, status: str) -> RunResult:
        state = self.state
        return RunResult(
            status=status,
            out_dir=self.setup.out_dir,
            steps=state.step,
            final_bpd=state.last_bpd,
            best_eval_bpd=state.best_eval,
            nan_onset_step=state.onset_step,
            nan_onset_layer=state.onset_layer,
            step2_peak=state.step2_peak,
            early_peak=state.early_peak,
            steps_per_second=self._rate(),
        )


def train(config: RunConfig, out_dir: Path, **kwargs: Any) -> RunResult:
    """Train one run into `out_dir` (see Trainer for the keyword arguments)."""
    return Trainer(config, out_dir, **kwargs).run()
