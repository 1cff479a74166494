"""`flowdiag watch`: the snapshot's numbers are the files' numbers, a folder is one line per cell with the
diverged ones first, piped output is plain text ending in a newline, and bad input is one line, exit 2."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from flowdiag.cli.watch import watch_command
from flowdiag.record.store import RunWriter
from flowdiag.report.study_cells import read_cells
from flowdiag.report.watch import read_tail, watch
from flowdiag.report.watch_data import (
    SPARK,
    bucket_means,
    run_name,
    run_view,
    sparkline,
    steps_per_second,
    watch_snapshot,
)
from flowdiag.report.watch_view import snapshot_lines, snapshot_view, summary_line
from flowdiag.runtime.files import CELLS_FILE
from flowdiag.settings.config import RunConfig, TrainConfig

NAMES = [f"levels.{lv}.steps.0.{kind}" for lv in range(2) for kind in ("actnorm", "invconv", "coupling")]
KINDS = [name.rsplit(".", 1)[1] for name in NAMES]
STEPS = 20
ONSET_LAYER = NAMES[4]
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def max_abs_row(step: int) -> np.ndarray:
    return ((1.0 + np.arange(len(NAMES))) * (1.0 + 0.1 * step)).astype(np.float32)


def bpd_at(step: int) -> float:
    return 6.0 - 0.1 * step


def write_run(
    run_dir: Path,
    *,
    steps: int,
    status: str,
    onset: int = -1,
    m: int = 1,
    seed: int = 0,
    phase: str = "train",
    forwards: int = 1,
) -> Path:
    """A run file as the trainer leaves it; status "running" leaves it open, flushed."""
    train = TrainConfig(steps=STEPS, init_batches=m, seed=seed, batch_size=1)
    writer = RunWriter(
        run_dir / "run.h5",
        config_json=RunConfig(train=train).to_json(),
        version="test",
        layer_names=NAMES,
        layer_kinds=KINDS,
        total_steps=STEPS,
        flush_every=100,
    )
    writer.set_phase(phase)
    for step in range(1, steps + 1):
        max_abs, bpd = max_abs_row(step), bpd_at(step)
        if step == onset:
            max_abs[NAMES.index(ONSET_LAYER)], bpd = np.inf, math.nan
        writer.append_step(
            step, loss=bpd, bpd=bpd, penalty=0.0, grad_norm=1.0, lr=1e-3, max_abs=max_abs,
            logdet=np.zeros(len(NAMES), np.float32), nonfinite=~np.isfinite(max_abs), forwards=forwards,
        )  # fmt: skip
        if step % 5 == 0:
            writer.append_eval(step, 5.5 - 0.05 * step)
    if onset > 0:
        writer.set_status("diverged", onset_step=onset, onset_layer=ONSET_LAYER)
    if status == "running":
        writer.flush()
    else:
        writer.close(status if status != "diverged" else None)
    return run_dir / "run.h5"


def add_cells(out: Path, cells: dict[str, str], running: int = 0) -> None:
    """The cells file an ablation runner publishes (runtime.files.CELLS_FILE), as its contract says."""
    data = {"format": 1, "study": "s", "kind": "ablation", "updated": 1.0, "running": running, "cells": cells}
    (out / CELLS_FILE).write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """An ablation folder: a running, a completed and a diverged cell, a stale attempt, a queued cell."""
    out = tmp_path / "ablation"
    write_run(out / "runs" / "a-running", steps=8, status="running")
    write_run(out / "runs" / "b-completed", steps=STEPS, status="completed", seed=1)
    write_run(out / "runs" / "c-diverged", steps=7, status="diverged", onset=7, seed=2)
    write_run(out / ".stale" / "c-diverged-before-trial3", steps=3, status="failed")
    return out


def cli(*args: str) -> typer.testing.Result:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so that the command is named as in the real app
    app.command("watch")(watch_command)
    return CliRunner().invoke(app, ["watch", *args], env=ENV)


# --- extraction -----------------------------------------------------------------------------------


def test_bucket_means_and_sparkline() -> None:
    assert bucket_means([1.0, 3.0, math.nan, 5.0], width=2) == (2.0, 5.0)
    assert bucket_means(np.arange(100.0), width=40)[0] == pytest.approx(1.0)  # buckets of 3 first
    assert len(bucket_means(np.arange(100.0), width=40)) == 40 and bucket_means([]) == ()
    assert sparkline([0.0, 0.5, 1.0, math.nan]) == SPARK[0] + SPARK[4] + SPARK[-1] + " "
    assert sparkline([2.0, 2.0]) == SPARK[3] * 2 and sparkline([math.nan]) == " "


def test_steps_per_second_over_the_recent_window() -> None:
    step = np.arange(1, 101)
    wall = np.concatenate([np.linspace(0, 500, 50), 500 + np.arange(1, 51) * 0.5])  # slow, then 2 steps/s
    assert steps_per_second(step, wall, window_s=10.0) == pytest.approx(2.0)
    assert math.isnan(steps_per_second(step[:1], wall[:1]))
    assert math.isnan(steps_per_second(step, np.full(100, np.nan)))  # a format-1 file: no wall clock


def test_run_name_is_the_cell_folder(tmp_path: Path) -> None:
    assert run_name(tmp_path / "runs" / "M1-lam0" / "run.h5", tmp_path) == "M1-lam0"
    assert run_name(tmp_path / "grid" / "x" / "run.h5", tmp_path) == "grid/x"
    assert run_name(tmp_path / "run.h5", tmp_path) == tmp_path.name
    assert run_name(tmp_path / "other.h5", tmp_path) == "other"


def test_folder_snapshot_puts_diverged_first_with_the_files_numbers(mixed: Path) -> None:
    files = sorted((mixed / "runs").glob("*/run.h5"))
    records = [(f.parent.name, read_tail(f)) for f in files]
    snap = watch_snapshot(mixed, records, queued=[("d-queued", "waiting"), ("b-completed", "waiting")])
    assert [c.name for c in snap.cells] == ["c-diverged", "a-running", "d-queued", "b-completed"]
    diverged, running, queued, completed = snap.cells
    assert (diverged.status, diverged.step, diverged.onset_step, diverged.onset_layer) == (
        "diverged", 7, 7, ONSET_LAYER,
    )  # fmt: skip
    assert diverged.peak_max_abs == math.inf and math.isnan(diverged.bpd)
    assert (running.status, running.step, running.total_steps, running.phase) == (
        "running",
        8,
        STEPS,
        "train",
    )
    assert running.bpd == bpd_at(8) and running.peak_max_abs == pytest.approx(float(max_abs_row(8)[-1]))
    assert (queued.status, queued.step) == ("waiting", -1)
    assert completed.step == STEPS and completed.onset_step == -1
    assert snap.active and snap.run is None
    assert summary_line(snap) == "3 runs: 1 diverged, 1 running, 1 waiting, 1 completed"


def test_run_view_has_rate_eta_trend_and_the_init_phase(tmp_path: Path) -> None:
    tail = read_tail(write_run(tmp_path / "r", steps=12, status="running"))
    tail = tail._replace(rows=tail.rows._replace(wall_time=np.arange(12) * 0.25))  # 4 steps/s
    view = run_view(tail, "r")
    assert (view.step, view.total_steps, view.bpd) == (12, STEPS, bpd_at(12))
    assert view.steps_per_s == pytest.approx(4.0) and view.eta_s == pytest.approx((STEPS - 12) / 4.0)
    assert view.bpd_history == tuple(bpd_at(s) for s in range(1, 13))
    assert [p.name for p in view.top_layers] == NAMES[::-1][:5]  # max |output| grows with the column
    expected = math.log10(max_abs_row(12)[-1]) - math.log10(max_abs_row(2)[-1])  # over the last 10 rows
    assert view.top_layers[0].trend == pytest.approx(expected, rel=1e-5)
    ended = run_view(tail._replace(head=tail.head._replace(status="completed")), "r")
    assert math.isnan(ended.eta_s)  # no ETA once the run ended
    init = read_tail(write_run(tmp_path / "i", steps=0, status="running", m=256, phase="init"))
    snap = watch_snapshot(tmp_path / "i", [("i", init)], single=True)
    assert snap.run is not None and snap.run.phase == "init" and snap.cells[0].status == "running"
    assert "ActNorm init over M = 256 batches" in "\n".join(snapshot_lines(snap))


def test_the_cells_file_reads_as_its_contract_says_and_bad_ones_read_as_none(tmp_path: Path) -> None:
    add_cells(tmp_path, {"a": "waiting", "b": "running", "c": "done", "d": "exploded"}, running=1)
    cells = read_cells(tmp_path)
    assert cells is not None and cells.running == 1 and cells.kind == "ablation"
    assert cells.cells == {"a": "waiting", "b": "running", "c": "done"}  # an unknown state is left out
    assert cells.without_file({"c"}) == [("a", "waiting"), ("b", "starting")]
    for text in ('{"format": 2, "cells": {}}', '{"format": 1, "cells": {"a": "wait', "[]", ""):
        (tmp_path / CELLS_FILE).write_text(text)
        assert read_cells(tmp_path) is None, text  # another format, a partial file, not an object
    assert read_cells(tmp_path / "absent") is None


# --- the command ----------------------------------------------------------------------------------


def _assert_plain(result: typer.testing.Result) -> list[str]:
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and result.output.endswith("\n")
    return result.output.splitlines()


def test_once_on_a_run_folder(tmp_path: Path) -> None:
    write_run(tmp_path / "run", steps=12, status="running")
    lines = _assert_plain(cli(str(tmp_path / "run"), "--once"))
    assert lines[0].startswith("run: running · step 12/20 · bpd 4.8000")
    assert any(line.startswith("bpd ▁") or line.startswith(f"bpd {SPARK[-1]}") for line in lines)
    assert any(NAMES[-1] in line and "↑" in line for line in lines)  # top layer, growing
    assert lines[-1].startswith("run: running at step 12/20")  # the summary line
    assert _assert_plain(cli(str(tmp_path / "run" / "run.h5"), "--once"))[0] == lines[0]


def test_once_on_an_ablation_folder_one_line_per_cell(mixed: Path) -> None:
    add_cells(mixed, {"M256-seed9": "waiting", "b-completed": "done", "c-diverged": "done"})
    lines = _assert_plain(cli(str(mixed), "--once"))
    names = ["c-diverged", "a-running", "M256-seed9", "b-completed"]
    body = [line for line in lines if any(line.startswith(n + " ") for n in names)]
    assert [line.split()[0] for line in body] == names  # one line each, diverged first
    assert "step 7/20" in body[0] and "inf" in body[0] and ONSET_LAYER in body[0]
    assert "waiting" in body[2] and "before-trial3" not in "".join(lines)  # stale attempts skipped
    assert lines[-1] == "3 runs: 1 diverged, 1 running, 1 waiting, 1 completed"


def test_once_on_a_folder_of_runs_without_a_study(mixed: Path) -> None:
    lines = _assert_plain(cli(str(mixed / "runs"), "--once"))
    assert [line.split()[0] for line in lines[1:4]] == ["c-diverged", "a-running", "b-completed"]
    assert len(lines) == 5 and lines[-1] == "3 runs: 1 diverged, 1 running, 1 completed"


def test_watch_ends_on_a_completed_folder_with_a_summary(mixed: Path) -> None:
    for name in ("a-running", "b-completed"):
        (mixed / "runs" / name / "run.h5").unlink()
    lines = _assert_plain(cli(str(mixed), "--interval", "0.05", "--timeout", "20"))
    assert lines[-1] == "1 run: 1 diverged"


# Another process, as in real use: HDF5 refuses to open for writing a file that this process has open
# for reading. It sets the attributes as RunWriter.flush does, with h5py alone (flowdiag pulls in torch).
_FINISH_LATER = """
import sys, time
import h5py
time.sleep(float(sys.argv[2]))
with h5py.File(sys.argv[1], "r+") as f:
    f.attrs["status"] = "completed"
"""


@pytest.mark.parametrize("terminal", [False, True])
def test_watch_follows_a_run_until_another_process_ends_it(tmp_path: Path, terminal: bool) -> None:
    path = write_run(tmp_path, steps=5, status="running")
    console = Console(file=io.StringIO(), width=120, force_terminal=terminal)
    assert watch(tmp_path, console, interval=0.02, timeout=0.1).cells[0].status == "running"  # timed out
    finisher = subprocess.Popen([sys.executable, "-c", _FINISH_LATER, str(path), "0.3"])
    try:
        started = time.monotonic()
        assert watch(path, console, interval=0.02, timeout=30.0).cells[0].status == "completed"
        assert time.monotonic() - started < 20.0
    finally:
        assert finisher.wait(timeout=30) == 0
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert NAMES[-1] in output and "completed" in output
    assert ("\x1b" in output) is terminal  # a live screen only on a terminal


def test_snapshot_view_draws_a_folder_and_a_run(mixed: Path) -> None:
    console = Console(file=io.StringIO(), width=160)
    files = sorted((mixed / "runs").glob("*/run.h5"))
    console.print(snapshot_view(watch_snapshot(mixed, [(f.parent.name, read_tail(f)) for f in files])))
    console.print(snapshot_view(watch_snapshot(files[0], [("a", read_tail(files[0]))], single=True)))
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "c-diverged" in output and "recent peak max |output|" in output and "trend" in output


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "run.h5").write_bytes(b"not an hdf5 file" * 100)
    (tmp_path / "runs-corrupt" / "x").mkdir(parents=True)
    (tmp_path / "runs-corrupt" / "x" / "run.h5").write_bytes(b"\x89HDF\r\n" * 10)
    cases = {
        str(tmp_path / "nowhere"): "does not exist",
        str(tmp_path / "empty"): "no run.h5 found",
        str(tmp_path / "corrupt"): "truncated or corrupt",
        str(tmp_path / "runs-corrupt"): "truncated or corrupt",
    }
    for path, message in cases.items():
        result = cli(path, "--once")
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    result = cli(str(tmp_path), "--interval", "0")
    assert result.exit_code == 2 and "--interval" in result.output and "\n" not in result.output.strip()


# --- start-up: what loads, and a folder that is not there yet -----------------------------------

_IMPORTS = """
import json, sys
from typer.testing import CliRunner
from flowdiag.cli import app
codes = [CliRunner().invoke(app, json.loads(case)).exit_code for case in sys.argv[1:]]
heavy = ("torch", "h5py", "matplotlib", "optuna", "sqlite3")
print(json.dumps([codes, sorted(m for m in heavy if m in sys.modules)]))
"""


def loaded_after(*cases: list[str]) -> tuple[list[int], list[str]]:
    """Exit codes of `flowdiag CASE...` in one fresh interpreter, and the heavy modules it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *(json.dumps(c) for c in cases)],
        capture_output=True, text=True, check=True, env={**os.environ, **ENV},
    )  # fmt: skip
    codes, modules = json.loads(done.stdout.strip().splitlines()[-1])
    return codes, modules


def test_bad_arguments_fail_before_torch_h5py_or_matplotlib_load(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "nowhere")
    codes, modules = loaded_after(
        ["watch", str(tmp_path), "--interval", "0"],
        ["watch", nowhere, "--once"],
        ["watch", str(tmp_path), "--timeout", "-1"],
        ["report", nowhere],
        ["report", str(tmp_path), "--threshold", "-1"],
        ["report", str(tmp_path), "--fig5-step", "0"],
        ["export", str(tmp_path)],
        ["export", nowhere, "--tensorboard", str(tmp_path / "tb")],
        ["export", str(tmp_path), "--tensorboard", str(tmp_path / "tb"), "--stride", "0"],
    )
    assert codes == [2] * 9 and modules == []


def test_watch_reads_a_study_without_optuna_or_sqlite(mixed: Path) -> None:
    add_cells(mixed, {"M256-seed9": "waiting"}, running=1)
    codes, modules = loaded_after(["watch", str(mixed), "--once"])
    assert codes == [0] and "h5py" in modules
    assert "optuna" not in modules and "sqlite3" not in modules


def test_watch_waits_for_a_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    watcher = subprocess.Popen(
        [sys.executable, "-m", "flowdiag", "watch", str(folder), "--interval", "0.05", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
    )  # fmt: skip
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().startswith(f"waiting for {folder}")  # it says so, and waits
        write_run(folder, steps=5, status="completed")
        output, errors = watcher.communicate(timeout=120)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, errors
    assert output.splitlines()[-1].startswith("later: completed at step 5/20")


def test_the_detail_view_says_when_a_step_covers_several_forwards(tmp_path: Path) -> None:
    accumulated = read_tail(write_run(tmp_path / "a", steps=6, status="running", forwards=4))
    plain = read_tail(write_run(tmp_path / "p", steps=6, status="running"))
    assert (
        "· 4 forwards/step ·"
        in snapshot_lines(watch_snapshot(tmp_path, [("a", accumulated)], single=True))[0]
    )
    assert "forwards" not in snapshot_lines(watch_snapshot(tmp_path, [("p", plain)], single=True))[0]


def test_a_study_stays_active_while_its_cells_file_says_so(mixed: Path) -> None:
    done = [("b", read_tail(mixed / "runs" / "b-completed" / "run.h5"))]
    assert not watch_snapshot(mixed, done).active
    assert watch_snapshot(mixed, done, queued=[("later", "waiting")]).active  # queued, no file yet
    assert watch_snapshot(mixed, done, study_running=1).active  # claimed, its file not made yet
    assert not watch_snapshot(mixed, done, queued=[("x", "failed")]).active
