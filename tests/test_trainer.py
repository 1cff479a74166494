"""The instrumented trainer: HDF5 contents, NaN onset, replay, determinism, resume, the paper's effect."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdiag.glow.model import Glow, dequantize
from flowdiag.record.monitor import Monitor
from flowdiag.record.store import read_run
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import ModelConfig, RunConfig, TrainConfig
from flowdiag.train.replay import replay
from flowdiag.train.trainer import Trainer, train

SMALL_MODEL = ModelConfig(n_levels=3, n_steps=1, hidden=8)


def small_config(**train: object) -> RunConfig:
    settings = dict(
        batch_size=8, init_batches=2, steps=6, eval_every=3, eval_batches=1, flush_every=2, lr=1e-3
    )
    settings.update(train)
    return RunConfig(model=SMALL_MODEL, train=TrainConfig(**settings))


def test_hdf5_holds_every_step_and_layer(tmp_path: Path) -> None:
    config = small_config()
    result = train(config, tmp_path / "run")
    assert result.status == "completed" and result.steps == 6
    record = read_run(tmp_path / "run" / RUN_FILE)
    assert record.status == "completed" and record.nan_onset_step == -1 and record.nan_onset_layer == ""
    assert record.step.tolist() == [1, 2, 3, 4, 5, 6]
    n_layers = 3 * 1 * 3  # L levels x K steps x (actnorm, invconv, coupling)
    assert record.layer_kinds == ["actnorm", "invconv", "coupling"] * 3
    assert record.layer_names[0] == "levels.0.steps.0.actnorm"
    assert record.max_abs.shape == record.logdet.shape == record.nonfinite.shape == (6, n_layers)
    for name in ("loss", "bpd", "penalty", "grad_norm", "lr"):
        assert np.isfinite(getattr(record, name)).all(), name
    assert np.isfinite(record.max_abs).all() and not record.nonfinite.any()
    assert (record.max_abs > 0).all()
    assert record.eval_step.tolist() == [3, 6] and np.isfinite(record.eval_bpd).all()
    stored = RunConfig.from_dict(record.config)
    assert stored.train == config.train and stored.data == config.data
    assert stored.model == replace(config.model, in_channels=1, image_size=8)
    # The init figures: every ActNorm, the coupling networks' included, and M·batch·h·w values each.
    assert record.init is not None
    names = list(record.init["name"])
    assert len(names) == 3 * 3
    n_values = dict(zip(names, record.init["n_values"].tolist(), strict=True))
    assert n_values["levels.0.steps.0.actnorm"] == 2 * 8 * 4 * 4
    assert n_values["levels.2.steps.0.coupling.net.layers.1"] == 2 * 8 * 1 * 1
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "samples.png").exists()


def test_invconv_logdet_column_is_the_penalty_term(tmp_path: Path) -> None:
    train(small_config(steps=4, lam=1e-2, lr=1e-2), tmp_path / "run")
    record = read_run(tmp_path / "run" / RUN_FILE)
    convs = record.layer_index("invconv")
    # The recorded penalty is Σ over convs of the squared log-det recorded in the same step.
    assert np.allclose(
        (record.logdet[:, convs].astype(np.float64) ** 2).sum(axis=1), record.penalty, rtol=1e-4
    )
    assert record.penalty[-1] > 0


def test_layer_logdets_sum_to_model_logdet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Glow(SMALL_MODEL)
    x = dequantize(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    with Monitor(model, tmp_path, adapter="flowdiag") as monitor:
        _, logdet = model(x)
        monitor.step(logdet.mean())
    assert np.isclose(monitor.last.logdet.sum(), float(logdet.detach().mean()), rtol=1e-5)
    record = read_run(tmp_path / RUN_FILE)
    assert record.layer_names == [name for name, _ in model.flow_layers()]
    assert record.layer_pixels.tolist() == [16] * 3 + [4] * 3 + [1] * 3  # 8x8 squeezed once per level


def _inject_nan(layer_name: str, at_call: int):
    """An `instrument` hook: the named layer outputs NaN on its `at_call`-th training forward."""

    def instrument(model: Glow) -> None:
        module = dict(model.named_modules())[layer_name]
        calls = {"n": 0}

        def hook(mod: torch.nn.Module, inputs: tuple, output: tuple) -> tuple | None:
            if not mod.training:
                return None
            calls["n"] += 1
            if calls["n"] == at_call:
                z, logdet = output
                return z * float("nan"), logdet
            return None

        module.register_forward_hook(hook)

    return instrument


@pytest.mark.parametrize("layer", ["levels.1.steps.0.invconv", "levels.0.steps.0.coupling"])
def test_onset_names_the_injected_layer_and_step(tmp_path: Path, layer: str) -> None:
    result = train(small_config(steps=8), tmp_path / "run", instrument=_inject_nan(layer, at_call=4))
    assert result.status == "diverged"
    assert (result.nan_onset_step, result.nan_onset_layer) == (4, layer)
    record = read_run(tmp_path / "run" / RUN_FILE)
    assert record.status == "diverged" and record.nan_onset_step == 4 and record.nan_onset_layer == layer
    assert record.step.tolist() == [1, 2, 3, 4]  # the onset step's row is kept, nothing after it
    column = record.layer_names.index(layer)
    assert record.nonfinite[3, column] and not record.nonfinite[3, :column].any()
    assert not record.nonfinite[:3].any()
    assert (tmp_path / "run" / "replay.pt").exists()


def test_keep_going_records_the_first_onset_and_continues(tmp_path: Path) -> None:
    config = small_config(steps=8, stop_on_divergence=False)
    layer = "levels.0.steps.0.coupling"
    result = train(config, tmp_path / "run", instrument=_inject_nan(layer, at_call=3))
    assert result.status == "diverged" and result.steps == 8 and result.nan_onset_step == 3
    record = read_run(tmp_path / "run" / RUN_FILE)
    assert len(record.step) == 8 and np.isfinite(record.loss[3:]).all()  # the NaN update was skipped


def test_same_seed_gives_identical_records(tmp_path: Path) -> None:
    a = read_run(train(small_config(), tmp_path / "a").h5_path)
    b = read_run(train(small_config(), tmp_path / "b").h5_path)
    c = read_run(train(small_config(seed=1), tmp_path / "c").h5_path)
    for name in ("loss", "bpd", "grad_norm", "max_abs", "logdet", "eval_bpd"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.loss, c.loss)


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    straight = read_run(train(small_config(steps=8, checkpoint_every=4), tmp_path / "straight").h5_path)
    first = train(small_config(steps=4, checkpoint_every=4), tmp_path / "resumed")
    assert first.status == "completed"
    resumed = train(small_config(steps=8, checkpoint_every=4), tmp_path / "resumed", resume=True)
    assert resumed.status == "completed" and resumed.steps == 8
    record = read_run(tmp_path / "resumed" / RUN_FILE)
    assert record.step.tolist() == list(range(1, 9))
    # Same batches, same noise, same weights: the resumed run is the uninterrupted one.
    assert np.allclose(record.loss, straight.loss, rtol=1e-5)


def test_diagnostics_off_records_scalars_only(tmp_path: Path) -> None:
    result = train(small_config(diagnostics=False), tmp_path / "run")
    record = read_run(result.h5_path)
    assert np.isfinite(record.loss).all() and np.isnan(record.max_abs).all()


def test_paper_effect_on_digits(tmp_path: Path) -> None:
    """Fig. 4/5 on the embedded digits: batch 1, M = 1 blows up; M = 256 trains with finite records."""
    base = RunConfig(
        train=TrainConfig(batch_size=1, steps=8, lr=1e-5, lam=1e-3, eval_every=0, eval_batches=1)
    )
    standard = train(replace(base, train=replace(base.train, init_batches=1)), tmp_path / "m1")
    assert standard.status == "diverged" or standard.step2_peak >= 1e6
    assert standard.early_peak >= 1e6
    cumulative = train(replace(base, train=replace(base.train, init_batches=256)), tmp_path / "m256")
    assert cumulative.status == "completed"
    record = read_run(cumulative.h5_path)
    assert np.isfinite(record.max_abs).all() and record.max_abs.max() < 1e3
    assert record.init is not None and record.init["n_values"].min() == 256  # 256 · 1 · 1x1 at level 3


def test_replay_reproduces_the_recorded_loss(tmp_path: Path) -> None:
    config = RunConfig(train=TrainConfig(batch_size=1, init_batches=1, steps=5, lr=1e-5))
    result = train(config, tmp_path / "run")
    assert result.status == "diverged"
    report = replay(tmp_path / "run")
    assert report.step == result.nan_onset_step and report.onset_layer == result.nan_onset_layer
    assert report.loss_reproduced, (report.recorded_loss, report.replayed_loss)
    recorded = read_run(result.h5_path).loss[-1]
    assert report.replayed_loss == recorded
    if result.nan_onset_layer == "backward":
        assert report.backward_error  # anomaly mode names the backward function


def test_replay_names_the_first_non_finite_forward_op(tmp_path: Path) -> None:
    layer = "levels.1.steps.0.actnorm"

    def poison(model: Glow) -> None:
        with torch.no_grad():
            model.get_submodule(layer).log_scale.fill_(100.0)  # exp(100) overflows float32

    trainer = Trainer(small_config(steps=3), tmp_path / "run")
    trainer.open()
    poison(trainer.model)
    onset = trainer.one_step()
    assert trainer.monitor.close() == "diverged"
    assert onset == layer
    report = replay(tmp_path / "run")
    assert report.first_op in {"exp", "mul", "add"} and report.first_op_module == layer
    assert report.first_op_inputs_finite


def test_config_json_is_complete(tmp_path: Path) -> None:
    config = small_config(lam=3e-4, init_batches=3, seed=7)
    record = read_run(train(config, tmp_path / "run").h5_path)
    raw = json.loads(json.dumps(record.config))
    assert raw["train"]["lam"] == 3e-4 and raw["train"]["init_batches"] == 3 and raw["train"]["seed"] == 7
    assert raw["train"]["batch_size"] == 8 and raw["data"]["dataset"] == "digits"


def test_resume_after_a_keep_going_onset_keeps_the_onset(tmp_path: Path) -> None:
    layer = "levels.0.steps.0.coupling"
    config = small_config(steps=4, stop_on_divergence=False, checkpoint_every=4)
    first = train(config, tmp_path / "run", instrument=_inject_nan(layer, at_call=2))
    assert (first.status, first.nan_onset_step) == ("diverged", 2)
    resumed = train(small_config(steps=8, stop_on_divergence=False), tmp_path / "run", resume=True)
    assert (resumed.status, resumed.nan_onset_step, resumed.nan_onset_layer) == ("diverged", 2, layer)
    assert resumed.early_peak == first.early_peak and resumed.steps == 8
    record = read_run(tmp_path / "run" / RUN_FILE)
    assert (record.status, record.nan_onset_step, record.nan_onset_layer) == ("diverged", 2, layer)
    assert record.step.tolist() == list(range(1, 9)) and record.nonfinite[1].any()


def test_early_stop_evaluates_each_step_once(tmp_path: Path) -> None:
    # lr so high that held-out bpd stops improving quickly: the early stop must fire before step 60.
    result = train(small_config(steps=60, eval_every=1, early_stop=1, lr=0.5), tmp_path / "run")
    record = read_run(result.h5_path)
    assert result.steps < 60
    assert np.all(np.diff(record.eval_step) > 0)
    assert record.eval_step[-1] == result.steps


def test_warmup_ramps_the_learning_rate(tmp_path: Path) -> None:
    record = read_run(train(small_config(steps=6, warmup=4, lr=1e-3), tmp_path / "run").h5_path)
    assert np.allclose(record.lr, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_grad_clip_bounds_the_gradient(tmp_path: Path) -> None:
    def after_one_step(clip: float, name: str) -> tuple[float, float]:
        trainer = Trainer(small_config(steps=1, grad_clip=clip), tmp_path / name)
        trainer.open()
        trainer.one_step()
        trainer.monitor.close()
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)), trainer.monitor.last.grad_norm

    clipped, recorded = after_one_step(1e-3, "clipped")
    assert clipped <= 1e-3 * (1 + 1e-4) < recorded  # the record keeps the norm before clipping
    free, _ = after_one_step(0.0, "free")
    assert free == pytest.approx(recorded, rel=1e-5)  # same seed and batch, nothing clipped


def test_epochs_set_the_budget(tmp_path: Path) -> None:
    trainer = Trainer(small_config(steps=1000, epochs=1, batch_size=400, eval_every=0), tmp_path / "run")
    expected = -(-len(trainer.data.train) // 400)
    result = trainer.run()
    assert result.steps == expected == read_run(result.h5_path).total_steps


@pytest.mark.slow
def test_compile_gives_the_eager_loss_and_records_every_layer(tmp_path: Path) -> None:
    tiny = ModelConfig(n_levels=1, n_steps=1, hidden=4)
    config = RunConfig(model=tiny, train=TrainConfig(batch_size=4, steps=3, eval_every=0, eval_batches=1))
    eager = read_run(train(config, tmp_path / "eager").h5_path)
    compiled_config = replace(config, train=replace(config.train, compile=True))
    compiled = read_run(train(compiled_config, tmp_path / "compiled").h5_path)
    assert np.allclose(compiled.loss, eager.loss, rtol=1e-5, atol=0)
    assert compiled.max_abs.shape == eager.max_abs.shape and np.isfinite(compiled.max_abs).all()
    assert np.allclose(compiled.max_abs, eager.max_abs, rtol=1e-4)
