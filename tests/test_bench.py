"""`flowdiag bench`'s parts with tiny budgets: each runs, returns sane values and prints its table's
columns. Timings are never asserted: speed belongs to the bench itself, not to the tests."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from flowdiag.bench import library, small_grid, tables
from flowdiag.bench.competition import measure_competition
from flowdiag.bench.init_cost import init_cost
from flowdiag.bench.parts import PARTS, parse_parts
from flowdiag.bench.results import HOOKS, HOOKS_HDF5, MODES, NO_HOOKS, ModeTiming, StepTiming, WorkersResult
from flowdiag.bench.small_grid import GridJob, passthrough_args, time_grid
from flowdiag.bench.steps import open_trainer, step_times, time_steps
from flowdiag.bench.sync_check import check_syncs, classify_syncs
from flowdiag.bench.workers import worker_startup
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
        assert len(timing.times_s) == 4 and all(t > 0 for t in timing.times_s)
        assert len(timing.round_medians_s) == 2
        assert math.isfinite(steps.overhead_percent(mode))
    assert steps.overhead_percent(NO_HOOKS) == 0.0
    assert steps.hdf5_bytes_per_step > 0
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
    assert all(t > 0 for t in step_times(trainer, 3))
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


def test_init_cost_against_forwards(config: RunConfig, data: ImageData) -> None:
    cost = init_cost(config, data, 1)
    assert cost.m == 1 and cost.init_s > 0 and cost.forward_s > 0
    assert cost.init_peak_bytes >= 0 and cost.forward_peak_bytes >= 0
    _columns_in(_render(tables.init_table((cost,))), "M", "init", "M forwards", "ratio", "init peak mem")


@pytest.mark.slow
def test_worker_startup_for_flowdiags_method_and_spawn(
    config: RunConfig, data: ImageData, tmp_path: Path
) -> None:
    startup = worker_startup(config, data, 1, tmp_path)
    assert startup[0].flowdiag_uses and startup[-1].method == "spawn"
    assert all(s.median_s > 0 for s in startup)
    _columns_in(
        _render(tables.startup_table(WorkersResult(startup, None))),
        "start method",
        "median",
        "flowdiag uses it",
    )


def test_competition_ratios_with_a_grid(config: RunConfig, data: ImageData, tmp_path: Path) -> None:
    result = measure_competition(config, data, 2, 1, tmp_path, grid=(INSTANT_GRID, (1, 2), ()))
    assert result.step_idle_s > 0 and result.step_competing_s > 0 and math.isfinite(result.step_ratio)
    assert result.grid_idle is not None and result.grid_competing is not None
    assert set(result.grid_competing.wall_s) == {1, 2} and math.isfinite(result.grid_ratio(2))
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
    assert timing.wall_s[1] > 0 and timing.speedup(1) == 1.0
    assert (tmp_path / "grid-idle-1" / "study.db").exists()


def test_library_overhead_on_normflows_and_without_it(
    config: RunConfig, data: ImageData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("normflows")
    result = library.library_overhead(config, data, 2, 1, tmp_path)
    assert result.available and result.n_layers > 0
    assert result.off_s > 0 and result.on_s > 0 and math.isfinite(result.overhead_percent)
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
