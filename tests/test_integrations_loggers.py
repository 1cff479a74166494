"""`Monitor(..., log_to=...)` against the real packages: a TensorBoard SummaryWriter read back from its
event file, an MLflow run in a local file store, a W&B run in offline mode; and the handful of values
they get (record/live_values.py), on a y0ast-style Glow trained at batch 2."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiag
from flowdiag.record.live_values import levels, peak_of, step_scalars
from flowdiag.record.log_mlflow import MlflowLog
from flowdiag.record.run_state import RunState, StepRecord
from flowdiag.record.store import read_run
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from tests.handwritten_flows import threaded_glow
from tests.library_flows import images
from tests.test_export import load_events, scalars


def _train(monitor: flowdiag.Monitor, steps: int, *, nan_at: int | None = None, between=None) -> None:
    """`steps` optimizer steps of the monitored y0ast-style Glow; `between(step)` runs after each."""
    model = monitor.model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        if step == nan_at:
            with torch.no_grad():
                model.flow.layers[5].invconv.log_s[0] = float("inf")
        optimizer.zero_grad()
        loss = model(images(2, size=8, seed=step))[1].mean()
        loss.backward()
        monitor.step(loss)
        optimizer.step()
        if between is not None:
            between(step)


def _peaks(run_file: Path) -> np.ndarray:
    record = read_run(run_file)
    return np.where(record.nonfinite.any(1), math.inf, np.nanmax(record.max_abs, axis=1))


def test_tensorboard_receives_each_steps_scalars_live_and_histograms_every_n(tmp_path: Path) -> None:
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    writer = tensorboard.SummaryWriter(str(tmp_path / "tb"))
    seen_live: list[int] = []

    def read_now(step: int) -> None:
        if step == 2:  # the run still going: what TensorBoard shows now
            writer.flush()
            seen_live.extend(e.step for e in load_events(tmp_path / "tb").Scalars("flowdiag/max_abs"))

    model = threaded_glow(noise=False)
    with flowdiag.Monitor(model, tmp_path / "run", log_to=writer, log_every=2) as monitor:
        _train(monitor, 5, nan_at=5, between=read_now)
    events = load_events(tmp_path / "tb")
    assert seen_live == [1, 2]
    steps, values = scalars(events, "flowdiag/max_abs")
    assert steps == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(values, _peaks(tmp_path / "run" / RUN_FILE), rtol=1e-6)
    record = read_run(tmp_path / "run" / RUN_FILE)
    nonfinite = scalars(events, "flowdiag/nonfinite_layers")[1]
    assert nonfinite.tolist() == record.nonfinite.sum(1).tolist() and nonfinite[-1] > 0 == nonfinite[:4].sum()
    np.testing.assert_allclose(scalars(events, "flowdiag/grad_norm")[1][:4], record.grad_norm[:4], rtol=1e-6)
    # Every 2 steps, and at the first non-finite one (5), per level: level0 runs at 4x4, level1 at 2x2.
    histograms = events.Histograms("flowdiag/level1/log10_max_abs")
    assert [h.step for h in histograms] == [2, 4, 5]
    assert histograms[0].histogram_value.num == len(levels(monitor.layer_pixels)[1].columns)
    text = events.Tensors("flowdiag/status/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == "diverged, first non-finite at step 5 in flow.layers.5.invconv"
    writer.close()


def test_mlflow_receives_every_steps_scalars_batched_and_the_runs_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    # The file store (MLflow's maintenance mode, allowed again by this switch): a local store without
    # the 8 s a new sqlite store spends on its migrations.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("flows"))
    monkeypatch.setattr(MlflowLog, "send_seconds", 0.0)
    seen_live: list[int] = []

    def read_now(step: int) -> None:
        if step == 2:  # sent at once (send_seconds=0): readable once MLflow's queue wrote it
            mlflow.flush_async_logging()
            seen_live.extend(m.step for m in client.get_metric_history(run.info.run_id, "flowdiag/max_abs"))

    with flowdiag.Monitor(threaded_glow(noise=False), tmp_path / "run", log_to=run, log_every=2) as monitor:
        _train(monitor, 3, between=read_now)
    assert sorted(seen_live) == [1, 2]
    history = sorted(client.get_metric_history(run.info.run_id, "flowdiag/max_abs"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    np.testing.assert_allclose([m.value for m in history], _peaks(tmp_path / "run" / RUN_FILE), rtol=1e-6)
    level0 = client.get_metric_history(run.info.run_id, "flowdiag/level0/max_abs")
    assert [m.step for m in level0] == [2]
    assert client.get_run(run.info.run_id).data.tags["flowdiag/status"] == "completed"


@pytest.mark.slow  # W&B starts its own service process: about 5 s here
def test_wandb_offline_run_receives_the_scalars_and_histograms(tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="flowdiag-test")
    try:
        with flowdiag.Monitor(
            threaded_glow(noise=False), tmp_path / "run", log_to=run, log_every=2
        ) as monitor:
            _train(monitor, 4, nan_at=4)
        summary = dict(run.summary)
    finally:
        run.finish()
    assert summary["flowdiag/step"] == 4 and summary["flowdiag/max_abs"] == math.inf
    assert summary["flowdiag/status"] == "diverged" and summary["flowdiag/nan_onset_step"] == 4
    assert summary["flowdiag/nan_onset_layer"] == "flow.layers.5.invconv"
    assert summary["flowdiag/level0/log10_max_abs"]["_type"] == "histogram"


def test_log_to_and_log_every_refuse_what_they_cannot_use(tmp_path: Path) -> None:
    model = threaded_glow(noise=False)
    with pytest.raises(UserError, match=r"takes a TensorBoard SummaryWriter, an MLflow run .* or a W&B run"):
        flowdiag.Monitor(model, tmp_path / "a", log_to=object())
    with pytest.raises(UserError, match="log_every"):
        flowdiag.Monitor(model, tmp_path / "b", log_to=[], log_every=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_handful_of_scalars_and_the_levels() -> None:
    n = 5
    record = StepRecord(
        step=7,
        loss=1.0,
        bpd=math.nan,
        penalty=math.nan,  # none given: left out
        grad_norm=2.0,
        lr=1e-3,
        max_abs=np.array([3.0, 40.0, np.nan, 5.0, np.inf]),
        logdet=np.array([-1.0, 2.0, np.nan, 0.5, np.nan]),
        nonfinite=np.array([False, False, False, False, True]),
        ran=np.array([True, True, False, True, True]),  # layer 2 did not run
    )
    values = step_scalars(record)
    assert values == {
        "flowdiag/max_abs": math.inf,
        "flowdiag/logdet_min": -1.0,
        "flowdiag/logdet_max": 2.0,
        "flowdiag/grad_norm": 2.0,
        "flowdiag/nonfinite_layers": 1.0,
    }
    finite = record._replace(nonfinite=np.zeros(n, bool), max_abs=record.max_abs.clip(max=50.0))
    assert peak_of(finite) == 50.0  # over the layers that ran
    groups = levels([16, 16, 4, None, 4])
    assert [(g.name, g.columns.tolist()) for g in groups] == [
        ("level0", [0, 1]),
        ("level1", [2, 4]),
        ("other", [3]),
    ]
    assert [g.name for g in levels([None, None])] == ["layers"]


def test_a_resumed_monitor_whose_file_opens_at_its_first_step_cuts_back_to_the_checkpoint(
    tmp_path: Path,
) -> None:
    model = threaded_glow(noise=False)
    with flowdiag.Monitor(model, tmp_path) as monitor:
        _train(monitor, 4)
    state = RunState(step=2)  # a checkpoint taken after step 2; the file went on to step 4
    with flowdiag.Monitor(model, tmp_path, state=state) as monitor:  # no writer touched before a step
        _train(monitor, 2)
    assert read_run(tmp_path / RUN_FILE).step.tolist() == [1, 2, 3, 4]


def test_the_monitor_imports_no_optional_package_nor_the_integrations() -> None:
    """record/ and every folder below it import no optional package and nothing of integrations/ at module
    level: Monitor(trial=..., log_to=...) works on the objects it is given."""
    optional = ("optuna", "lightning", "mlflow", "wandb", "tensorboard", "torch.utils.tensorboard")
    root = Path(flowdiag.__file__).parent
    found = []
    for folder in ("runtime", "settings", "glow", "adapters", "stabilize", "record"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                found += [
                    f"{path.name}: {n}"
                    for n in names
                    if n.split(".")[0] in optional or n in optional or n.startswith("flowdiag.integrations")
                ]
    assert found == []
