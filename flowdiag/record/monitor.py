"""`Monitor`: flowdiag's record of any flow's training, and the one recording path of `flowdiag train`.

    with flowdiag.Monitor(model, "runs/mine") as monitor:
        for x in loader:
            loss = -model.log_prob(x).mean()
            optimizer.zero_grad()
            loss.backward()
            monitor.step(loss)  # after backward, before the update
            optimizer.step()

An adapter (flowdiag.adapters) finds the flow layers and calls back with each layer's output and
log-det as the library computes them. Two halves do the rest: `capture.LayerCapture` reduces each
call on the device, inside the user's forward, and `step_row` turns a step into one packed row copied
to the host once (loss, gradient norm and every layer's values: one device sync per step), a
StepRecord and an onset. The row goes to `out_dir/run.h5` in the schema `flowdiag report`, `watch` and
the diagnosis read, then to any listeners (`add_listener`): an Optuna trial (`trial=`) and live loggers
(`log_to=`: TensorBoard, MLflow, W&B) are such listeners (record/sinks.py), fed from the same host row.

What a row holds:
- every *training* forward since the previous `step` (gradient accumulation: several, folded in; the
  row says how many). Forwards under `torch.no_grad()` / `inference_mode()` or with the layer in
  `eval()` (validation, sampling) stay out of it: `eval_forwards()` reads them, and
  `Monitor(training_only=False)` records every forward as before. `paused()` keeps anything out.
- layers that did not run are marked so (`ran`), never non-finite, never an onset.
- flowdiag's own passes (Algorithm 1, the audit) are never recorded.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import Detach, FlowAdapter, Logdet, in_internal_pass
from flowdiag.record.capture import ForwardsRecord, LayerCapture
from flowdiag.record.run_state import RunState, StepRecord
from flowdiag.record.sinks import Sink, monitor_sinks
from flowdiag.record.step_row import SCALARS, Number, host_row, onset_of
from flowdiag.record.store import InverseRow, NullWriter, RunWriter
from flowdiag.record.trial_record import pruned_status
from flowdiag.runtime.distributed import SINGLE, Ranks
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from flowdiag.runtime.version import __version__

if TYPE_CHECKING:
    from flowdiag.record.inverse_check import InverseCheck
    from flowdiag.settings.config import RunConfig
    from flowdiag.stabilize.cumulative_init import ActNormInitStats

Listener = Callable[[StepRecord, "str | None"], None]
# The CPU gradient norm joins the gradients into one vector up to this many values (64 MB of float32).
_JOINED_AT_MOST = 2**24


def _config_json(config: RunConfig | Mapping[str, Any] | None) -> str:
    if config is None:
        return "{}"
    if isinstance(config, Mapping):
        try:
            return json.dumps(dict(config), sort_keys=True)
        except TypeError as error:
            raise UserError(f"Monitor config is not JSON ({error}): pass plain values") from None
    return config.to_json()


class Monitor:
    """Record every flow layer of `model` into `out_dir/run.h5`, one row per `step(loss)`.

    `adapter`: "auto" (recognize the library by its classes, or a hand-written flow by its modules), a
    name from `flowdiag.adapters.ADAPTER_NAMES`, or an adapter instance (`flowdiag.adapters.base`).
    `config`: what the run file stores as its settings (a RunConfig, or a dict such as {"train":
    {"batch_size": 1, "init_batches": 1}}); without it the file says none were given.
    `training_only`: keep forwards under no_grad / inference_mode / eval() out of the rows (default).
    `trial`: an Optuna trial that keeps the run's file, status, onset and peak |output| as user
    attributes (`flowdiag.integrations.optuna.StabilityPruner` prunes on them); a `with` block left by
    `optuna.TrialPruned` ends the run `diverged` after an onset, else `interrupted`.
    `log_to`: a TensorBoard SummaryWriter, an MLflow run or a W&B run (or a list): each step's handful
    of scalars, and every `log_every` steps the per-level histograms of the per-layer values.
    """

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        adapter: str | FlowAdapter = "auto",
        config: RunConfig | Mapping[str, Any] | None = None,
        diagnostics: bool = True,
        total_steps: int = -1,
        flush_every: int = 50,
        flush_seconds: float = 2.0,
        state: RunState | None = None,
        ranks: Ranks = SINGLE,
        training_only: bool = True,
        trial: Any = None,
        log_to: Any = None,
        log_every: int = 10,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.run_file = self.out_dir / RUN_FILE
        self.resumed = state is not None
        if not self.resumed and ranks.is_main and self.run_file.exists():
            raise UserError(
                f"{self.run_file} already exists: pass --resume to continue it (flowdiag train), "
                "or choose another --out / out_dir"
            )
        self.model = model
        self.adapter = resolve_adapter(model, adapter)
        layers = self.adapter.layers()
        self.layer_names: list[str] = [layer.name for layer in layers]
        self.layer_kinds: list[str] = [layer.kind for layer in layers]
        self._modules = [layer.module for layer in layers]
        self._pixels: list[int | None] = [layer.pixels for layer in layers]
        self.state = state or RunState()
        # Where a resumed file is cut back to, fixed now: the writer opens at first use, maybe after a step.
        self._resumed_at = self.state.step
        self.ranks = ranks  # data-parallel: rows are reduced across ranks, and rank 0 writes
        self._config_json = _config_json(config)
        self._total_steps = total_steps
        self._flush = (flush_every, flush_seconds)
        self._writer: RunWriter | NullWriter | None = None
        self._file_writer: RunWriter | None = None  # kept while `set_mode` drops the rows
        self._final_status: str | None = None
        self.status: str | None = None  # the status written at close; None while the run goes on
        self.last: StepRecord | None = None
        self._training_only = training_only
        self._train = LayerCapture(len(layers), fill=0.0 if ranks.enabled else math.nan)
        self._other: LayerCapture | None = None  # forwards kept out of the rows, made at the first
        self._said_other = False
        self._listeners: list[Listener] = []
        self._parameters: list[nn.Parameter] | None = None
        self._joinable = True
        self._active = True
        self._sinks: list[Sink] = []
        if ranks.is_main:  # the rank that writes the run file tells the rest
            self._sinks = monitor_sinks(trial, log_to, log_every, self.run_file, lambda: self.layer_pixels)
        self._listeners.extend(self._sinks)
        self._has_trial = trial is not None
        self._detach: Detach | None = self.adapter.attach(self._capture) if diagnostics else None

    # --- inside the library's forward: device work only ------------------------------------------

    def _capture(self, index: int, output: Tensor, logdet: Logdet) -> None:
        if not self._active or in_internal_pass():
            return
        if self._pixels[index] is None and output.dim() >= 4:
            self._pixels[index] = int(output.shape[-2] * output.shape[-1])  # a shape: no sync
        if not self._training_only or (torch.is_grad_enabled() and self._modules[index].training):
            self._train.take(index, output, logdet)
            return
        if self._other is None:
            self._other = LayerCapture(len(self._modules))
        self._other.take(index, output, logdet)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Keep what runs inside out of the record entirely (the trainer's evaluation, sampling, init)."""
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active

    def eval_forwards(self) -> ForwardsRecord | None:
        """Per layer max |output| and mean log-det over the forwards kept out of the training rows
        (no_grad, inference_mode, eval()) since the last call; None if there were none. One host copy."""
        other = self._other
        if other is None or other.forwards == 0:
            return None
        record = other.to_host()
        other.reset()
        return record

    # --- the run file ----------------------------------------------------------------------------

    @property
    def writer(self) -> RunWriter | NullWriter:
        """The run file's writer, created at first use (a library's geometry is known after a forward)."""
        if self._writer is None:
            self._writer = self._open_writer() if self.ranks.is_main else NullWriter()
        return self._writer

    def _open_writer(self) -> RunWriter:
        flush_every, flush_seconds = self._flush
        if self.resumed:
            writer = RunWriter.open_existing(
                self.run_file,
                flush_every=flush_every,
                flush_seconds=flush_seconds,
                total_steps=self._total_steps,
            )
            writer.truncate_after(self._resumed_at)
            writer.set_status("running", onset_step=self.state.onset_step, onset_layer=self.state.onset_layer)
            return writer
        return RunWriter(
            self.run_file,
            config_json=self._config_json,
            version=__version__,
            layer_names=self.layer_names,
            layer_kinds=self.layer_kinds,
            layer_pixels=[-1 if p is None else p for p in self._pixels],
            total_steps=self._total_steps,
            flush_every=flush_every,
            flush_seconds=flush_seconds,
        )

    def set_mode(self, *, hooks: bool, write: bool) -> None:
        """For `flowdiag bench`'s A/B in one process: the per-layer hooks attached or not, and rows
        written to the run file or dropped (computed all the same). Rows the file writer holds stay
        in its buffer and go out with its next block, so a mode's writes are timed in that mode."""
        if hooks and self._detach is None:
            self._detach = self.adapter.attach(self._capture)
        elif not hooks and self._detach is not None:
            self._detach.remove()
            self._detach = None
        if isinstance(self.writer, RunWriter):
            self._file_writer = self._writer
        self._writer = self._file_writer if write and self._file_writer is not None else NullWriter()

    def record_init(self, stats: Sequence[ActNormInitStats]) -> None:
        """The cumulative init's figures (flowdiag.stabilize.cumulative_init), one per ActNorm."""
        self.writer.write_init(
            [s.name for s in stats],
            np.array([s.log_scale_min for s in stats]),
            np.array([s.log_scale_max for s in stats]),
            np.array([s.min_input_var for s in stats]),
            np.array([s.n_values for s in stats], dtype=np.int64),
            np.array([s.pixels for s in stats], dtype=np.int64),
        )

    def record_eval(self, bpd: float) -> None:
        """A held-out evaluation at the current step."""
        self.writer.append_eval(self.state.step, bpd)
        self.state.take_eval(bpd)

    def record_inverse(self, check: InverseCheck) -> None:
        """An evaluation's inverse check (flowdiag.record.inverse_check) at the current step."""
        state = self.state
        if check.onset_layer and state.inverse_onset_step < 0:
            state.inverse_onset_step, state.inverse_onset_layer = state.step, check.onset_layer
        row = InverseRow(
            state.step,
            check.max_abs,
            check.nonfinite,
            check.recon_error,
            check.nonfinite_samples,
            check.conv_logabsdet,
            check.conv_cond,
        )
        self.writer.append_inverse(row, (state.inverse_onset_step, state.inverse_onset_layer))

    def flush(self) -> None:
        self.writer.flush()

    # --- one step --------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(record, onset)` after every step's row is recorded; returns its remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def step(
        self,
        loss: Tensor,
        *,
        bpd: Number | None = None,
        penalty: Number | None = None,
        grad_norm: Number | None = None,
        lr: Number | None = None,
        loss_scaled: bool = False,
    ) -> str | None:
        """Record one training step, over every training forward since the previous one; call after
        `loss.backward()` (the last one, under gradient accumulation), before `optimizer.step()`.

        Returns the first non-finite flow layer in data -> latent order, `loss` when every layer was
        finite but the loss was not, `backward` when only the gradient norm was; None when all is finite.
        `loss_scaled`: the gradients come from an fp16 loss scaler, which skips an update whose gradient
        overflowed and lowers its scale: a non-finite gradient alone is then no divergence.
        """
        if self.state.step == 0 and not self.resumed:
            self.writer.set_phase("train")
        values = {"loss": loss, "bpd": bpd, "penalty": penalty, "lr": lr}
        values["grad_norm"] = self._grad_norm() if grad_norm is None else grad_norm
        recording = self._detach is not None
        train = self._train
        self._warn_without_training_forwards()
        row = host_row(values, train.values(loss) if recording else None, train.ran, self.ranks)
        forwards = train.forwards if recording else 0
        scalars = (row.scalars[name] for name in SCALARS)
        record = StepRecord(
            self.state.step + 1, *scalars, row.max_abs, row.logdet, row.nonfinite, row.ran, forwards
        )
        given = {name for name in ("loss", "bpd", "penalty") if values[name] is not None}
        onset = onset_of(record, self.layer_names, given, loss_scaled)
        self.state.advance(record, onset)
        self._write(record, onset, row.onset_ranks)
        self.last = record
        train.reset()  # after the row's copy above, on the same stream
        for listener in tuple(self._listeners):
            listener(record, onset)
        return onset

    def _grad_norm(self) -> Tensor | float:
        """The gradients' total norm, where the loop does not give it: on the device, no sync."""
        if self._parameters is None:  # listed once: walking a deep module tree costs ~0.7 ms a step
            self._parameters = list(self.model.parameters())
            self._joinable = sum(p.numel() for p in self._parameters) <= _JOINED_AT_MOST
        grads = [p.grad for p in self._parameters if p.grad is not None]
        if not grads:
            return math.nan
        if grads[0].is_cuda or not self._joinable:  # per-tensor norms, no copy of the gradients
            return torch.nn.utils.get_total_norm(grads)
        # On the CPU one pass over one joined vector: 0.29 against 0.63 ms for a y0ast-style Glow's 342
        # gradients (K = 8, width 32), whose 1.2 ms default made the Monitor's largest single cost.
        return torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))

    def _warn_without_training_forwards(self) -> None:
        other = self._other
        if self._said_other or self._train.forwards or other is None or not other.forwards:
            return
        self._said_other = True
        warnings.warn(
            "flowdiag: this step saw forwards only under no_grad / inference_mode or in eval(), which "
            "the Monitor keeps out of the training rows; Monitor(training_only=False) records them",
            RuntimeWarning,
            stacklevel=3,
        )

    def _write(self, record: StepRecord, onset: str | None, onset_ranks: np.ndarray) -> None:
        """The row, then the onset and its rank where this step is the onset: the status write flushes
        them together, so the file never holds the onset row without its rank."""
        self.writer.append_step(
            record.step,
            **{name: getattr(record, name) for name in SCALARS},
            max_abs=record.max_abs,
            logdet=record.logdet,
            nonfinite=record.nonfinite,
            ran=record.ran,
            forwards=record.forwards,
        )
        if onset is None or self.state.onset_step != record.step:
            return
        if onset_ranks.size:
            self.state.onset_rank = int(onset_ranks[0])
            self.writer.set_onset_rank(self.state.onset_rank)
        self.writer.set_status("running", onset_step=record.step, onset_layer=onset)

    # --- the end ---------------------------------------------------------------------------------

    def end(self, status: str) -> None:
        """Say how the run ended (`interrupted` on a signal, say); the default comes from the onset."""
        self._final_status = status

    def close(self, status: str | None = None) -> str:
        """Write the final status and detach from the model; returns the status. Safe to call twice."""
        if self.status is not None:
            return self.status
        self._active = False  # whatever stays attached (under another tool's wrapper) records nothing
        if self._detach is not None:
            self._detach.remove()
            self._detach = None
        final = status or self._final_status or ("diverged" if self.state.diverged else "completed")
        self.writer.set_status(final, onset_step=self.state.onset_step, onset_layer=self.state.onset_layer)
        self.status = final
        for sink in self._sinks:
            sink.close(final, self.state)
        return final

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            pruned = pruned_status(exc_type, self.state) if self._has_trial else None
            self.close(pruned or "failed")

    @property
    def layer_pixels(self) -> list[int | None]:
        """h·w each layer ran at (None until seen, for libraries that only tell in a forward)."""
        return list(self._pixels)
