"""`FlowdiagCallback`: flowdiag's record of a flow trained by PyTorch Lightning, in one line.

    trainer = lightning.Trainer(max_steps=2000, accumulate_grad_batches=2,
                                callbacks=[FlowdiagCallback(init_batches=16)])

- At the start of training it attaches a `flowdiag.Monitor` to the LightningModule (or to its
  attribute `flow=`), writing `run.h5` into `out_dir` (default: the trainer's log dir), and with
  `init_batches=M` runs Algorithm 1 over the first M batches of the train dataloader (under DDP each
  rank its own shard, pooled across ranks).
- One row per optimizer step, recorded after the last backward and before the update (Lightning's
  `on_before_optimizer_step`): under `accumulate_grad_batches=N` the row holds all N microbatches and
  the loss is their mean; under DDP the row is reduced across ranks, so every rank sees the same onset,
  and global rank 0 writes. The loss comes from `on_before_backward` (unscaled under fp16 AMP); the
  gradient norm is taken before any clipping; the penalty is Σ (h·w·log|det W|)² without λ.
- At the first non-finite step: a warning naming the step and the layer, and `trainer.should_stop`
  when `stop_on_nonfinite`; the run ends `diverged`. Ctrl-C ends it `interrupted`, an exception `failed`.
- Its state goes into Lightning's checkpoints: `trainer.fit(model, ckpt_path=...)` continues the same
  run file from the checkpoint's step, its onset kept.
- At the steps the trainer's loggers write (or every `log_every`) a handful of scalars through
  `pl_module.log`, so any Lightning logger shows them: flowdiag/max_abs, flowdiag/logdet_min and _max,
  flowdiag/grad_norm, flowdiag/penalty, flowdiag/nonfinite_layers.

The Monitor is attached when training starts, after Lightning's sanity check, so validation forwards
never reach it (those after it are kept out of the rows as every no_grad / eval() forward is).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import FlowAdapter
from flowdiag.integrations.lightning_parts import (
    ConvPenalty,
    Inputs,
    first_tensor,
    flow_of,
    init_minibatches,
    mark_initialized,
    ranks_of,
    run_config,
    total_steps,
)
from flowdiag.record.live_values import step_scalars
from flowdiag.record.monitor import Monitor
from flowdiag.record.run_state import RunState
from flowdiag.runtime import distributed
from flowdiag.runtime.errors import UserError
from flowdiag.stabilize.cumulative_init import ActNormInitStats, cumulative_init

INSTALL_LIGHTNING = "pip install 'flowdiag[lightning]'"
try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError:
    raise UserError(
        f"flowdiag.integrations.lightning needs Lightning 2.4 or later: {INSTALL_LIGHTNING}"
    ) from None


class FlowdiagCallback(Callback):
    """Record every optimizer step of a Lightning fit into a flowdiag run file (module docstring).

    `out_dir`: where run.h5 goes (default the trainer's log dir; a resumed fit continues the file its
    checkpoint names). `init_batches`: M for Algorithm 1 (None: the flow's ActNorms initialize as they
    do). `stop_on_nonfinite`: stop the fit at the first non-finite step. `log_every`: optimizer steps
    between the scalars given to `pl_module.log` (default: the trainer's `log_every_n_steps`, the steps
    its loggers write; `self.log` costs about 2.5 ms a step for the six). `adapter`: as
    `flowdiag.Monitor` takes it. `flow`: the (dotted) attribute of the LightningModule that holds the
    flow, when it is not the module itself. `inputs`: turns a train-dataloader batch into the flow's
    input, as training_step does (default: the batch, or its first item), for Algorithm 1. `config`:
    sections merged into the run file's settings (e.g. {"train": {"lam": 1e-3}}, what `flowdiag report`
    labels runs by). `loss_is_bpd`: the training loss is the bits per dimension (as y0ast's Glow returns
    it), recorded as the run's bpd too (the report's curves and final bpd); otherwise the run has none.
    """

    def __init__(
        self,
        out_dir: str | Path | None = None,
        *,
        init_batches: int | None = None,
        stop_on_nonfinite: bool = True,
        log_every: int | None = None,
        adapter: str | FlowAdapter = "auto",
        flow: str | None = None,
        inputs: Inputs | None = None,
        config: Mapping[str, Any] | None = None,
        loss_is_bpd: bool = False,
    ) -> None:
        if init_batches is not None and init_batches < 1:
            raise UserError(f"FlowdiagCallback(init_batches=...) must be at least 1, got {init_batches}")
        if log_every is not None and log_every < 1:
            raise UserError(f"FlowdiagCallback(log_every=...) must be at least 1, got {log_every}")
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.init_batches = init_batches
        self.stop_on_nonfinite = stop_on_nonfinite
        self.log_every = log_every
        self.adapter = adapter
        self.flow_attribute = flow
        self.inputs = inputs or first_tensor
        self.config = config
        self.loss_is_bpd = loss_is_bpd
        self.monitor: Monitor | None = None
        self._adapter: FlowAdapter | None = None
        self._restored: dict[str, Any] = {}  # this callback's state in the checkpoint a fit resumes
        self._loss: Tensor | None = None  # the step's loss so far, summed over its backwards
        self._init_stats: list[ActNormInitStats] | None = None
        self._penalty: ConvPenalty | None = None

    # --- the start -------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the flow; on a resumed fit, keep its ActNorms from initializing again (before the sanity
        check runs them)."""
        self._adapter = resolve_adapter(flow_of(pl_module, self.flow_attribute), self.adapter)
        if self._restored or trainer.ckpt_path is not None:
            mark_initialized(self._adapter)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach the Monitor and, on a fresh run, run Algorithm 1 over `init_batches` batches."""
        assert self._adapter is not None  # on_fit_start ran
        flow = flow_of(pl_module, self.flow_attribute)
        restored = self._restored
        self._restored = {}
        run_dir = self.out_dir or restored.get("run_dir") or trainer.log_dir  # log_dir: on every rank
        if run_dir is None:
            raise UserError("FlowdiagCallback found no log dir: pass out_dir=")
        state = RunState.from_dict(restored["state"]) if "state" in restored else None
        fresh = state is None and trainer.global_step == 0  # else the ActNorms come from a checkpoint
        # Algorithm 1's minibatches before the run file: a batch it cannot read leaves no file behind.
        batches = (
            init_minibatches(trainer, pl_module, self.init_batches, self.inputs)
            if self.init_batches and fresh
            else None
        )
        self.monitor = Monitor(
            flow,
            run_dir,
            adapter=self._adapter,
            config=run_config(trainer, self.init_batches, self.config),
            total_steps=total_steps(trainer),
            state=state,
            ranks=ranks_of(trainer),
        )
        self._penalty = ConvPenalty(flow, self._adapter)  # before any forward: it sees every conv run
        if batches is not None:
            with self.monitor.paused():
                self._init_stats = cumulative_init(
                    flow, batches, adapter=self._adapter, pool=distributed.pool
                )

    # --- one optimizer step ----------------------------------------------------------------------

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Sum the step's losses, on the device: Lightning divides each by N under accumulation."""
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """The step's row: every training forward since the previous step, the loss, the gradients
        before clipping, the penalty and the learning rate."""
        monitor, loss = self.monitor, self._loss
        if monitor is None or loss is None:  # no backward since the last step (training_step gave None)
            return
        self._loss = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 AMP: Lightning scaled the loss before the backward
            loss = loss / scaler.get_scale()
        if self._init_stats is not None:  # written with the first row: the file knows each layer's h·w
            monitor.record_init(self._init_stats)
            self._init_stats = None
        penalty = self._penalty() if self._penalty is not None else None
        lr = float(optimizer.param_groups[0]["lr"])
        bpd = loss if self.loss_is_bpd else None
        onset = monitor.step(loss, bpd=bpd, penalty=penalty, lr=lr, loss_scaled=scaler is not None)
        record = monitor.last
        assert record is not None
        first_onset = onset is not None and monitor.state.onset_step == record.step
        every = self.log_every or trainer.log_every_n_steps  # 0: Lightning logs nothing
        if every and (record.step % every == 0 or first_onset):
            # Host tensors: Lightning keeps a logged value where it is, where a float would be copied to
            # the module's device (on CUDA a copy and a stream sync per value).
            scalars = {name: torch.tensor(value) for name, value in step_scalars(record).items()}
            pl_module.log_dict(scalars, on_step=True, on_epoch=False, batch_size=1)
        if first_onset:
            self._diverged(trainer, monitor, str(onset))

    def _diverged(self, trainer: Trainer, monitor: Monitor, layer: str) -> None:
        stopping = "; stopping the fit" if self.stop_on_nonfinite else ""
        rank_zero_warn(
            f"flowdiag: step {monitor.state.step} is the first non-finite one, in layer {layer}{stopping}; "
            f"see flowdiag report {monitor.out_dir}"
        )
        if self.stop_on_nonfinite:
            trainer.should_stop = True

    # --- the end ---------------------------------------------------------------------------------

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """`completed`, or `diverged` after an onset."""
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Ctrl-C: `interrupted`; any other exception: `failed`."""
        if self.monitor is not None:
            self.monitor.close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")

    def state_dict(self) -> dict[str, Any]:
        """The run's state at the checkpoint's step, with every row so far flushed to the run file."""
        if self.monitor is None:
            return {}
        self.monitor.flush()
        return {"state": self.monitor.state.to_dict(), "run_dir": str(self.monitor.out_dir.resolve())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed fit: the run file and state to continue (used when training starts)."""
        self._restored = dict(state_dict)
