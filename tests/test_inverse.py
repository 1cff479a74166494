"""The inverse record: sampling and reconstruction per evaluation, conv conditioning, the precision axis,
and the diagnoses that read them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowdiag.cli import app
from flowdiag.glow.model import Glow, dequantize
from flowdiag.record.inverse_check import check_inverse, conv_condition
from flowdiag.record.store import read_run
from flowdiag.report import diagnose
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import ModelConfig, RunConfig, TrainConfig
from flowdiag.train import precision as precision_module
from flowdiag.train.trainer import train

SMALL = ModelConfig(n_levels=2, n_steps=1, hidden=8, conv="plain")


def _with_condition(cond: float, channels: int) -> torch.Tensor:
    """A random rotation times diag(1, ..., 1, 1/cond): condition number `cond`, |det| = 1/cond."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))
    singular = torch.ones(channels, dtype=torch.float64)
    singular[-1] = 1.0 / cond
    return (q * singular).float()


def _set_first_conv(cond: float):
    def instrument(model: Glow) -> None:
        conv = model.inv_convs()[0][1]
        with torch.no_grad():
            conv.w.copy_(_with_condition(cond, conv.channels))

    return instrument


def test_train_writes_the_inverse_record_at_every_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--steps", "60", "--eval-every", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = read_run(out / "run.h5")
    inv, n = record.inverse, len(record.layer_names)
    assert inv.step.tolist() == [20, 40, 60]
    assert inv.max_abs.shape == inv.nonfinite.shape == (3, n)
    assert np.isfinite(inv.max_abs).all() and not inv.nonfinite.any()
    assert np.isfinite(inv.recon_error).all() and (inv.recon_error < 1e-4).all()
    assert (inv.nonfinite_samples == 0).all() and inv.onset_step == -1
    convs = [
        name for name, kind in zip(record.layer_names, record.layer_kinds, strict=True) if kind == "invconv"
    ]
    assert inv.conv_names == convs
    assert inv.conv_cond.shape == inv.conv_logabsdet.shape == (3, len(convs))
    assert np.isfinite(inv.conv_cond).all() and (inv.conv_cond >= 1).all()
    assert diagnose(record) is None  # a healthy run


def test_conv_condition_number_is_recorded(tmp_path: Path) -> None:
    config = RunConfig(model=SMALL, train=TrainConfig(batch_size=8, steps=1, eval_every=1, lr=1e-12))
    result = train(config, tmp_path / "run", instrument=_set_first_conv(50.0))
    inv = read_run(result.h5_path).inverse
    assert inv.conv_cond[0, 0] == pytest.approx(50.0, rel=1e-4)
    assert inv.conv_logabsdet[0, 0] == pytest.approx(-math.log(50.0), rel=1e-4)
    assert conv_condition(_with_condition(7.0, 5)) == pytest.approx((-math.log(7.0), 7.0), rel=1e-5)


def test_a_near_singular_conv_breaks_invertibility_and_the_diagnosis_says_so(tmp_path: Path) -> None:
    config = RunConfig(model=SMALL, train=TrainConfig(batch_size=8, steps=2, eval_every=1, lr=1e-12))
    result = train(config, tmp_path / "run", instrument=_set_first_conv(1e8))
    assert result.status == "completed"  # every forward pass finite
    record = read_run(result.h5_path)
    assert (record.inverse.recon_error > 1e-3).all()
    d = diagnose(record)
    assert d is not None and d.severity == "invertibility" and d.rule == "inverse_failure"
    assert d.facts.inverse_failure is not None and d.facts.inverse_failure.step == 1
    assert "levels.0.steps.0.invconv had the largest condition number" in d.cause
    assert "--lam" in d.cause


def test_check_inverse_names_the_first_non_finite_layer_of_the_inverse() -> None:
    model = Glow(SMALL)
    x = dequantize(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    from flowdiag.stabilize.cumulative_init import cumulative_init

    cumulative_init(model, [x])
    with torch.no_grad():
        model.levels[1].steps[0].actnorm.log_scale.fill_(-200.0)  # exp(200) in the inverse: inf
    check = check_inverse(model, x, temperature=0.7, seed=0)
    assert check.onset_layer == "levels.1.steps.0.actnorm"
    assert check.nonfinite[[name for name, _ in model.flow_layers()].index(check.onset_layer)]
    assert check.nonfinite_samples == 1.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_cpu(tmp_path: Path, precision: str) -> None:
    config = RunConfig(
        model=SMALL, train=TrainConfig(batch_size=8, steps=4, eval_every=2, precision=precision)
    )
    result = train(config, tmp_path / precision)
    assert result.status == "completed"
    record = read_run(result.h5_path)
    assert np.isfinite(record.loss).all() and record.config["train"]["precision"] == precision


def test_fp16_overflow_is_named_as_such(tmp_path: Path) -> None:
    layer = "levels.0.steps.0.invconv"

    def blow_up(model: Glow) -> None:
        calls = {"n": 0}

        def hook(module: torch.nn.Module, inputs: tuple, output: tuple) -> tuple | None:
            if module.training:
                calls["n"] += 1
                if calls["n"] == 2:  # float16 holds at most 65504: this is inf
                    return output[0] * 1e6, output[1]
            return None

        model.get_submodule(layer).register_forward_hook(hook)

    config = RunConfig(model=SMALL, train=TrainConfig(batch_size=8, steps=4, precision="fp16"))
    result = train(config, tmp_path / "run", instrument=blow_up)
    assert (result.status, result.nan_onset_step, result.nan_onset_layer) == ("diverged", 2, layer)
    d = diagnose(read_run(result.h5_path))
    assert d is not None and d.rule == "format_overflow"
    assert f"{layer} overflowed float16 at step 2" in d.cause and "65504" in d.cause
    assert "--precision bf16" in d.cause


def test_unsupported_precision_is_one_line_naming_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: torch.device, precision: str):
        raise RuntimeError("no float16 kernels here")

    monkeypatch.setattr(precision_module, "autocast", broken)
    with pytest.raises(
        UserError, match=r"^--precision fp16: this cpu cannot compute in float16; use --precision bf16$"
    ):
        precision_module.check_supported(torch.device("cpu"), "fp16")


def test_report_shows_the_inverse_and_failures_against_lambda(tmp_path: Path) -> None:
    from flowdiag.report import build_report, collect_runs
    from flowdiag.report.inverse_curves import FailureRate, failure_rates, inverse_curves

    for lam, cond in ((0.0, 1e8), (1e-3, 2.0)):
        train_config = TrainConfig(batch_size=8, steps=2, eval_every=1, lr=1e-12, lam=lam)
        train(
            RunConfig(model=SMALL, train=train_config),
            tmp_path / "runs" / f"lam{lam:g}",
            instrument=_set_first_conv(cond),
        )
    runs = collect_runs(tmp_path / "runs")
    assert failure_rates(runs) == [
        FailureRate(0.0, 1, 0, 1, ("inverse",)),
        FailureRate(1e-3, 1, 0, 0, ("ok",)),
    ]
    curves = inverse_curves(runs[0], "r")
    np.testing.assert_array_equal(curves.recon_error, runs[0].inverse.recon_error)
    np.testing.assert_array_equal(curves.conv_cond, runs[0].inverse.conv_cond)
    summary = build_report(runs, tmp_path / "report", title="inverse", max_layer_maps=2)
    assert {"invertibility.png", "inverse_layers.png", "failures.png"} <= {p.name for p in summary.figures}
    md = summary.markdown.read_text(encoding="utf-8")
    assert "1 completed run(s) lost invertibility." in md and "## The inverse" in md
    assert [d.severity for _, d in summary.diagnoses] == ["invertibility"]
