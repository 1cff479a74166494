"""`Monitor`: flowdiag's record of any flow's training, and the one recording path of `flowdiag train`.

    with flowdiag.Monitor(model, "runs/mine") as monitor:
        for x in loader:
            loss = -model.log_prob(x).mean()
            optimizer.zero_grad()
            loss.backward()
            monitor.step(loss)  # after backward, before the update
            optimizer.step()

An adapter (flowdiag.adapters) finds the flow layers and calls back with each layer's output and
log-det as the library computes them; the Monitor reduces each to max |output| and the batch-mean
log-det on the device, and at `step` copies the whole step to the host at once: loss, gradient norm
and every layer's values in one tensor, one device sync per step. The row goes to `out_dir/run.h5`
in the schema `flowdiag report`, `watch` and the diagnosis read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import Detach, FlowAdapter
from flowdiag.record.run_state import RunState, StepRecord
from flowdiag.record.store import InverseRow, NullWriter, RunWriter
from flowdiag.runtime.distributed import SINGLE, Ranks, reduce_layer_row
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from flowdiag.runtime.version import __version__

if TYPE_CHECKING:
    from flowdiag.record.inverse_check import InverseCheck
    from flowdiag.settings.config import RunConfig
    from flowdiag.stabilize.cumulative_init import ActNormInitStats

# Scalars that lead every packed row; their order is the StepRecord's.
_SCALARS = ("loss", "bpd", "penalty", "grad_norm", "lr")
Number = float | int | Tensor


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

    `adapter`: "auto" (recognize the library by its classes), a name from
    `flowdiag.adapters.ADAPTER_NAMES`, or an adapter instance. `config`: what the run file stores as
    its settings (a RunConfig, or a dict such as {"train": {"batch_size": 1, "init_batches": 1}}; the
    report groups runs by train.init_batches, lam, batch_size and seed).
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
        self.adapter = resolve_adapter(model, adapter) if isinstance(adapter, str) else adapter
        layers = self.adapter.layers()
        self.layer_names: list[str] = [layer.name for layer in layers]
        self.layer_kinds: list[str] = [layer.kind for layer in layers]
        self._pixels: list[int | None] = [layer.pixels for layer in layers]
        self.state = state or RunState()
        self.ranks = ranks  # data-parallel: rows are reduced across ranks, and rank 0 writes
        self._config_json = _config_json(config)
        self._total_steps = total_steps
        self._flush = (flush_every, flush_seconds)
        self._writer: RunWriter | NullWriter | None = None
        self._file_writer: RunWriter | None = None  # kept while `set_mode` drops the rows
        self._final_status: str | None = None
        self.status: str | None = None  # the status written at close; None while the run goes on
        n = len(layers)
        # Per layer, on the device: the output's min and max (max |output| = max(max, -min) is taken
        # on the host), written by each layer's reduction straight into one (2, N) tensor, so the step
        # reads them with no stacking; NaN where a layer did not run this step. Made at the first
        # capture, on the outputs' device.
        self._extrema: Tensor | None = None
        self._lows: list[Tensor] = []  # views of _extrema's rows, one per layer
        self._highs: list[Tensor] = []
        self._logdet: list[Tensor | None] = [None] * n  # batch-averaged at `step`, all layers at once
        self._ran = np.zeros(n, bool)  # which layers ran since the last step: known on the host, no sync
        self._zero: Tensor | None = None
        self._active = True
        self._detach: Detach | None = self.adapter.attach(self._capture) if diagnostics else None

    # --- inside the library's forward: device work only ------------------------------------------

    def _capture(self, index: int, output: Tensor, logdet: Tensor | None) -> None:
        if not self._active:
            return
        self._ran[index] = True
        if self._pixels[index] is None and output.dim() >= 3:
            self._pixels[index] = int(output.shape[-2] * output.shape[-1])  # a shape: no sync
        # One pass over the output. aminmax, not vector_norm(ord=inf): measured 8 against 170 µs for
        # 49k floats on one CPU thread; both propagate NaN and inf.
        extrema = self._extrema
        if (
            extrema is not None
            and output.dtype is extrema.dtype
            and output.is_cuda == extrema.is_cuda
            and not (output.is_cuda and output.device != extrema.device)
        ):
            torch.aminmax(output.detach(), out=(self._lows[index], self._highs[index]))
        else:
            self._capture_extrema(index, output.detach())
        self._logdet[index] = self._zero_logdet(output) if logdet is None else logdet.detach()

    def _capture_extrema(self, index: int, output: Tensor) -> None:
        """The first layer of a run, a new device, or another dtype than the extrema's."""
        extrema = self._extrema
        if extrema is None or extrema.device != output.device or _wider(output.dtype, extrema.dtype):
            extrema = self._make_extrema(output)
        if output.dtype is extrema.dtype:
            torch.aminmax(output, out=(self._lows[index], self._highs[index]))
        else:  # float16 or bfloat16 under autocast: reduced in its own dtype, which holds its extremes
            values = torch.aminmax(output)
            self._lows[index].copy_(values.min)
            self._highs[index].copy_(values.max)

    def _zero_logdet(self, output: Tensor) -> Tensor:
        """A volume-preserving layer's log-det, made once per run."""
        if self._zero is None:
            self._zero = output.new_zeros(())
        return self._zero

    def _make_extrema(self, output: Tensor) -> Tensor:
        """The (2, N) extrema on the output's device, in float32 (float64 for float64 outputs, whose
        extremes float32 would turn into inf); what this step already holds is kept."""
        dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
        extrema = output.new_full((2, len(self.layer_names)), math.nan, dtype=dtype)
        if self._extrema is not None:
            extrema.copy_(self._extrema)
        self._extrema = extrema
        self._lows, self._highs = list(extrema[0].unbind()), list(extrema[1].unbind())
        return extrema

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation, sampling and the init are not training steps: keep them out of the record."""
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active

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
            writer.truncate_after(self.state.step)
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

    def _grad_norm(self) -> Tensor | float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else math.nan

    def _layer_values(self, like: Tensor) -> list[Tensor]:
        """(3N,) on the device, in parts for the row's one `cat`: every layer's output min, then max,
        then batch-mean log-det (float64)."""
        if self._extrema is None:  # no layer ran this step
            return [like.new_full((3 * len(self.layer_names),), math.nan, dtype=torch.float64)]
        if any(v is None for v in self._logdet):  # a layer that did not run this step
            nan = like.new_full((), math.nan)
            self._logdet = [nan if v is None else v for v in self._logdet]
        return [self._extrema.reshape(-1), _batch_means(self._logdet)]  # type: ignore[arg-type]

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
        """Record one training step; call after `loss.backward()`, before `optimizer.step()`.

        Returns the first non-finite flow layer in data -> latent order, `loss` when every layer was
        finite but the loss was not, `backward` when only the gradient norm was; None when all is finite.
        `loss_scaled`: the gradients come from an fp16 loss scaler, which skips an update whose gradient
        overflowed and lowers its scale: a non-finite gradient alone is then no divergence.
        """
        if self.state.step == 0 and not self.resumed:
            self.writer.set_phase("train")
        values = {
            "loss": loss,
            "bpd": bpd,
            "penalty": penalty,
            "grad_norm": self._grad_norm() if grad_norm is None else grad_norm,
            "lr": lr,
        }
        # Tensors travel in one packed copy; plain numbers never go to the device and back.
        on_device = [name for name in _SCALARS if isinstance(values[name], Tensor)]
        packed: list[Tensor] = [values[name].detach().reshape(()) for name in on_device]  # type: ignore[union-attr]
        recording = self._detach is not None
        n, k = len(self.layer_names), len(on_device)
        row = torch.stack(packed)
        if recording:  # one cat, promoted to the log-dets' float64
            row = torch.cat([row, *self._layer_values(loss)])
        row = row.to(torch.float64)  # already so when recording: no copy
        if self.ranks.enabled:  # the same row on every rank: every rank takes the same decisions
            layer = row[k:] if recording else row.new_zeros(3 * n)
            local = sum(name in on_device for name in ("loss", "bpd", "penalty"))  # they lead _SCALARS
            reduced = reduce_layer_row(self.ranks, row[:k], *layer.split(n), local)
            row = torch.cat(reduced)
        host = row.cpu().numpy()  # the step's one device sync
        onset_ranks = np.flatnonzero(host[k + 3 * n :] > 0) if self.ranks.enabled else np.zeros(0, int)
        scalars = {name: math.nan if values[name] is None else values[name] for name in _SCALARS}
        scalars.update({name: float(host[i]) for i, name in enumerate(on_device)})
        if recording:  # NaN stays NaN in both (and neither warns)
            low, high, logdet = host[k : k + n], host[k + n : k + 2 * n], host[k + 2 * n : k + 3 * n]
            max_abs = np.maximum(high, -low)
            ran = self._ran.copy()
            nonfinite = ran & ~(np.isfinite(max_abs) & np.isfinite(logdet))
        else:
            max_abs = logdet = np.full(n, np.nan)
            nonfinite = ran = np.zeros(n, bool)
        record = StepRecord(
            self.state.step + 1, *(float(scalars[s]) for s in _SCALARS), max_abs, logdet, nonfinite
        )
        given = {name for name in ("loss", "bpd", "penalty") if values[name] is not None}
        onset = self._onset(record, given, loss_scaled)
        self.state.advance(record, onset)
        self.writer.append_step(
            record.step,
            **{name: getattr(record, name) for name in _SCALARS},
            max_abs=max_abs,
            logdet=logdet,
            nonfinite=nonfinite,
            ran=ran,
        )
        if onset is not None and self.state.onset_step == record.step:
            self.writer.set_status("running", onset_step=record.step, onset_layer=onset)
            if onset_ranks.size:
                self.state.onset_rank = int(onset_ranks[0])
                self.writer.set_onset_rank(self.state.onset_rank)
        self.last = record
        self._logdet = [None] * n
        self._ran[:] = False
        if self._extrema is not None:
            self._extrema.fill_(math.nan)  # after the row's copy above, on the same stream
        return onset

    def _onset(self, record: StepRecord, given: set[str], loss_scaled: bool) -> str | None:
        bad = np.flatnonzero(record.nonfinite)
        if bad.size:
            return self.layer_names[int(bad[0])]
        if not all(math.isfinite(getattr(record, name)) for name in given):
            return "loss"
        if not math.isfinite(record.grad_norm) and not loss_scaled:
            return "backward"
        return None

    # --- the end ---------------------------------------------------------------------------------

    def end(self, status: str) -> None:
        """Say how the run ended (`interrupted` on a signal, say); the default comes from the onset."""
        self._final_status = status

    def close(self, status: str | None = None) -> str:
        """Write the final status and detach from the model; returns the status. Safe to call twice."""
        if self.status is not None:
            return self.status
        if self._detach is not None:
            self._detach.remove()
            self._detach = None
        final = status or self._final_status or ("diverged" if self.state.diverged else "completed")
        self.writer.set_status(final, onset_step=self.state.onset_step, onset_layer=self.state.onset_layer)
        self.status = final
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
            self.close("failed")

    @property
    def layer_pixels(self) -> list[int | None]:
        """h·w each layer ran at (None until seen, for libraries that only tell in a forward)."""
        return list(self._pixels)


def _wider(dtype: torch.dtype, than: torch.dtype) -> bool:
    return dtype == torch.float64 and than != torch.float64


def _batch_means(logdets: list[Tensor]) -> Tensor:
    """(N,) float64: each layer's log-det averaged over the batch (a scalar log-det is its own mean).
    One stacked mean when every layer gave the same shape, as flowdiag's Glow does."""
    try:
        stacked = torch.stack(logdets)
    except RuntimeError:  # shapes differ: (B,) beside scalars, say
        return torch.stack([t.mean(dtype=torch.float64) for t in logdets])
    return stacked.reshape(len(logdets), -1).mean(1, dtype=torch.float64)
