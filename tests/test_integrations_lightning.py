"""`FlowdiagCallback` in real Lightning fits of a y0ast-style Glow (flowdiag.bench.threaded_glow: every
layer adds to a running log-det, ActNorms flagged by a plain attribute), trained as a LightningModule
holding it under `self.flow`, two microbatches to each optimizer step."""

from __future__ import annotations

import csv
import importlib
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from flowdiag.bench.threaded_glow import ActNorm2d, ThreadedGlow
from flowdiag.cli import app
from flowdiag.integrations.lightning import FlowdiagCallback
from flowdiag.record.store import read_run
from flowdiag.report.runs import run_settings
from flowdiag.runtime.distributed import Ranks
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from tests.examples import load_example

BROKEN_LAYER = "flow.layers.5.invconv"  # the first step of the second level


class GlowModule(L.LightningModule):
    """A y0ast-style Glow as people train it under Lightning; `events` maps a step (1-based, the optimizer
    step its first microbatch belongs to) to what happens to it: "nan" (an inf log|u| in BROKEN_LAYER),
    "ctrl-c" or "error"."""

    def __init__(self, events: dict[int, str] | None = None) -> None:
        super().__init__()
        self.flow = ThreadedGlow(1, levels=2, steps=2, hidden=8, noise=False)
        self.events = dict(events or {})
        self.losses: list[float] = []  # every microbatch's loss

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        event = self.events.pop(self.global_step + 1, None)
        if event == "nan":
            with torch.no_grad():
                self.flow.flow.layers[5].invconv.log_s[0] = float("inf")
        elif event == "ctrl-c":
            raise KeyboardInterrupt
        elif event == "error":
            raise RuntimeError("a bug in training_step")
        loss = self.flow(batch[0])[1].mean()
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _loader() -> DataLoader:
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    return DataLoader(TensorDataset(images), batch_size=2)


def _trainer(root: Path, callbacks: list[Callback], max_steps: int, **options: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "accumulate_grad_batches": 2,
        "logger": CSVLogger(root),
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": root,
    }
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, **{**settings, **options})


def test_accumulated_fit_with_init_16_writes_one_row_per_optimizer_step_that_report_reads(
    tmp_path: Path,
) -> None:
    module = GlowModule()
    callback = FlowdiagCallback(init_batches=16, flow="flow", loss_is_bpd=True)
    trainer = _trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(module, _loader())
    run_file = Path(trainer.log_dir) / RUN_FILE  # the default: the trainer's log dir
    record = read_run(run_file)
    assert record.status == "completed" and record.phase == "train" and record.total_steps == 4
    assert record.step.tolist() == [1, 2, 3, 4] and record.forwards.tolist() == [2, 2, 2, 2]
    # Each row's loss is the optimizer step's: the mean of its two microbatches.
    np.testing.assert_allclose(record.loss, np.reshape(module.losses, (4, 2)).mean(1), rtol=1e-6)
    np.testing.assert_array_equal(record.bpd, record.loss)  # the loss is ThreadedGlow's bpd
    assert np.isfinite(record.max_abs).all() and np.isfinite(record.grad_norm).all()
    assert (record.penalty > 0).all()  # Σ (h·w·log|det W|)² over its 4 convs
    # Algorithm 1 over 16 batches of 2: the first ActNorm (4x4 after the squeeze) pooled 16·2·16 values.
    assert record.init is not None and record.init["n_values"][0] == 16 * 2 * 16
    assert (run_settings(record).init_batches, run_settings(record).batch_size) == (16, 2)
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
        logged = [float(row["flowdiag/max_abs"]) for row in csv.DictReader(f) if row["flowdiag/max_abs"]]
    np.testing.assert_allclose(logged, np.nanmax(record.max_abs, axis=1), rtol=1e-6)
    result = CliRunner().invoke(app, ["report", str(run_file), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "M=16" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")


def test_a_forced_nan_stops_the_fit_and_names_its_layer(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [FlowdiagCallback(tmp_path / "run", flow="flow")], max_steps=8)
    with pytest.warns(UserWarning, match=rf"step 3 is the first non-finite one, in layer {BROKEN_LAYER}"):
        trainer.fit(GlowModule({3: "nan"}), _loader())
    assert trainer.global_step == 3  # stopped at once
    record = read_run(tmp_path / "run" / RUN_FILE)
    assert (record.status, record.nan_onset_step, record.nan_onset_layer) == ("diverged", 3, BROKEN_LAYER)
    assert record.step.tolist() == [1, 2, 3]


def test_under_fp16_loss_scaling_the_row_holds_the_unscaled_loss(tmp_path: Path) -> None:
    scaling = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    module = GlowModule()
    callback = FlowdiagCallback(tmp_path / "run", flow="flow")
    trainer = _trainer(tmp_path, [callback], max_steps=3, plugins=[scaling], log_every_n_steps=2)
    trainer.fit(module, _loader())
    record = read_run(tmp_path / "run" / RUN_FILE)
    np.testing.assert_allclose(record.loss, np.reshape(module.losses, (3, 2)).mean(1), rtol=1e-3)
    # The scalars go to pl_module.log at the steps the trainer's loggers write: every 2nd here.
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
        logged = [float(row["flowdiag/max_abs"]) for row in csv.DictReader(f) if row["flowdiag/max_abs"]]
    np.testing.assert_allclose(logged, [np.nanmax(record.max_abs[1])], rtol=1e-6)


class InitedAtStart(Callback):
    """Whether every ActNorm of the flow counts as initialized when training starts."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen = [m.inited for m in pl_module.modules() if isinstance(m, ActNorm2d)]


def test_resume_from_a_lightning_checkpoint_continues_the_same_run_file_with_its_onset(
    tmp_path: Path,
) -> None:
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = _trainer(
        tmp_path,
        [FlowdiagCallback(flow="flow", stop_on_nonfinite=False), checkpoints],
        max_steps=6,
        enable_checkpointing=True,
    )
    with pytest.warns(UserWarning, match="first non-finite"):
        first.fit(GlowModule({3: "nan"}), _loader())
    run_file = Path(first.log_dir) / RUN_FILE
    assert read_run(run_file).step.tolist() == [1, 2, 3, 4, 5, 6]
    probe = InitedAtStart()
    second = _trainer(tmp_path, [FlowdiagCallback(flow="flow", stop_on_nonfinite=False), probe], max_steps=8)
    second.fit(GlowModule(), _loader(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert Path(second.log_dir) != run_file.parent and not (Path(second.log_dir) / RUN_FILE).exists()
    record = read_run(run_file)
    assert record.step.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]  # steps 5, 6 again, from the checkpoint
    assert (record.status, record.nan_onset_step, record.nan_onset_layer) == ("diverged", 3, BROKEN_LAYER)
    assert probe.seen and all(probe.seen)  # restored ActNorms never initialize themselves again


@pytest.mark.parametrize(
    ("event", "raised", "status"), [("ctrl-c", SystemExit, "interrupted"), ("error", RuntimeError, "failed")]
)
def test_ctrl_c_ends_the_run_interrupted_and_an_exception_failed(
    event: str, raised: type[BaseException], status: str, tmp_path: Path
) -> None:
    trainer = _trainer(tmp_path, [FlowdiagCallback(tmp_path / "run", flow="flow")], max_steps=8)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from a Ctrl-C on
    try:
        with pytest.raises(raised):  # Lightning turns Ctrl-C into exit code 1 after its own clean-up
            trainer.fit(GlowModule({3: event}), _loader())
    finally:
        signal.signal(signal.SIGINT, handler)
    record = read_run(tmp_path / "run" / RUN_FILE)
    assert record.status == status and record.step.tolist() == [1, 2]


class RankOneOfTwo(SingleDeviceStrategy):
    """A strategy that says this process is global rank 1 of 2; the collectives run in a process group of
    this one process, so every reduction is this rank's own."""

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))
        self.global_rank, self.local_rank, self.world_size = 1, 1, 2


@pytest.fixture
def one_process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_rank_other_than_0_records_and_stops_but_writes_no_file(tmp_path: Path, one_process_group) -> None:
    callback = FlowdiagCallback(tmp_path / "run", init_batches=2, flow="flow")
    trainer = _trainer(tmp_path, [callback], max_steps=8, strategy=RankOneOfTwo())
    with pytest.warns(UserWarning, match=BROKEN_LAYER):
        trainer.fit(GlowModule({2: "nan"}), _loader())
    monitor = callback.monitor
    assert monitor is not None and monitor.ranks == Ranks(rank=1, world=2, local_rank=1)
    assert monitor.state.onset_layer == BROKEN_LAYER and trainer.global_step == 2
    assert not (tmp_path / "run").exists()  # rank 0 writes the run file


def test_bad_arguments_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="init_batches"):
        FlowdiagCallback(init_batches=0)
    with pytest.raises(UserError, match="flow='model'"):
        _trainer(tmp_path, [FlowdiagCallback(flow="nothing")], 1).fit(GlowModule(), _loader())
    with pytest.raises(UserError, match="gives only 32 batches"):
        _trainer(tmp_path, [FlowdiagCallback(init_batches=40, flow="flow")], 1).fit(GlowModule(), _loader())
    with pytest.raises(UserError, match="pass inputs="):
        callback = FlowdiagCallback(init_batches=2, flow="flow")
        loader = DataLoader([{"image": x} for x in torch.rand(8, 1, 8, 8)], batch_size=2)
        _trainer(tmp_path, [callback], 1).fit(GlowModule(), loader)
    assert not list(tmp_path.rglob(RUN_FILE))  # nothing written for a bad input


def test_without_lightning_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "flowdiag.integrations.lightning")
    with pytest.raises(UserError, match=r"pip install 'flowdiag\[lightning\]'"):
        importlib.import_module("flowdiag.integrations.lightning")


def test_the_lightning_example_runs_at_a_tiny_size(tmp_path: Path) -> None:
    example = load_example("lightning_glow")
    record = read_run(example.main(["--tiny", "--out", str(tmp_path)]))
    assert record.status == "completed" and record.step.tolist() == list(range(1, 7))
    assert (record.forwards == 2).all() and record.init is not None and record.total_steps == 6
    np.testing.assert_array_equal(record.bpd, record.loss)
