"""The Glow trainer: config -> (model, recorder) -> HDF5 file, checkpoint, samples, replay bundle.

One step: dequantize -> bits/dim -> + λ·penalty -> backward -> gradient norm -> one host copy of the
step's row (loss, layer maxima, log-dets) -> divergence check -> optimizer step. The check comes
before the update, so at the onset the weights in memory are still those that produced it: that is
what the replay bundle saves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from flowdiag import __version__
from flowdiag.batches import BatchStream
from flowdiag.checkpoint import CHECKPOINT_NAME, REPLAY_NAME, load_payload, save_atomically
from flowdiag.config import RunConfig, TrainConfig, validate_train_config
from flowdiag.data import ImageData, load_dataset
from flowdiag.environment import resolve_device, stop_on_signals
from flowdiag.errors import UserError
from flowdiag.init import cumulative_actnorm_init
from flowdiag.layers import FLOW_LAYER_KINDS
from flowdiag.model import Glow, bpd_from_log_prob, dequantize, validate_model_config
from flowdiag.objective import training_loss
from flowdiag.recorder import LayerRecorder
from flowdiag.store import RunWriter

RUN_FILE = "run.h5"
SAMPLES_FILE = "samples.png"
_SCALARS = 4  # loss, bpd, penalty, grad_norm lead every packed row


class ProgressSink(Protocol):
    def start(self, total_steps: int, description: str) -> None: ...
    def advance(self, step: int, bpd: float, steps_per_second: float) -> None: ...
    def stop(self) -> None: ...


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
        self.resume = resume
        checkpoint = self._load_checkpoint() if resume else None
        if checkpoint is not None:
            stored = RunConfig.from_json(checkpoint["config"])
            # A resumed run keeps its own settings; only the budget may grow.
            config = replace(
                stored, train=replace(stored.train, steps=config.train.steps, epochs=config.train.epochs)
            )
        validate_train_config(config.train)
        self.device = resolve_device(config.train.device)
        self.data = data if data is not None else load_dataset(config.data)
        model_cfg = replace(config.model, in_channels=self.data.channels, image_size=self.data.image_size)
        validate_model_config(model_cfg)
        self.config = replace(config, model=model_cfg)
        self.total = total_steps(self.config.train, len(self.data.train))
        self._check_out_dir()
        torch.manual_seed(self.config.train.seed)
        self.model = Glow(self.config.model).to(self.device)
        self.optimizer = torch.optim.RAdam(
            self.model.parameters(), lr=self.config.train.lr, betas=(0.9, 0.999), eps=1e-8
        )
        self.stream = BatchStream(len(self.data.train), self.config.train.batch_size, self.config.train.seed)
        if instrument is not None:  # before the recorder, so its hooks see what instrument changes
            instrument(self.model)
        self.recorder = LayerRecorder(self.model) if self.config.train.diagnostics else None
        self.progress = progress
        self.step = 0
        self.best_eval = math.inf
        self.evals_without_improvement = 0
        self.last_bpd = math.nan
        self.step2_peak = math.nan
        self.early_peak = math.nan
        self.onset_step, self.onset_layer = -1, ""
        self._checkpoint = checkpoint

    # --- set-up ----------------------------------------------------------------------------------

    def _load_checkpoint(self) -> dict[str, Any]:
        if not (self.out_dir / CHECKPOINT_NAME).exists():
            raise UserError(f"--resume: no checkpoint in {self.out_dir}; start it without --resume")
        return load_payload(self.out_dir / CHECKPOINT_NAME, "checkpoint")

    def _check_out_dir(self) -> None:
        run_file = self.out_dir / RUN_FILE
        if run_file.exists() and not self.resume:
            raise UserError(
                f"{run_file} already exists: pass --resume to continue it or choose another --out"
            )
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"cannot create output folder {self.out_dir} ({error.strerror}): choose another --out"
            ) from None

    def _open_writer(self) -> RunWriter:
        if self._checkpoint is not None:
            writer = RunWriter.open_existing(
                self.out_dir / RUN_FILE, flush_every=self.config.train.flush_every
            )
            writer.truncate_after(self.step)
            writer.set_status("running")
            return writer
        layers = self.model.flow_layers()
        return RunWriter(
            self.out_dir / RUN_FILE,
            config_json=self.config.to_json(),
            version=__version__,
            layer_names=[name for name, _ in layers],
            layer_kinds=[FLOW_LAYER_KINDS[type(module)] for _, module in layers],
            flush_every=self.config.train.flush_every,
        )

    def _next_batch(self) -> Tensor:
        return self.data.train[self.stream.next_indices()].to(self.device, non_blocking=True)

    def _initialize(self, writer: RunWriter) -> None:
        """Algorithm 1 over the first M minibatches of the training stream."""
        n_bits = self.config.data.n_bits
        batches = [dequantize(self._next_batch(), n_bits) for _ in range(self.config.train.init_batches)]
        with self.recorder.paused() if self.recorder else nullcontext():
            stats = cumulative_actnorm_init(self.model, batches)
        writer.write_init(
            [s.name for s in stats],
            np.array([s.log_scale_min for s in stats]),
            np.array([s.log_scale_max for s in stats]),
            np.array([s.min_input_var for s in stats]),
            np.array([s.n_values for s in stats], dtype=np.int64),
        )

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.stream.load_state_dict(checkpoint["stream"])
        self.step = checkpoint["step"]
        self.best_eval = checkpoint["best_eval"]
        self.evals_without_improvement = checkpoint["evals_without_improvement"]
        torch.set_rng_state(checkpoint["rng_cpu"])
        if checkpoint.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng_cuda"], self.device)

    def _save_checkpoint(self) -> None:
        save_atomically(
            {
                "flowdiag_version": __version__,
                "config": self.config.to_json(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "stream": self.stream.state_dict(),
                "step": self.step,
                "best_eval": self.best_eval,
                "evals_without_improvement": self.evals_without_improvement,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
            self.out_dir / CHECKPOINT_NAME,
        )

    # --- one step --------------------------------------------------------------------------------

    def _learning_rate(self, step: int) -> float:
        warmup = self.config.train.warmup
        return self.config.train.lr * (min(1.0, step / warmup) if warmup else 1.0)

    def _train_step(self, images: Tensor) -> np.ndarray:
        """Forward and backward; returns the packed row on the host (the step's one device sync)."""
        if self.recorder:
            self.recorder.reset()
        self.optimizer.zero_grad(set_to_none=True)
        loss, bpd, penalty = training_loss(self.model, images, self.config.data.n_bits, self.config.train.lam)
        loss.backward()
        max_norm = self.config.train.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        scalars = torch.stack([loss.detach(), bpd.detach(), penalty.detach(), grad_norm.to(loss.dtype)])
        if self.recorder:
            max_abs, logdet = self.recorder.layer_values(loss)
            scalars = torch.cat([scalars, max_abs, logdet])
        return scalars.double().cpu().numpy()

    def _onset_layer(self, row: np.ndarray) -> str | None:
        """None while everything is finite; else the first non-finite layer, `loss` or `backward`."""
        if self.recorder:
            max_abs = row[_SCALARS : _SCALARS + self.recorder.n_layers]
            bad = np.flatnonzero(~np.isfinite(max_abs))
            if bad.size:
                return self.recorder.names[int(bad[0])]
        if not np.isfinite(row[0]) or not np.isfinite(row[1]) or not np.isfinite(row[2]):
            return "loss"
        if not np.isfinite(row[3]):
            return "backward"
        return None

    def _record(self, writer: RunWriter, row: np.ndarray) -> None:
        n = self.recorder.n_layers if self.recorder else len(self.model.flow_layers())
        if self.recorder:
            max_abs = row[_SCALARS : _SCALARS + n]
            logdet = row[_SCALARS + n : _SCALARS + 2 * n]
        else:
            max_abs = logdet = np.full(n, np.nan)
        writer.append_step(
            self.step,
            loss=float(row[0]),
            bpd=float(row[1]),
            penalty=float(row[2]),
            grad_norm=float(row[3]),
            lr=self.optimizer.param_groups[0]["lr"],
            max_abs=max_abs,
            logdet=logdet,
            nonfinite=~np.isfinite(max_abs) if self.recorder else np.zeros(n, dtype=bool),
        )

    def _save_replay(
        self, images: Tensor, rng_cpu: Tensor, rng_cuda: Tensor | None, row: np.ndarray, layer: str
    ) -> None:
        save_atomically(
            {
                "flowdiag_version": __version__,
                "config": self.config.to_json(),
                "step": self.step,
                "images": images.cpu(),
                "rng_cpu": rng_cpu,
                "rng_cuda": rng_cuda,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr": self.optimizer.param_groups[0]["lr"],
                "recorded": {"loss": float(row[0]), "bpd": float(row[1]), "penalty": float(row[2])},
                "onset_layer": layer,
            },
            self.out_dir / REPLAY_NAME,
        )

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
        with self.recorder.paused() if self.recorder else nullcontext():
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

    def _save_samples(self) -> None:
        from torchvision.utils import save_image

        # A forked RNG: drawing samples must not shift the noise of a run resumed from here.
        devices = [self.device] if self.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            self.recorder.paused() if self.recorder else nullcontext(),
        ):
            torch.manual_seed(self.config.train.seed)
            samples = self.model.sample(64, self.config.train.sample_temperature)
        if torch.isfinite(samples).all():
            save_image((samples + 0.5).clamp(0, 1).cpu(), self.out_dir / SAMPLES_FILE, nrow=8)

    # --- the loop --------------------------------------------------------------------------------

    def open(self) -> RunWriter:
        """Restore or initialize the model and open the run file: everything before the first step."""
        if self._checkpoint is not None:
            self._restore(self._checkpoint)
        writer = self._open_writer()
        if self._checkpoint is None:
            self._initialize(writer)
        self.model.train()
        return writer

    def one_step(self, writer: RunWriter) -> tuple[str | None, np.ndarray]:
        """One training step, recorded; returns (onset layer or None, the step's row).

        At an onset the update is skipped: the weights stay those that produced it.
        """
        self.step += 1
        lr = self._learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        images = self._next_batch()
        row = self._train_step(images)
        self._record(writer, row)
        self.last_bpd = float(row[1])
        if self.step <= 2 and self.recorder:
            peak = float(np.max(row[_SCALARS : _SCALARS + self.recorder.n_layers]))
            self.early_peak = peak if math.isnan(self.early_peak) else max(self.early_peak, peak)
            if self.step == 2:
                self.step2_peak = peak
        layer = self._onset_layer(row)
        if layer is not None:
            if self.onset_step < 0:
                self.onset_step, self.onset_layer = self.step, layer
                self._save_replay(images, rng_cpu, rng_cuda, row, layer)
            return layer, row
        self.optimizer.step()
        return None, row

    def run(self) -> RunResult:
        cfg = self.config.train
        status, onset_step, onset_layer = "running", -1, ""
        started, first_step = time.perf_counter(), self.step
        writer: RunWriter | None = None
        if self.progress:
            self.progress.start(self.total, f"M={cfg.init_batches} λ={cfg.lam:g} b={cfg.batch_size}")
        try:
            with stop_on_signals() as stop_request:
                writer = self.open()
                first_step = self.step
                while self.step < self.total:
                    if stop_request:
                        status = "interrupted"
                        break
                    layer, _ = self.one_step(writer)
                    if layer is not None and onset_step < 0:
                        onset_step, onset_layer = self.onset_step, self.onset_layer
                        writer.set_status("running", onset_step=onset_step, onset_layer=onset_layer)
                        if cfg.stop_on_divergence:
                            status = "diverged"
                            break
                    if self.progress:
                        rate = (self.step - first_step) / max(time.perf_counter() - started, 1e-9)
                        self.progress.advance(self.step, self.last_bpd, rate)
                    due = cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total
                    if due and self._evaluate_and_check_early_stop(writer):
                        break
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        writer.flush()
                        self._save_checkpoint()
                if status == "running":
                    status = "diverged" if onset_step >= 0 else "completed"
                    if onset_step < 0:
                        self._evaluate_and_check_early_stop(writer)
                        self._save_samples()
                self._save_checkpoint()
        except BaseException:
            if writer is not None:
                writer.set_status("failed", onset_step=onset_step, onset_layer=onset_layer)
                writer.close()
            raise
        finally:
            if self.progress:
                self.progress.stop()
        writer.set_status(status, onset_step=onset_step, onset_layer=onset_layer)
        writer.close()
        elapsed = time.perf_counter() - started
        return RunResult(
            status=status,
            out_dir=self.out_dir,
            steps=self.step,
            final_bpd=self.last_bpd,
            best_eval_bpd=self.best_eval,
            nan_onset_step=onset_step,
            nan_onset_layer=onset_layer,
            step2_peak=self.step2_peak,
            early_peak=self.early_peak,
            steps_per_second=(self.step - first_step) / max(elapsed, 1e-9),
        )

    def _evaluate_and_check_early_stop(self, writer: RunWriter) -> bool:
        """Evaluate on held-out data; True when the paper's early stop says to end the run."""
        bpd = self.evaluate()
        if math.isnan(bpd):
            return False
        writer.append_eval(self.step, bpd)
        if bpd < self.best_eval:
            self.best_eval, self.evals_without_improvement = bpd, 0
        else:
            self.evals_without_improvement += 1
        patience = self.config.train.early_stop
        return bool(patience) and self.evals_without_improvement >= patience


def train(config: RunConfig, out_dir: Path, **kwargs: Any) -> RunResult:
    """Train one run into `out_dir` (see Trainer for the keyword arguments)."""
    return Trainer(config, out_dir, **kwargs).run()
