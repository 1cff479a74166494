"""`flowdiag bench`'s parts with tiny budgets: each runs, returns what it was asked for (modes, rounds,
workers, bytes a row takes, the command it timed) and prints it in its table. Timings are never
asserted: speed belongs to the bench itself, not to the tests."""

from __future__ import annotations

import math
import resource
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from flowdiag.bench import library, small_grid, tables
from flowdiag.bench.competition import measure_competition
from flowdiag.bench.parts import PARTS, parse_parts
from flowdiag.bench.results import (
    HOOKS,
    HOOKS_HDF5,
    MODES,
    NO_HOOKS,
    CommandCost,
    InitCost,
    ModeTiming,
    ScaleResult,
    StepTiming,
    WorkersResult,
    WriteCost,
)
from flowdiag.bench.small_grid import GridJob, passthrough_args, time_grid
from flowdiag.bench.steps import open_trainer, step_times, time_steps
from flowdiag.bench.sync_check import check_syncs, classify_syncs
from flowdiag.bench.workers import worker_startup
from flowdiag.record.store import read_head, read_run
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import ModelConfig, RunConfig, TrainConfig
from flowdiag.train.data import ImageData, load_dataset

TINY = RunConfig(
    model=ModelConfig(n_levels=3, n_steps=1, hidden=8),
    train=TrainConfig(batch_size=4, init_batches=2, device="cpu"),
)
# A grid that costs nothing: the command the bench times, swapped for a Python that exits at once.
INSTANT_GRID = GridJob(steps=1, args=(), program=(sys.executable, "-c", "pass"))


@pytest.fixture(scope="module")
def data() -> ImageData:
    return load_dataset(TINY.data)


@pytest.fixture(scope="module")
def config(data: ImageData) -> RunConfig:
    return replace(TINY, model=replace(TINY.model, in_channels=data.channels, image_size=data.image_size))


def _render(table: object) -> str:
    console = Console(width=200, record=True, no_color=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _columns_in(text: str, *columns: str) -> None:
    for column in columns:
        assert column in text, f"column {column!r} missing from:\n{text}"


def test_parts_parse_in_order_and_a_bad_name_is_one_line() -> None:
    assert parse_parts("all") == PARTS
    assert parse_parts("library, steps") == ("steps", "library")
    with pytest.raises(UserError) as error:
        parse_parts("steps,speed")
    assert "'speed'" in str(error.value) and "\n" not in str(error.value)


def test_steps_three_modes_with_overheads_and_hdf5_bytes(
    config: RunConfig, data: ImageData, tmp_path: Path
) -> None:
    steps = time_steps(config, data, steps=2, blocks=2, workdir=tmp_path)
    assert [m.mode for m in steps.modes] == list(MODES)
    for mode in MODES:
        timing = steps.timing(mode)
        assert len(timing.times_s) == 4 and len(timing.round_medians_s) == 2  # 2 steps × 2 rounds
    assert steps.overhead_percent(NO_HOOKS) == 0.0
    # A row's bytes: step, wall time and five scalars (8 each), forwards (4), and per layer max |output|
    # and log-det (4 each), the non-finite and ran flags (1 each): the model's layers, read back.
    run_file = next(tmp_path.rglob(RUN_FILE))
    assert steps.hdf5_bytes_per_step == 7 * 8 + 4 + 10 * len(read_head(run_file).layer_names)
    _columns_in(
        _render(tables.steps_table(steps)),
        "mode",
        "median step",
        "overhead",
        "HDF5 bytes/step",
        NO_HOOKS,
        HOOKS_HDF5,
    )


def test_overheads_are_paired_within_rounds() -> None:
    # Round 2 ran in a process twice as slow: pooled medians would mix that into the overhead.
    base = ModeTiming(NO_HOOKS, (10.0, 10.0, 20.0, 20.0, 30.0), (10.0, 20.0, 30.0))
    hooks = ModeTiming(HOOKS, (10.1, 10.1, 20.2, 20.2, 20.2), (10.1, 20.2, 30.6))
    steps = StepTiming((base, hooks, ModeTiming(HOOKS_HDF5, base.times_s, base.round_medians_s)), math.nan)
    assert steps.round_overheads(HOOKS) == pytest.approx([1.0, 1.0, 2.0])
    assert steps.overhead_percent(HOOKS) == pytest.approx(1.0)
    assert "+1.0 % (+1.0 to +2.0)" in _render(tables.steps_table(steps))


def test_without_hdf5_the_step_writes_nothing(config: RunConfig, data: ImageData, tmp_path: Path) -> None:
    trainer = open_trainer(config, data, HOOKS, tmp_path / "run")
    size = (tmp_path / "run" / RUN_FILE).stat().st_size
    assert len(step_times(trainer, 3)) == 3
    trainer.monitor.flush()
    trainer.monitor.close()
    assert trainer.state.step == 3 and len(trainer.monitor.layer_names) > 0  # the hooks did record
    assert (tmp_path / "run" / RUN_FILE).stat().st_size == size


def test_sync_check_is_skipped_on_cpu_and_counts_sync_warnings(config: RunConfig, data: ImageData) -> None:
    skipped = check_syncs(config, data, Path("/nonexistent"))
    assert not skipped.ran and not skipped.no_per_layer_sync and "cpu" in skipped.note

    def sync_at(line: int) -> warnings.WarningMessage:
        message = UserWarning("called a synchronizing CUDA operation")
        return warnings.WarningMessage(message, UserWarning, "/x/flowdiag/record/monitor.py", line)

    other = warnings.WarningMessage(UserWarning("something else"), UserWarning, "/x/a.py", 1)
    one = classify_syncs([sync_at(250), other])
    assert one.ran and one.no_per_layer_sync and one.syncs == ("flowdiag/record/monitor.py:250",)
    assert "no per-layer sync" in one.note
    many = classify_syncs([sync_at(100), sync_at(100), sync_at(250)])
    assert not many.no_per_layer_sync and "3 host-device syncs" in many.note
    assert "flowdiag/record/monitor.py:100" in tables.sync_line(many).plain


def test_init_cost_table_gives_the_ratio_and_the_memory() -> None:
    costs = (InitCost(16, 0.2, 0.05, 3 * 2**20, 0), InitCost(256, 3.0, 1.5, 0, 2**19))
    text = _render(tables.init_table(costs))
    _columns_in(text, "M", "init", "M forwards", "ratio", "init peak mem")
    assert "4.00x" in text and "2.00x" in text and "3.0 MiB" in text and "0.5 MiB" in text
    assert "< start-up peak" in text  # no growth of the process's peak RSS on CPU


@pytest.mark.slow
def test_worker_startup_for_flowdiags_method_and_spawn(
    config: RunConfig, data: ImageData, tmp_path: Path
) -> None:
    startup = worker_startup(config, data, 1, tmp_path)
    assert startup[0].flowdiag_uses and startup[-1].method == "spawn"
    assert [len(s.times_s) for s in startup] == [1] * len(startup)
    _columns_in(
        _render(tables.startup_table(WorkersResult(startup, None))),
        "start method",
        "median",
        "flowdiag uses it",
    )


def test_competition_ratios_with_a_grid(config: RunConfig, data: ImageData, tmp_path: Path) -> None:
    result = measure_competition(config, data, 2, 1, tmp_path, grid=(INSTANT_GRID, (1, 2), ()))
    assert result.grid_idle is not None and result.grid_competing is not None
    assert set(result.grid_idle.wall_s) == set(result.grid_competing.wall_s) == {1, 2}  # each worker count
    _columns_in(
        _render(tables.competition_table(result)),
        "work",
        "idle",
        "competing",
        "ratio",
        "train step",
        "small grid, 2 workers",
    )
    _columns_in(_render(tables.grid_table(result.grid_idle)), "workers", "wall time", "speed-up")


def test_grid_passes_the_model_and_placement_options() -> None:
    assert passthrough_args(RunConfig()) == ("--device", "auto", "--threads", "0")
    args = passthrough_args(TINY)
    assert args == ("--steps-per-level", "1", "--hidden", "8", "--device", "cpu", "--threads", "0")
    assert "--batch-size" not in args and "--init-batches" not in args  # the main job keeps its own
    command = small_grid.main_job(7).command(2, Path("out"), args)
    assert command[-6:] == ["--steps", "7", "--workers", "2", "--out", "out"]
    assert "--init-batches" in command and "1,16,256" in command


@pytest.mark.slow
def test_the_grid_runs_the_real_ablate(tmp_path: Path) -> None:
    tiny = GridJob(steps=1, args=("--batch-size", "1", "--init-batches", "1", "--seeds", "0"))
    timing = time_grid(tiny, (1,), tmp_path, "idle", passthrough_args(TINY))
    assert set(timing.wall_s) == {1} and timing.speedup(1) == 1.0
    assert (tmp_path / "grid-idle-1" / "study.db").exists()  # the real ablate ran


def test_library_overhead_on_normflows_and_without_it(
    config: RunConfig, data: ImageData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("normflows")
    result = library.library_overhead(config, data, 2, 1, tmp_path)
    assert result.available and result.n_layers > 0  # the Monitor recognized normflows' layers
    _columns_in(
        _render(tables.library_table(result, None)),
        "model",
        "without Monitor",
        "with Monitor",
        "overhead",
        "normflows",
        "flowdiag Glow",
    )
    monkeypatch.setattr(library, "normflows_installed", lambda: False)
    missing = library.library_overhead(config, data, 2, 1, tmp_path)
    assert not missing.available and "pip install 'flowdiag[libs]'" in missing.note
    assert "flowdiag[libs]" in _render(tables.library_table(missing, None))


# --- scale: report, watch and export on a long synthetic run --------------------------------------


def test_the_synthetic_run_has_the_size_asked_and_its_events_where_said(tmp_path: Path) -> None:
    from flowdiag.bench.scale import layer_layout, onset_of, write_synthetic_run
    from flowdiag.report.digest import digest_run

    path = tmp_path / "run" / RUN_FILE
    written = write_synthetic_run(path, 3_000, 9)
    assert (written.steps, written.layers, written.file_bytes) == (3_000, 9, path.stat().st_size)
    record = read_run(path)
    names, kinds, pixels = layer_layout(9)
    assert (
        record.layer_names
        == names
        == [f"levels.{lv}.steps.0.{k}" for lv in range(3) for k in ("actnorm", "invconv", "coupling")]
    )
    assert (
        record.layer_kinds == kinds
        and record.layer_pixels.tolist() == pixels == [256] * 3 + [64] * 3 + [16] * 3
    )
    spike, onset = onset_of(3_000)
    assert (spike, onset) == (1_501, 2_871) and onset_of(300_000) == (150_001, 287_123)
    np.testing.assert_array_equal(record.step, np.arange(1, 3_001))
    np.testing.assert_array_equal(record.wall_time, record.step * 0.25)  # a 4 steps/s run, its own clock
    assert (record.status, record.nan_onset_step, record.nan_onset_layer) == ("diverged", onset, names[8])
    assert record.eval_step.tolist() == [1_000, 2_000, 3_000]
    crossing = digest_run(path).crossing
    assert crossing is not None and (crossing.step, crossing.layer, crossing.max_abs) == (
        spike,
        names[-1],
        1e6,
    )


def test_a_timed_command_reports_its_own_peak_memory_not_the_bench_processes(tmp_path: Path) -> None:
    from flowdiag.bench.scale import time_command

    ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # torch is loaded here
    cost = time_command("help", ["--help"], tmp_path)
    assert cost.command == "help" and cost.peak_rss_bytes < min(ours, 200 * 2**20)
    with pytest.raises(RuntimeError, match="does not exist"):
        time_command("bad", ["report", str(tmp_path / "nowhere")], tmp_path)


def test_the_scale_table_sets_each_figure_beside_its_goal() -> None:
    mb = 10**6
    scale = ScaleResult(
        WriteCost(300_000, 288, 884_503_312, 4.41, 1.0e-4),
        CommandCost("flowdiag --help", 0.23, 0.2, 25 * mb), CommandCost("report", 5.36, 4.4, 172 * mb),
        CommandCost("watch --once", 0.46, 0.3, 65 * mb), CommandCost("export", 27.8, 14.4, 183 * mb),
        140 * mb, 4, 20_000, CommandCost("report, 4 runs", 8.0, 7.0, 200 * mb),
        CommandCost("report, 1 run", 2.9, 2.5, 150 * mb),
    )  # fmt: skip
    text = _render(tables.scale_table(scale))
    _columns_in(text, "command", "wall time", "CPU time", "peak RSS", "goal at 300,000 × 288")
    assert "300,000 steps × 288 layers (885 MB, 2,948 bytes/step)" in text
    assert "+0.23 s over --help" in text and "140 MB of events" in text
    assert "≤ 10 s, ≤ 1 GB" in text and "5.36 s" in text and "172 MB" in text
    assert "14.7 µs a step through append_steps" in text and "100.0 µs through append_step" in text


def test_the_scale_part_alone_builds_no_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flowdiag.bench import parts, suite

    def no_data(*_: object) -> None:
        raise AssertionError("the scale part needs no data set")

    sizes: list[tuple[int, ...]] = []
    monkeypatch.setattr(suite, "load_dataset", no_data)
    monkeypatch.setattr(suite, "measure_scale", lambda *args: sizes.append(args[:4]) or "measured")
    settings = parts.BenchSettings(
        parts=("scale",), scale_steps=10, scale_layers=6, scale_folder_runs=2, scale_folder_steps=5
    )
    result = suite.run_bench(TINY, settings)
    assert result.scale == "measured" and sizes == [(10, 6, 2, 5)] and result.n_parameters == 0
    assert tables.header(result).startswith("synthetic run files only")
    assert parse_parts("scale") == ("scale",) and "scale" in PARTS
    with pytest.raises(UserError, match="--scale-layers at least 3"):
        parts.BenchSettings(parts=("scale",), scale_layers=2).check()
