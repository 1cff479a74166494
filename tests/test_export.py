"""`flowdiag export --tensorboard`: the event files read back with TensorBoard's own reader hold the HDF5
values (NaN and inf kept), the histograms, the diagnosis and the hparams; nothing is overwritten silently."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from flowdiag.cli.export import export_command
from flowdiag.record.store import RunWriter, read_run
from flowdiag.report.export import INSTALL_TENSORBOARD, export_tensorboard, run_hparams
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import DataConfig, ModelConfig, RunConfig, TrainConfig

NAMES = [f"levels.{lv}.steps.0.{kind}" for lv in range(2) for kind in ("actnorm", "invconv", "coupling")]
KINDS = [name.rsplit(".", 1)[1] for name in NAMES]
ONSET, ONSET_LAYER = 6, NAMES[2]
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def write_run(run_dir: Path, *, steps: int = 10, onset: int = -1, m: int = 1, lam: float = 0.0) -> Path:
    """A run whose values differ per step and layer; at `onset` the onset layer is inf, the later ones
    NaN, and the loss NaN, as the trainer records a divergence."""
    config = RunConfig(
        model=ModelConfig(coupling="affine"),
        data=DataConfig(dataset="digits"),
        train=TrainConfig(steps=steps, init_batches=m, lam=lam, batch_size=2, seed=3, lr=5e-4),
    )
    writer = RunWriter(
        run_dir / "run.h5", config_json=config.to_json(), version="test",
        layer_names=NAMES, layer_kinds=KINDS, total_steps=steps, flush_every=4,
    )  # fmt: skip
    writer.set_phase("train")
    j = np.arange(len(NAMES))
    for step in range(1, steps + 1):
        max_abs = ((1.0 + j) * 10.0 ** (0.3 * step)).astype(np.float32)
        logdet = (0.5 * (j + 1) * step - 3.0).astype(np.float32)
        bpd = 6.0 - 0.1 * step
        if step == onset:
            k = NAMES.index(ONSET_LAYER)
            max_abs[k], max_abs[k + 1 :], logdet[k + 1 :], bpd = np.inf, np.nan, np.nan, math.nan
        writer.append_step(
            step, loss=bpd, bpd=bpd, penalty=0.01 * step, grad_norm=2.0 * step, lr=1e-4 * step,
            max_abs=max_abs, logdet=logdet, nonfinite=~np.isfinite(max_abs),
        )  # fmt: skip
        if step % 3 == 0:
            writer.append_eval(step, 5.0 - 0.05 * step)
        if step == onset:
            writer.set_status("diverged", onset_step=step, onset_layer=ONSET_LAYER)
            break
    writer.close("completed" if writer.status == "running" else None)
    return run_dir / "run.h5"


def load_events(event_dir: Path) -> Any:
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    guidance = dict.fromkeys(accumulator_module.DEFAULT_SIZE_GUIDANCE, 0)  # 0: keep every event
    accumulator = accumulator_module.EventAccumulator(str(event_dir), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def scalars(events: Any, tag: str) -> tuple[list[int], np.ndarray]:
    found = events.Scalars(tag)
    return [e.step for e in found], np.array([e.value for e in found])


def hparams(events: Any) -> dict[str, Any]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def cli(*args: str) -> typer.testing.Result:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so that the command is named as in the real app
    app.command("export")(export_command)
    return CliRunner().invoke(app, ["export", *args], env=ENV)


def assert_same(found: np.ndarray, expected: np.ndarray) -> None:
    # TensorBoard keeps scalars as float32; NaN must come back as NaN and inf as inf.
    np.testing.assert_array_equal(found, np.asarray(expected, dtype=np.float32))


def test_event_files_hold_the_runs_values(tmp_path: Path) -> None:
    record = read_run(write_run(tmp_path / "runs" / "M1-lam0", onset=ONSET))
    [run] = export_tensorboard(tmp_path / "runs" / "M1-lam0", tmp_path / "tb")
    assert run.event_dir == tmp_path / "tb" / "M1-lam0" and run.steps == ONSET
    events = load_events(run.event_dir)

    for name in ("loss", "bpd", "penalty", "grad_norm", "lr"):
        steps, values = scalars(events, f"train/{name}")
        assert steps == list(record.step)
        assert_same(values, getattr(record, name))
    assert math.isnan(scalars(events, "train/bpd")[1][-1])  # the onset's NaN loss
    steps, values = scalars(events, "eval/bpd")
    assert steps == list(record.eval_step)
    assert_same(values, record.eval_bpd)
    for j, layer in enumerate(NAMES):
        for series in ("max_abs", "logdet"):
            steps, values = scalars(events, f"layers/{series}/{layer}")
            assert steps == list(record.step)
            assert_same(values, getattr(record, series)[:, j])
    assert scalars(events, f"layers/max_abs/{ONSET_LAYER}")[1][-1] == np.inf
    assert np.isnan(scalars(events, f"layers/max_abs/{NAMES[-1]}")[1][-1])

    histograms = events.Histograms("layers/log10_max_abs")
    assert [h.step for h in histograms] == list(record.step)
    assert [h.histogram_value.num for h in histograms[-2:]] == [len(NAMES), NAMES.index(ONSET_LAYER)]
    top = histograms[0].histogram_value.max
    assert top == pytest.approx(math.log10(float(record.max_abs[0].max())), rel=1e-6)

    texts = {
        tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
    }
    assert f"step {ONSET}, layer {ONSET_LAYER}" in texts["onset/text_summary"]
    assert (
        "likely cause:" in texts["diagnosis/text_summary"] and "diverged" in texts["diagnosis/text_summary"]
    )

    found = hparams(events)
    assert found["M"] == 1 and found["lam"] == 0.0 and found["batch_size"] == 2 and found["seed"] == 3
    assert (
        found["lr"] == pytest.approx(5e-4) and found["coupling"] == "affine" and found["dataset"] == "digits"
    )
    assert found["status"] == "diverged"
    assert scalars(events, "outcome/diverged")[1].tolist() == [1.0]
    assert scalars(events, "outcome/onset_step")[1].tolist() == [ONSET]
    assert scalars(events, "outcome/best_eval_bpd")[1][0] == pytest.approx(5.0 - 0.05 * 6)


def test_an_ablation_folder_gives_one_event_directory_per_run(tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    write_run(out / "runs" / "M1-lam0-b2-seed3", onset=ONSET)
    write_run(out / "runs" / "M4-lam0.01-b2-seed3", m=4, lam=0.01)
    write_run(out / ".stale" / "M1-lam0-b2-seed3-before-trial2", onset=2)
    result = cli(str(out), "--tensorboard", str(tmp_path / "tb"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["M1-lam0-b2-seed3", "M4-lam0.01-b2-seed3"]
    assert "tensorboard --logdir" in result.output
    completed = load_events(tmp_path / "tb" / "M4-lam0.01-b2-seed3")
    assert hparams(completed)["M"] == 4 and hparams(completed)["lam"] == pytest.approx(0.01)
    assert scalars(completed, "outcome/diverged")[1].tolist() == [0.0]
    assert scalars(completed, "outcome/onset_step")[1].tolist() == [-1.0]


def test_existing_events_are_replaced_only_with_overwrite(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    args = (str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"))
    assert cli(*args).exit_code == 0
    first = sorted((tmp_path / "tb" / "run").iterdir())
    refused = cli(*args)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert sorted((tmp_path / "tb" / "run").iterdir()) == first
    replaced = cli(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    now = sorted((tmp_path / "tb" / "run").iterdir())
    assert len(now) == len(first) and not set(now) & set(first)  # the old files are gone
    assert len(load_events(tmp_path / "tb" / "run").Scalars("train/bpd")) == 10  # not doubled


def test_missing_tensorboard_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run(tmp_path / "run")
    for name in ("tensorboard", "tensorboard.compat.proto.event_pb2"):
        monkeypatch.setitem(sys.modules, name, None)  # None: the import fails, as without the package
    with pytest.raises(UserError, match=INSTALL_TENSORBOARD.replace("[", r"\[").replace("]", r"\]")):
        export_tensorboard(tmp_path / "run", tmp_path / "tb")
    result = cli(str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "pip install 'flowdiag[tensorboard]'" in result.output
    assert not (tmp_path / "tb").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.h5").write_bytes(b"not an hdf5 file" * 100)
    write_run(tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "run").write_text("a file where the run's event folder would go")
    cases = {
        (str(tmp_path / "nowhere"), "--tensorboard", str(tmp_path / "tb")): "does not exist",
        (str(tmp_path / "empty"), "--tensorboard", str(tmp_path / "tb")): "no run.h5 found",
        (str(tmp_path / "corrupt.h5"), "--tensorboard", str(tmp_path / "tb")): "truncated or corrupt",
        (str(tmp_path / "run"),): "--tensorboard DIR",
        (str(tmp_path / "run"), "--tensorboard", str(tmp_path / "taken")): "is not a folder",
    }
    for args, message in cases.items():
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / "tb").exists()


def test_hparams_give_every_run_the_same_columns(tmp_path: Path) -> None:
    # TensorBoard takes the HParams columns from one run: a partial config must not drop any, nor
    # have a default invented for what it does not hold.
    head = read_run(write_run(tmp_path / "run")).head
    partial = head._replace(config={"train": {"init_batches": 4}})
    assert run_hparams(partial).keys() == run_hparams(head).keys()
    assert run_hparams(partial)["M"] == 4 and run_hparams(partial)["coupling"] == "not given"
    assert run_hparams(head._replace(config={}))["lam"] == "not given"
    assert run_hparams(head)["epochs"] == 0  # None: the run was set by steps


# --- long runs: global scalars at every step, per-layer series pooled over a stride ----------------


def long_run(path: Path, steps: int, spike: int, onset: int) -> Path:
    """Three layers over two levels, calm but for a one-step spike (layer 2) and a NaN onset (layer 1)."""
    writer = RunWriter(
        path, config_json=RunConfig().to_json(), version="test", layer_names=NAMES[:3], layer_kinds=KINDS[:3],
        layer_pixels=[16, 16, 4], start_time=1.6e9,
    )  # fmt: skip
    step = np.arange(1, steps + 1)
    max_abs = np.ones((steps, 3), np.float32) + np.arange(3, dtype=np.float32)
    max_abs[spike - 1, 2], max_abs[onset - 1, 1] = 1e6, np.nan
    nonfinite = ~np.isfinite(max_abs)
    flat, ones = np.full(steps, 2.0), np.ones(steps)
    writer.append_steps(
        step, loss=flat, bpd=flat, penalty=0 * ones, grad_norm=ones, lr=1e-3 * ones, max_abs=max_abs,
        logdet=np.zeros((steps, 3)), nonfinite=nonfinite, wall_time=step * 2.0,
    )  # fmt: skip
    writer.set_status("diverged", onset_step=onset, onset_layer=NAMES[1])
    writer.close()
    return path


def test_a_long_run_exports_every_step_and_pools_the_layers_without_losing_an_event(tmp_path: Path) -> None:
    steps, stride, spike, onset = 6_000, 50, 3_333, 5_432
    long_run(tmp_path / "run" / "run.h5", steps, spike, onset)
    told: list[tuple[str, int, int]] = []
    [run] = export_tensorboard(
        tmp_path / "run", tmp_path / "tb", stride=stride, progress=lambda *args: told.append(args)
    )
    assert run.stride == stride and run.steps == steps
    assert told[-1] == ("run", steps, steps) and [t[1] for t in told] == sorted(t[1] for t in told)
    events = load_events(run.event_dir)
    steps_seen, peaks = scalars(events, "train/max_abs")  # the largest |output| over all layers
    assert steps_seen == list(range(1, steps + 1))
    assert peaks[spike - 1] == 1e6 and math.isnan(peaks[onset - 1]) and peaks[0] == 3.0
    assert events.Scalars("train/bpd")[-1].wall_time == pytest.approx(1.6e9 + 2.0 * steps)
    pooled_steps, spiked = scalars(events, f"layers/max_abs/{NAMES[2]}")
    assert pooled_steps == list(range(stride, steps + 1, stride))  # each window at its last step
    window = (spike - 1) // stride
    assert spiked[window] == 1e6 and (np.delete(spiked, window) == 3.0).all()
    _, flagged = scalars(events, f"layers/max_abs/{NAMES[1]}")
    assert (
        math.isnan(flagged[(onset - 1) // stride])
        and np.isfinite(np.delete(flagged, (onset - 1) // stride)).all()
    )
    tags = events.Tags()["histograms"]
    # All layers, and per level (h·w 16 and 4: 4x4 and 2x2).
    assert sorted(tags) == ["layers/log10_max_abs", "layers/log10_max_abs/2x2", "layers/log10_max_abs/4x4"]
    assert 0 < len(events.Histograms("layers/log10_max_abs")) <= 500


def test_the_automatic_stride_keeps_a_paper_length_run_small_and_a_short_one_whole() -> None:
    from flowdiag.bench.scale import layer_layout
    from flowdiag.report.export_events import LAYER_BUDGET_BYTES, auto_stride

    names = layer_layout(288)[0]
    stride = auto_stride(300_000, names)
    per_row = sum(2 * (len(f"layers/max_abs/{n}") + 12) for n in names)
    assert (
        math.ceil(300_000 / stride) * per_row
        <= LAYER_BUDGET_BYTES
        < math.ceil(300_000 / (stride - 1)) * per_row
    )
    assert auto_stride(2_000, layer_layout(36)[0]) == 1


def test_the_event_files_crc_is_tensorboards_crc32c() -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from flowdiag.report.event_file import crc32c, masked

    assert int(crc32c([b"123456789"])[0]) == 0xE3069283  # CRC-32C's check value
    rng = np.random.default_rng(0)
    records = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 700, 60)]
    assert [int(m) for m in masked(crc32c(records))] == [masked_crc32c(r) for r in records]
