"""Interrupted ablations resume (issue 23.1): a signal at any moment leaves the cell unfinished in the
study, never RUNNING and never a result; the rerun's first line counts done, interrupted and pending
cells truthfully and continues each interrupted cell from its checkpoint at once.

In-process runs put the signal at an exact moment (inside the init, a training step, a flush, the
claim, between cells) by wrapping the function that runs then; subprocess runs send SIGINT to the
whole process group, as Ctrl-C does, to a launcher with two workers. Every rerun sets the heartbeat
grace period to ten minutes: a rerun that waited for a heartbeat to go stale would hang, not pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from flowdiag.ablation import attempt
from flowdiag.ablation.storage_url import default_storage_url
from flowdiag.cli import app
from flowdiag.record.store import read_run
from flowdiag.record.store.writer import RunWriter
from flowdiag.runtime.files import CELLS_FILE
from flowdiag.train import trainer
from tests.test_ablation import postgres_url, study_name  # noqa: F401 -- the PostgreSQL fixtures

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1", "FLOWDIAG_GRACE_SECONDS": "600"}
TINY = [
    *("--dataset", "digits", "--levels", "3", "--steps-per-level", "1", "--hidden", "8", "--device", "cpu"),
    *("--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--flush-every", "3", "--lr", "1e-4"),
]
GRID = [*TINY, "--batch-size", "4", "--init-batches", "4,8", "--seeds", "0", "--workers", "1"]
FIRST, SECOND = "M4-lam0.001-b4-seed0", "M8-lam0.001-b4-seed0"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STORAGE: dict[str, str] = {}  # a test on PostgreSQL puts its URL and study here


def ablate(out: Path) -> Any:
    where = ["--storage", STORAGE["url"], "--study", STORAGE["study"]] if STORAGE else []
    return CliRunner().invoke(app, ["ablate", *GRID, "--out", str(out), *where], env=ENV)


def trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    url, name = (STORAGE["url"], STORAGE["study"]) if STORAGE else (default_storage_url(out), "ablation")
    return optuna.load_study(study_name=name, storage=url).get_trials()


def cells_file(out: Path) -> dict[str, str]:
    return json.loads((out / CELLS_FILE).read_text())["cells"]


def signal_once(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, when: Callable[..., bool], after: bool = False
) -> list[bool]:
    """Wrap owner.name so that SIGINT reaches this process the first time `when(*args)` holds: before
    the original runs (its handler then runs while the call is in progress), or after it returned."""
    original = getattr(owner, name)
    fired: list[bool] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        fire = not fired and when(*args, **kwargs)
        if fire and not after:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        value = original(*args, **kwargs)
        if fire and after:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return value

    monkeypatch.setattr(owner, name, wrapper)
    return fired


def always(*args: Any, **kwargs: Any) -> bool:
    return True


def at_step(step: int) -> Callable[..., bool]:
    return lambda self, *args, **kwargs: self.state.step == step


MOMENTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], list[bool]], int | None]] = {
    # moment: (where the signal lands, the step the first cell's checkpoint holds; None: it finished)
    "during the init": (lambda mp: signal_once(mp, trainer, "cumulative_init", always), 0),
    "mid-training": (lambda mp: signal_once(mp, trainer.Trainer, "one_step", at_step(1)), 2),
    "during a flush": (lambda mp: signal_once(mp, RunWriter, "flush", lambda w: w._rows.n > 0), 3),
    "in the last step": (lambda mp: signal_once(mp, trainer.Trainer, "one_step", at_step(5)), None),
    "between cells": (lambda mp: signal_once(mp, attempt, "record_result", always, after=True), None),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_signal_at_any_moment_leaves_the_cell_unfinished_and_the_rerun_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    place, stopped_at = MOMENTS[moment]
    with pytest.MonkeyPatch.context() as patch:  # the signal's wrapper, for the first command only
        fired = place(patch)
        result = ablate(tmp_path)
    assert fired, "the signal was never sent"
    assert result.exit_code == 130, result.output
    assert "rerun the same command to resume" in " ".join(result.output.split()).lower()
    first = [t for t in trials(tmp_path) if "run_dir" in t.user_attrs]
    assert all(t.state != TrialState.RUNNING for t in trials(tmp_path))
    assert len(first) == 1, "the worker ran no second cell after the signal"
    if stopped_at is None:  # the signal came once the run had ended: a real result, and no more cells
        assert first[0].state == TrialState.COMPLETE and first[0].user_attrs["status"] == "completed"
        assert cells_file(tmp_path) == {FIRST: "done", SECOND: "interrupted"}
        expected = "1 done, 0 interrupted, 1 pending; 1 to run"
    else:
        assert first[0].state == TrialState.FAIL and first[0].user_attrs["status"] == "interrupted"
        assert first[0].user_attrs["steps"] == stopped_at  # the step its checkpoint holds
        assert "best_bpd" not in first[0].user_attrs and "hdf5_path" not in first[0].user_attrs
        assert cells_file(tmp_path) == {FIRST: "interrupted", SECOND: "interrupted"}
        expected = "0 done, 1 interrupted, 1 pending; 2 to run"
    rerun = ablate(tmp_path)
    assert rerun.exit_code == 0, rerun.output
    assert f"2 cells: {expected} on 1 worker(s)" in rerun.output.splitlines()[0]
    assert_resumed(tmp_path, stopped_at)


def assert_resumed(out: Path, stopped_at: int | None) -> None:
    """Both cells done, once each; the interrupted one continued from its checkpoint in its folder."""
    done = [t for t in trials(out) if t.state == TrialState.COMPLETE]
    assert sorted(t.params["init_batches"] for t in done) == [4, 8]
    assert cells_file(out) == {FIRST: "done", SECOND: "done"}
    resumed = [t for t in done if "resumed_from_step" in t.user_attrs]
    if stopped_at is None:
        assert not resumed
    else:
        (trial,) = resumed
        assert trial.user_attrs["resumed_from_step"] == stopped_at
        # Its evaluations before the checkpoint came from the attempt it continued: the whole curve.
        assert sorted(trial.intermediate_values) == [3, 6]
    for trial in done:
        record = read_run(Path(trial.user_attrs["hdf5_path"]))
        assert record.status == "completed"
        assert np.array_equal(record.step, np.arange(1, 7))  # every step once: resumed, not restarted
    assert not (out / ".stale").exists()


@pytest.mark.postgres
def test_an_interrupted_cell_resumes_on_postgres(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setitem(STORAGE, "url", request.getfixturevalue("postgres_url"))
    monkeypatch.setitem(STORAGE, "study", request.getfixturevalue("study_name"))
    test_a_signal_at_any_moment_leaves_the_cell_unfinished_and_the_rerun_resumes_it(
        tmp_path, monkeypatch, "mid-training"
    )


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_signal_while_a_trial_is_claimed_leaves_no_running_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of issue 23.1: a KeyboardInterrupt inside `ask()` left the claimed trial RUNNING, and
    the rerun counted its cell "done or running" until the heartbeat went stale."""
    signal_once(monkeypatch, optuna.Study, "ask", always, after=True)
    result = ablate(tmp_path)
    assert result.exit_code == 130, result.output
    monkeypatch.undo()
    claimed, other = trials(tmp_path)  # the grid's two queued cells; the worker claimed the first
    assert (claimed.state, other.state) == (TrialState.FAIL, TrialState.WAITING)  # not left RUNNING
    assert "run_dir" not in claimed.user_attrs and "status" not in claimed.user_attrs  # it never trained
    rerun = ablate(tmp_path)
    assert rerun.exit_code == 0, rerun.output
    assert "2 cells: 0 done, 0 interrupted, 2 pending; 2 to run" in rerun.output.splitlines()[0]
    assert_resumed(tmp_path, None)


# --- Ctrl-C to a real `flowdiag ablate` with two workers -----------------------------------------


def _wait_until(check: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not check():
        assert process.poll() is None, f"ablate ended before {what}: {process.communicate()[0]}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def _training(out: Path, name: str) -> bool:
    path = out / "runs" / name / "run.h5"
    try:
        return path.exists() and len(read_run(path).step) > 0
    except Exception:  # the file is being made
        return False


@pytest.mark.slow
@pytest.mark.parametrize("target", ["process group", "launcher only"])
def test_ctrl_c_with_two_workers_then_the_same_command_resumes(tmp_path: Path, target: str) -> None:
    out = tmp_path / "abl"
    args = [*TINY, "--steps", "200", "--eval-every", "100", "--flush-every", "5", "--checkpoint-every", "10"]
    args += [
        "--batch-size",
        "1",
        "--init-batches",
        "4,8,16",
        "--seeds",
        "0",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    command = [sys.executable, "-m", "flowdiag", "ablate", *args]
    env = {**os.environ, **ENV}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        running = lambda: sum(1 for s in cells_file(out).values() if s == "running") == 2  # noqa: E731
        _wait_until(lambda: (out / CELLS_FILE).exists() and running(), process, "two running cells")
        names = [n for n, s in cells_file(out).items() if s == "running"]
        _wait_until(lambda: all(_training(out, n) for n in names), process, "both cells training")
        if target == "process group":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, output
    states = {t.user_attrs["cell"]: t for t in trials(out) if t.state != TrialState.WAITING}
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in states.values()), output
    interrupted = {k for k, t in states.items() if t.state == TrialState.FAIL}
    assert interrupted and all(states[k].user_attrs["status"] == "interrupted" for k in interrupted)
    assert all(states[k].user_attrs["steps"] > 0 for k in interrupted)  # mid-training
    done = len(states) - len(interrupted)
    pending = 3 - len(states)
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    expected = f"3 cells: {done} done, {len(interrupted)} interrupted, {pending} pending; {3 - done} to run"
    assert expected in rerun.stdout.splitlines()[0], rerun.stdout
    finished = [t for t in trials(out) if t.state == TrialState.COMPLETE]
    assert len(finished) == 3 and len({t.user_attrs["cell"] for t in finished}) == 3
    for trial in finished:
        if trial.user_attrs["cell"] in interrupted:
            stopped = states[trial.user_attrs["cell"]].user_attrs["steps"]
            assert trial.user_attrs["resumed_from_step"] == stopped
        record = read_run(Path(trial.user_attrs["hdf5_path"]))
        assert np.array_equal(record.step, np.arange(1, 201)), "a resumed run repeats or skips no step"


def test_a_cell_out_of_memory_is_failed_not_interrupted_and_the_next_run_retries_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowdiag.ablation import cell_objective

    real = cell_objective.train

    def short_of_memory(config: Any, run_dir: Path, **kwargs: Any) -> Any:
        if config.train.init_batches == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(config, run_dir, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cell_objective, "train", short_of_memory)
        result = ablate(tmp_path)
    assert result.exit_code == 1, result.output  # the other cell ran: memory fails one cell, not all
    assert f"{FIRST}: failed (CUDA out of memory. Tried to allocate 2.00 GiB)" in result.output
    failed = next(t for t in trials(tmp_path) if t.params["init_batches"] == 4)
    assert failed.state == TrialState.FAIL and failed.user_attrs["status"] == "failed"
    assert "best_bpd" not in failed.user_attrs
    assert cells_file(tmp_path) == {FIRST: "failed", SECOND: "done"}
    rerun = ablate(tmp_path)
    assert rerun.exit_code == 0, rerun.output
    assert "1 done, 0 interrupted, 0 pending, 1 failed (run again); 1 to run" in rerun.output.splitlines()[0]
    assert cells_file(tmp_path) == {FIRST: "done", SECOND: "done"}
