"""`Monitor` on a library's flow: the record, the onset, the report's diagnosis, and the fix.

The scenario is the one users meet: a normflows multiscale Glow trained at batch 1, whose deepest
ActNorms initialize themselves from one value per channel and turn the model to NaN at once.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiag
from flowdiag.record.store import read_run
from flowdiag.report import build_report, collect_runs, diagnose
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "normflows_glow.py"


@pytest.fixture(scope="module")
def example():
    """examples/normflows_glow.py, the script users copy, imported as a module."""
    spec = importlib.util.spec_from_file_location("normflows_glow_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_normflows_batch_1_onset_is_an_actnorm_and_the_diagnosis_names_the_fix(
    example, tmp_path: Path
) -> None:
    model = example.build_model()
    onset = example.train(model, steps=5, out_dir=str(tmp_path / "m1"))
    record = read_run(tmp_path / "m1" / RUN_FILE)
    assert record.status == "diverged" and onset == record.nan_onset_layer
    assert 1 <= record.nan_onset_step <= 2
    assert record.layer_kinds[record.layer_names.index(onset)] == "actnorm"
    d = diagnose(record)
    assert d is not None and d.rule == "actnorm_self_init"
    assert f"ActNorm {onset}" in d.cause and "flowdiag.cumulative_init" in d.cause
    summary = build_report([record], tmp_path / "report", title="normflows", max_layer_maps=1)
    assert "flowdiag.cumulative_init" in summary.markdown.read_text(encoding="utf-8")


def test_normflows_with_cumulative_init_trains_200_steps_finite(example, tmp_path: Path) -> None:
    model = example.build_model()
    assert example.train(model, steps=200, fix=True, out_dir=str(tmp_path / "m256")) is None
    record = read_run(tmp_path / "m256" / RUN_FILE)
    assert record.status == "completed" and record.nan_onset_step == -1 and len(record.step) == 200
    assert np.isfinite(record.loss).all() and np.isfinite(record.grad_norm).all()
    assert np.isfinite(record.max_abs).all() and not record.nonfinite.any()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_monitor_record_matches_the_library_forward(example, tmp_path: Path) -> None:
    model = example.build_model()
    flowdiag.cumulative_init(model, example.minibatches(4, batch_size=4))
    x = example.minibatches(1, batch_size=4, seed=3)[0]
    with flowdiag.Monitor(model, tmp_path) as monitor:
        loss = model.forward_kld(x)
        loss.backward()
        assert monitor.step(loss) is None
        _, log_q = model.inverse_and_log_det(x)  # normflows' own total log-det, data -> latent
    assert monitor.last.logdet.sum() == pytest.approx(float(log_q.detach().mean()), rel=1e-4)
    assert monitor.last.loss == pytest.approx(float(loss.detach()))
    assert math.isfinite(monitor.last.grad_norm) and monitor.last.grad_norm > 0
    record = read_run(tmp_path / RUN_FILE)
    assert record.layer_names == monitor.layer_names and record.layer_kinds == monitor.layer_kinds
    assert record.status == "completed" and record.phase == "train"
    flow = [i for i, kind in enumerate(record.layer_kinds) if kind != "other"]
    assert (record.layer_pixels[flow] > 0).all()  # every flow layer's h·w, seen in the forward


def test_monitor_statuses_on_exceptions(example, tmp_path: Path) -> None:
    model = example.build_model()
    with pytest.raises(ValueError), flowdiag.Monitor(model, tmp_path / "failed"):
        raise ValueError("a bug in the loop")
    assert read_run(tmp_path / "failed" / RUN_FILE).status == "failed"
    with pytest.raises(KeyboardInterrupt), flowdiag.Monitor(model, tmp_path / "stopped"):
        raise KeyboardInterrupt
    assert read_run(tmp_path / "stopped" / RUN_FILE).status == "interrupted"


def test_monitor_refuses_what_it_cannot_watch(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no recognizable flow layers") as error:
        flowdiag.Monitor(torch.nn.Linear(2, 2), tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="unknown adapter"):
        flowdiag.Monitor(torch.nn.Linear(2, 2), tmp_path, adapter="tensorflow")
    assert not (tmp_path / RUN_FILE).exists()


def test_normflows_runs_form_a_report_grid(example, tmp_path: Path) -> None:
    for fix in (False, True):
        example.train(example.build_model(), steps=3, fix=fix, out_dir=str(tmp_path / f"fix{fix}"))
    runs = collect_runs(tmp_path)
    summary = build_report(runs, tmp_path / "report", title="normflows M=1 vs M=256", max_layer_maps=2)
    assert [(c.key.init_batches, c.n_diverged) for c in summary.cells] == [(1, 1), (256, 0)]
