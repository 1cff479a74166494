"""`flowdiag ablate`: the grid as data, then whole ablations through the CLI on SQLite and PostgreSQL.

Every run uses a Glow of a few hundred parameters for a few steps, on one torch thread per process
(two processes on two cores crawl when each spins two OpenMP threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import sqlalchemy
import torch
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial
from typer.testing import CliRunner

from flowdiag.ablation import storage as storage_module
from flowdiag.ablation import study as study_module
from flowdiag.ablation.claims import CLAIM_ATTR
from flowdiag.ablation.grid import build_grid, cell_key, cell_slug, read_config_file
from flowdiag.ablation.runner import prepare, work
from flowdiag.ablation.spec import AblationSpec
from flowdiag.ablation.storage import Reaper, default_storage_url
from flowdiag.cli import app
from flowdiag.record.store import read_run
from flowdiag.runtime import cores, environment
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CELLS_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
TINY = [
    *("--dataset", "digits", "--levels", "3", "--steps-per-level", "1", "--hidden", "8"),
    *("--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--flush-every", "3", "--device", "cpu"),
]
COMPLETE = (TrialState.COMPLETE,)


@pytest.fixture(autouse=True)
def _one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for spawned workers and subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args: str, **env: str):
    return CliRunner().invoke(app, ["ablate", *args], env={**ENV, **env})


def sqlite_url(out: Path) -> str:
    return default_storage_url(out)


def load(url: str, name: str = "ablation") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def cell_trials(
    study: optuna.Study, states: tuple[TrialState, ...] = COMPLETE
) -> dict[str, list[FrozenTrial]]:
    by_cell: dict[str, list[FrozenTrial]] = {}
    for trial in study.get_trials(states=states):
        if "cell" in trial.user_attrs:
            by_cell.setdefault(trial.user_attrs["cell"], []).append(trial)
    return by_cell


def keys(cells: list[dict]) -> set[str]:
    return {cell_key(cell) for cell in cells}


def grid_cells(**axes: list) -> list[dict]:
    """The cells a CLI grid should produce, from its core axes (missing ones at the defaults, but seeds
    0 and 1, which these tests pass)."""
    full = {"batch_size": [1], "init_batches": [1, 256], "lam": [1e-3], "seed": [0, 1], **axes}
    return [dict(zip(full, values, strict=True)) for values in itertools.product(*full.values())]


def expect_once(study: optuna.Study, cells: list[dict]) -> dict[str, FrozenTrial]:
    """Every cell has exactly one COMPLETE trial and nothing else is COMPLETE; returns them by cell."""
    done = cell_trials(study)
    assert set(done) == keys(cells)
    assert all(len(trials) == 1 for trials in done.values()), {
        k: len(v) for k, v in done.items() if len(v) > 1
    }
    return {key: trials[0] for key, trials in done.items()}


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


# --- the grid, as data -------------------------------------------------------------------------


def test_grid_axes_fixed_and_cells() -> None:
    grid = build_grid(
        {
            "batch_size": "1,4",
            "init_batches": "1",
            "lam": "0,1e-3",
            "seed": "0,1",
            "coupling": "additive,affine",
            "levels": "2",
            "warmup": "0,500",
            "grad_clip": "0,1",
        }
    )
    assert list(grid.axes) == ["batch_size", "init_batches", "lam", "seed", "coupling", "warmup", "grad_clip"]
    assert grid.axes["coupling"] == ["additive", "affine"]
    assert grid.axes["init_batches"] == [1]  # a core setting is a cell parameter even with one value
    assert grid.axes["lam"] == [0.0, 1e-3] and grid.axes["grad_clip"] == [0.0, 1.0]
    assert grid.fixed["levels"] == 2 and grid.fixed["steps_per_level"] == 4  # given, and the default
    assert grid.fixed["lr"] == 1e-5 and grid.fixed["dataset"] == "digits"  # the ablation's defaults
    assert not set(grid.fixed) & set(grid.axes)
    cells = grid.cells
    assert len(cells) == 2 * 1 * 2 * 2 * 2 * 2 * 2
    assert len(keys(cells)) == len(cells)
    cell = {
        "batch_size": 4,
        "init_batches": 1,
        "lam": 1e-3,
        "seed": 1,
        "coupling": "affine",
        "warmup": 500,
        "grad_clip": 1.0,
    }
    assert cell in cells
    config = grid.config_for(cell)
    assert (config.train.batch_size, config.train.init_batches, config.train.lam, config.train.seed) == (
        4,
        1,
        1e-3,
        1,
    )
    assert (config.model.coupling, config.train.warmup, config.train.grad_clip) == ("affine", 500, 1.0)
    assert (config.model.n_levels, config.train.lr) == (2, 1e-5)
    assert cell_slug(cell) == "M1-lam0.001-b4-seed1-coupling_affine-warmup_500-grad_clip_1"


def test_grid_defaults_are_the_papers_setting() -> None:
    grid = build_grid({})
    assert grid.axes == {
        "batch_size": [1], "init_batches": [1, 256], "lam": [1e-3], "seed": [0, 1, 2, 3, 4, 5],
    }  # fmt: skip
    assert grid.fixed["coupling"] == "additive"


def test_toml_file_is_merged_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text(
        'dataset = "digits"\nseeds = [0, 1, 2]\ninit-batches = [1, 16]\nlam = [0, 1e-3]\n'
        'steps = 50\ncoupling = ["additive", "affine"]\nsteps_per_level = 2\n'
    )
    grid = build_grid({"init_batches": "4", "steps": "7", "lam": None}, config)
    assert grid.axes["seed"] == [0, 1, 2]  # `seeds` in the file is the seed axis
    assert grid.axes["init_batches"] == [4]  # the command line wins
    assert grid.axes["lam"] == [0.0, 1e-3]  # not given on the command line: the file's
    assert grid.axes["coupling"] == ["additive", "affine"]
    assert grid.fixed["steps"] == 7 and grid.fixed["steps_per_level"] == 2
    assert len(grid.cells) == 3 * 1 * 2 * 2


def test_the_repository_ablation_files_parse() -> None:
    for path in sorted((REPO_ROOT / "ablations").glob("*.toml")):
        grid = build_grid({}, path)
        assert grid.cells, path


def test_an_option_given_as_its_default_is_the_same_study() -> None:
    plain = build_grid({"steps": "6"})
    explicit = build_grid({"steps": "6", "steps_per_level": "4", "coupling": "additive"})
    assert plain.fixed_json() == explicit.fixed_json()
    # Where a cell runs is not what it computes: machines may differ there.
    assert plain.fixed_json() == build_grid({"steps": "6", "device": "cpu", "flush_every": "7"}).fixed_json()
    assert plain.fixed_json() != build_grid({"steps": "6", "steps_per_level": "2"}).fixed_json()


@pytest.mark.parametrize(
    ("lists", "toml", "message"),
    [
        ({"flush_every": "3,6"}, "", "--flush-every takes one value"),
        ({}, "flush-every = [3, 6]\n", "--flush-every takes one value"),
        ({}, "device = ['cpu', 'cuda']\n", "--device takes one value"),
        ({"batch_size": "1,abc"}, "", "--batch-size: 'abc' is not a valid int"),
        ({"init_batches": "1,,2"}, "", "--init-batches: '1,,2' has an empty item"),
        ({"batch_size": "0"}, "", "--batch-size 0: must be at least 1; pass e.g. 16"),
        ({"seed": "-1"}, "", "--seed -1: must be at least 0; pass e.g. 0"),
        ({"lam": "1e-3,-1"}, "", "--lam -1.0: must be at least 0; pass e.g. 0"),
        ({"lr": "0"}, "", "--lr 0.0: must be greater than 0; pass e.g. 0.001"),
        ({"lam": "nan"}, "", "--lam: 'nan' is not a valid float"),
        ({"coupling": "additive,bogus"}, "", "--coupling: 'bogus' is not one of additive, affine"),
        ({"epochs": "none,2"}, "", "'none' cannot be one value of a grid axis"),
        ({}, "bogus = 1\n", "unknown setting 'bogus'"),
        ({}, "steps = true\n", "--steps: True is not a valid int"),
        ({}, "seeds = []\n", "seeds is an empty list"),
        ({}, "steps = \n", "not valid TOML"),
    ],
)
def test_grid_refuses_bad_settings(tmp_path: Path, lists: dict, toml: str, message: str) -> None:
    config = None
    if toml:
        config = tmp_path / "bad.toml"
        config.write_text(toml)
    with pytest.raises(UserError, match="^.*" + message.replace("(", r"\(").replace("[", r"\[")):
        build_grid(lists, config)


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_config_file(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="cannot read it"):
        read_config_file(tmp_path)


# --- whole ablations ---------------------------------------------------------------------------


def test_ablation_end_to_end_rerun_and_grown_grid(tmp_path: Path) -> None:
    out = tmp_path / "abl"
    args = [*TINY, "--batch-size", "1", "--init-batches", "1,4", "--seeds", "0", "--out", str(out)]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    study = load(sqlite_url(out))
    cells = [{"batch_size": 1, "init_batches": m, "lam": 1e-3, "seed": 0} for m in (1, 4)]
    done = expect_once(study, cells)
    assert len(study.trials) == 2
    for key, trial in done.items():
        cell = json.loads(key)
        assert trial.params == cell  # the cell values are the trial's parameters
        attrs = trial.user_attrs
        for name in ("status", "nan_onset_step", "nan_onset_layer", "hdf5_path", "best_bpd", "final_bpd"):
            assert name in attrs, name
        assert "step2_peak_max_abs" in attrs
        path = Path(attrs["hdf5_path"])
        assert path == out.resolve() / "runs" / cell_slug(cell) / "run.h5"
        record = read_run(path)
        assert record.config["train"]["init_batches"] == cell["init_batches"]
        assert record.config["train"]["batch_size"] == 1 and record.config["model"]["n_steps"] == 1
        assert (record.status, record.nan_onset_step, record.nan_onset_layer) == (
            attrs["status"],
            attrs["nan_onset_step"],
            attrs["nan_onset_layer"],
        )
        if attrs["status"] == "completed":
            assert trial.value == pytest.approx(attrs["best_bpd"])
            assert attrs["best_bpd"] == pytest.approx(float(np.min(record.eval_bpd)))
            assert attrs["final_bpd"] == pytest.approx(float(record.bpd[-1]))
            row = int(np.flatnonzero(record.step == 2)[0])
            assert attrs["step2_peak_max_abs"] == pytest.approx(float(np.max(record.max_abs[row])))
            # Every held-out evaluation is an intermediate value: Optuna Dashboard's learning curve.
            expected = dict(zip(record.eval_step.tolist(), record.eval_bpd.tolist(), strict=True))
            assert trial.intermediate_values == pytest.approx(expected) and len(expected) == 2
        else:
            assert math.isinf(trial.value) and attrs["best_bpd"] is None
    assert sorted(p.relative_to(out) for p in out.rglob("run.h5")) == sorted(
        Path("runs") / cell_slug(cell) / "run.h5" for cell in cells
    )
    # M = 1 at batch size 1 overflows at once; M = 4 does not. Both are results: exit 0.
    diverged = done[cell_key(cells[0])].user_attrs
    assert diverged["status"] == "diverged" and 1 <= diverged["nan_onset_step"] <= 2
    assert diverged["nan_onset_layer"]
    assert done[cell_key(cells[1])].user_attrs["status"] == "completed"
    assert "diverged" in result.output and "completed" in result.output

    _rerun_then_grow(tmp_path, out, args, cells, {t.number: t.datetime_complete for t in study.get_trials()})


def _rerun_then_grow(tmp_path: Path, out: Path, args: list[str], cells: list[dict], before: dict) -> None:
    """The same command again runs nothing; a grown grid runs only its new cell."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "2 cells: 2 done, 0 interrupted, 0 pending; 0 to run" in " ".join(result.output.split())
    assert {t.number: t.datetime_complete for t in load(sqlite_url(out)).get_trials()} == before

    # A new M, from a config file this time: only its cell runs.
    config = tmp_path / "grown.toml"
    config.write_text("batch-size = [1]\ninit-batches = [1, 4, 8]\nseeds = [0, 1]\n")
    result = invoke(*TINY, "--config", str(config), "--seeds", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    study = load(sqlite_url(out))
    expect_once(study, [*cells, {"batch_size": 1, "init_batches": 8, "lam": 1e-3, "seed": 0}])
    assert len(study.trials) == 3
    assert {t.number: t.datetime_complete for t in study.get_trials() if t.number in before} == before
    assert len(list(out.rglob("run.h5"))) == 3


def _cells(out: Path) -> dict[str, str]:
    """The cells file's states (empty until the runner first wrote it)."""
    try:
        return json.loads((out / CELLS_FILE).read_text())["cells"]
    except FileNotFoundError:
        return {}


@pytest.mark.slow
def test_a_killed_workers_cell_runs_again_and_only_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "abl"
    # Ten minutes of grace: the killed worker's trial must come back through its claim record (this
    # machine, a process that is gone), not through a heartbeat going stale.
    monkeypatch.setenv("FLOWDIAG_GRACE_SECONDS", "600")
    args = [*TINY, "--steps", "40", "--eval-every", "20", "--batch-size", "1", "--init-batches", "4,8,16"]
    args += ["--seeds", "0", "--workers", "1", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "flowdiag", "ablate", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **ENV},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill it in the middle of its second cell, once claimed
            states = _cells(out)
            if sorted(states.values()) == ["done", "running", "waiting"]:
                break
            assert process.poll() is None, f"the worker ended before it could be killed: {states}"
            time.sleep(0.05)
        else:
            pytest.fail("the worker never reached its second cell")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    study = load(sqlite_url(out))
    first = study.trials[0]
    killed_cell = study.trials[1].user_attrs["cell"]
    assert study.trials[1].state == TrialState.RUNNING  # what a killed worker leaves behind

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    study = load(sqlite_url(out))
    cells = [{"batch_size": 1, "init_batches": m, "lam": 1e-3, "seed": 0} for m in (4, 8, 16)]
    done = expect_once(study, cells)
    assert done[first.user_attrs["cell"]].number == 0  # the finished cell did not run again
    assert done[first.user_attrs["cell"]].datetime_complete == first.datetime_complete
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.user_attrs["cell"] for t in failed] == [killed_cell]
    assert done[killed_cell].number > 1
    assert len(study.trials) == 4  # 3 cells + the killed attempt
    assert len(list((out / "runs").rglob("run.h5"))) == 3
    stale = list((out / ".stale").iterdir()) if (out / ".stale").exists() else []
    assert len(stale) <= 1  # the killed attempt's folder, if it got that far: out of the report


def tiny_spec(out: Path, init_batches: str = "4") -> AblationSpec:
    settings = {"levels": "3", "steps_per_level": "1", "hidden": "8", "steps": "6", "eval_every": "3"}
    settings |= {"eval_batches": "1", "flush_every": "3", "device": "cpu", "init_batches": init_batches}
    return AblationSpec(build_grid({**settings, "seed": "0"}), out, sqlite_url(out), "ablation")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # `ask()` outside optimize: the test's claim
def test_a_trial_claimed_by_a_worker_killed_before_its_claim_record_is_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, report, _ = prepare(tiny_spec(tmp_path))
    assert report.queued == 1
    # What a worker killed right after `ask()` claimed the trial leaves: RUNNING, no heartbeat and
    # no claim record of ours.
    claimed = study.ask()
    assert claimed.user_attrs["cell"] and CLAIM_ATTR not in claimed.user_attrs
    reaper = Reaper()
    assert reaper.sweep(study) == 0  # seen unclaimed for the first time: it may be claiming now
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING  # Optuna alone would leave it so for ever
    monkeypatch.setattr(storage_module, "grace_seconds", lambda: 0)
    assert reaper.sweep(study) == 1  # still unclaimed after the grace period, on this process's clock
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == claimed.params
    assert trials[1].user_attrs == {"cell": claimed.user_attrs["cell"], storage_module.DEATHS_ATTR: 1}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_worker_on_this_machine_is_gone_is_queued_again_at_once(tmp_path: Path) -> None:
    """The claim record names the process: on its own machine a rerun needs no heartbeat to go stale."""
    study, _, _ = prepare(tiny_spec(tmp_path, init_batches="4,8"))
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from flowdiag.ablation.claims import this_worker; print(json.dumps(this_worker()))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    dead, alive = study.ask(), study.ask()
    dead.set_user_attr(CLAIM_ATTR, json.loads(child.stdout))  # a process that has exited since
    from flowdiag.ablation.claims import this_worker

    alive.set_user_attr(CLAIM_ATTR, this_worker())
    assert Reaper().sweep(study) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states[dead.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    requeued = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["cell"] for t in requeued] == [dead.user_attrs["cell"]]


CLAIM_AND_HANG = """
import socket, sys, time
import optuna
socket.gethostname = lambda: "another-machine"  # its claim record names a host the test is not on
from flowdiag.ablation.attempt import claim
from flowdiag.ablation.storage import make_storage

def objective(trial):
    claim(trial)
    # Optuna's heartbeat thread beats first as the trial starts, beside this objective: on a loaded
    # machine the claim can come before that beat. A worker that dies with no beat at all is the case
    # the claim record answers on its own machine; this test is about one that dies between beats.
    time.sleep(2.0)
    print("claimed", flush=True)
    time.sleep(600)

optuna.load_study(study_name="ablation", storage=make_storage(sys.argv[1])).optimize(objective, n_trials=1)
"""


@pytest.mark.slow
def test_a_worker_killed_on_another_machine_comes_back_when_its_heartbeat_goes_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna's heartbeat check (public fail_stale_trials) fails it; our callback queues the cell
    again with nothing of the dead worker's claim."""
    monkeypatch.setenv("FLOWDIAG_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("FLOWDIAG_GRACE_SECONDS", "2")
    study, _, _ = prepare(tiny_spec(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HANG, sqlite_url(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "claimed"
    finally:
        worker.kill()
        worker.wait()
    (claimed,) = study.get_trials()
    assert claimed.state == TrialState.RUNNING and claimed.user_attrs[CLAIM_ATTR]["host"] == "another-machine"
    reaper = Reaper()
    assert reaper.sweep(study) == 0  # not this machine's process: only the heartbeat can tell
    deadline = time.monotonic() + 30
    while not study.get_trials(states=(TrialState.WAITING,)):  # stale after 2 s without a beat
        assert time.monotonic() < deadline, "the stale trial was never failed"
        time.sleep(0.2)
        reaper.sweep(study)
    dead, again = study.get_trials()
    assert dead.state == TrialState.FAIL and again.state == TrialState.WAITING
    assert again.user_attrs == {"cell": claimed.user_attrs["cell"], storage_module.DEATHS_ATTR: 1}


def test_a_cell_queued_by_two_machines_at_once_runs_once(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, init_batches="4,8")
    study, report, _ = prepare(spec)
    assert report.queued == 2
    for cell in spec.grid.cells:  # a second machine that synced at the same moment
        distributions = {
            k: IntDistribution(v, v) if isinstance(v, int) else FloatDistribution(v, v)
            for k, v in cell.items()
        }
        study.add_trial(
            create_trial(
                state=TrialState.WAITING,
                params=cell,
                distributions=distributions,
                user_attrs={"cell": cell_key(cell)},
            )
        )
    work(spec)
    done = expect_once(load(sqlite_url(tmp_path)), spec.grid.cells)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert sorted(t.user_attrs["duplicate_of"] for t in pruned) == sorted(t.number for t in done.values())
    assert len(list(tmp_path.rglob("run.h5"))) == 2


@pytest.mark.slow
def test_two_workers_on_sqlite_cover_the_grid_once(tmp_path: Path) -> None:
    out = tmp_path / "abl"
    args = [*TINY, "--batch-size", "1", "--init-batches", "4,8", "--seeds", "0,1", "--workers", "2"]
    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    cells = grid_cells(init_batches=[4, 8])
    expect_once(load(sqlite_url(out)), cells)
    assert len(list(out.rglob("run.h5"))) == len(cells)


@pytest.mark.parametrize(
    ("changed", "shown"),
    [
        (["--steps-per-level", "2"], "steps_per_level: 1 -> 2"),
        (["--lr", "1e-4"], "lr: 1e-05 -> 0.0001"),
    ],
)
def test_a_study_reused_with_other_fixed_settings_is_refused(
    tmp_path: Path, changed: list[str], shown: str
) -> None:
    out = tmp_path / "abl"
    grid = build_grid(
        {"steps": "6", "levels": "3", "steps_per_level": "1", "hidden": "8", "init_batches": "4"}
    )
    prepare(AblationSpec(grid, out, sqlite_url(out), "ablation"))
    before = digest(out)
    args = [*TINY, "--batch-size", "1", "--init-batches", "4", "--out", str(out)]
    result = invoke(*args, *changed)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "study 'ablation' was made with other fixed settings" in result.output and shown in result.output
    assert digest(out) == before


def _open_studies(url: str, names: list[str], fixed: str, barrier: object, results: object) -> None:
    from flowdiag.ablation.study import open_study

    outcomes = []
    for name in names:
        barrier.wait()  # type: ignore[attr-defined]  # both processes open the new study at once
        try:
            open_study(url, name, "ablation", fixed, ["init_batches"])
            outcomes.append("opened")
        except UserError as error:
            outcomes.append("refused" if "other fixed settings" in str(error) else str(error))
        except Exception as error:  # what two machines starting one study met: a KeyError
            outcomes.append(f"{type(error).__name__}: {error}")
    results.put(outcomes)  # type: ignore[attr-defined]


def _start_at_once(url: str, names: list[str], same_settings: bool) -> None:
    """Two processes open each new study at the same moment. Same settings: both open it. Other
    settings: at least one is refused. Never a traceback."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    fixed = ['{"lr": 0.001}', '{"lr": 0.001}' if same_settings else '{"lr": 0.01}']
    processes = [context.Process(target=_open_studies, args=(url, names, f, barrier, results)) for f in fixed]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    for first, second in zip(*outcomes, strict=True):
        if same_settings:
            assert (first, second) == ("opened", "opened")
        else:
            assert {first, second} <= {"opened", "refused"} and "refused" in (first, second)


@pytest.mark.parametrize("same_settings", [True, False])
def test_processes_starting_one_new_study_at_once(tmp_path: Path, same_settings: bool) -> None:
    # Before the database chose the creator, this met a KeyError, and let in other settings.
    _start_at_once(sqlite_url(tmp_path), [f"study-{i}" for i in range(12)], same_settings)


@pytest.mark.postgres
@pytest.mark.parametrize("same_settings", [True, False])
def test_processes_starting_one_new_postgres_study_at_once(postgres_url: str, same_settings: bool) -> None:
    names = [f"test-{uuid.uuid4().hex[:12]}" for _ in range(6)]
    try:
        _start_at_once(postgres_url, names, same_settings)
    finally:
        for name in names:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=name, storage=postgres_url)


def test_a_study_whose_creator_died_before_labelling_it_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path)
    optuna.create_study(study_name="orphan", storage=url)  # created, never labelled
    monkeypatch.setattr(study_module, "CREATOR_WAIT_SECONDS", 0.2)
    study_module.open_study(url, "orphan", "ablation", '{"lr": 0.001}', ["init_batches"])
    assert load(url, "orphan").user_attrs == {
        "kind": "ablation",
        "fixed": '{"lr": 0.001}',
        "axes": ["init_batches"],
    }
    with pytest.raises(UserError, match="other fixed settings"):  # labelled now: checked as usual
        study_module.open_study(url, "orphan", "ablation", '{"lr": 0.01}', ["init_batches"])


# --- bad input: one line, exit 2, nothing written ----------------------------------------------

BAD_INPUTS = [
    ["--batch-size", "1,abc"],
    ["--init-batches", "1,,2"],
    ["--batch-size", "0"],
    ["--init-batches", "-4"],
    ["--seeds", "0,-1"],
    ["--lam", "-1e-3"],
    ["--lam", "1e-3,-1"],
    ["--dataset", "nosuch"],
    ["--dataset", "mnist"],
    ["--dataset", "mnist", "--data-root", "/nonexistent/mnist"],
    ["--storage", "not a url"],
    ["--storage", "foo://bar"],
    ["--storage", "postgresql://u:secret@127.0.0.1:1/db"],
    ["--storage", "sqlite:////nonexistent_dir/x.db"],
    ["--config", "MISSING"],
    ["--config", "NOT_TOML"],
    ["--config", "A_FOLDER"],
    ["--flush-every", "3,6"],
    ["--device", "tpu"],
    ["--workers", "0"],
]


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, bad: list[str], existing: bool
) -> None:
    files = {"MISSING": tmp_path / "missing.toml", "NOT_TOML": tmp_path / "bad.toml", "A_FOLDER": tmp_path}
    files["NOT_TOML"].write_text("init-batches = [1, 16\n")
    bad = [str(files.get(arg, arg)) for arg in bad]
    out = tmp_path / "abl"
    if existing:
        out.mkdir()
        (out / "study.db").write_bytes(b"not touched")
        (out / "notes.txt").write_text("keep me")
    before = digest(out) if existing else None
    result = invoke(*TINY, "--init-batches", "4", "--out", str(out), *bad)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "secret" not in result.output
    if existing:
        assert digest(out) == before
    else:
        assert not out.exists()


def test_an_out_that_is_a_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.write_bytes(b"someone's file")
    result = invoke(*TINY, "--init-batches", "4", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: cannot create --out") and result.output.count("\n") == 1
    assert out.read_bytes() == b"someone's file"


# --- PostgreSQL: one study, several processes or machines --------------------------------------


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("FLOWDIAG_TEST_POSTGRES")
    if not url:
        pytest.skip("FLOWDIAG_TEST_POSTGRES is not set (.ci/run starts a server and sets it)")
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # no driver, no server, bad credentials: all mean skip here
        pytest.skip(f"PostgreSQL at FLOWDIAG_TEST_POSTGRES is unreachable: {type(error).__name__}")
    return url


@pytest.fixture
def study_name(postgres_url: str) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(KeyError):  # a test that failed early made no study
        optuna.delete_study(study_name=name, storage=postgres_url)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_postgres_cover_the_grid_once(
    tmp_path: Path, postgres_url: str, study_name: str
) -> None:
    out = tmp_path / "abl"
    args = [*TINY, "--batch-size", "1", "--init-batches", "4,8", "--seeds", "0,1", "--workers", "2"]
    result = invoke(*args, "--storage", postgres_url, "--study", study_name, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "flowdiag:flowdiag@" not in result.output  # the password is not printed
    expect_once(load(postgres_url, study_name), grid_cells(init_batches=[4, 8]))
    assert len(list(out.rglob("run.h5"))) == 4


@pytest.mark.slow
@pytest.mark.postgres
def test_two_machines_on_one_postgres_study_cover_the_grid_once(
    tmp_path: Path, postgres_url: str, study_name: str
) -> None:
    """Two separate `flowdiag ablate` processes, as on two machines, each with its own --out."""
    args = [*TINY, "--batch-size", "1", "--init-batches", "4,8", "--seeds", "0,1"]
    args += ["--storage", postgres_url, "--study", study_name]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "flowdiag", "ablate", *args, "--out", str(tmp_path / f"machine{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **ENV},
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    cells = grid_cells(init_batches=[4, 8])
    done = expect_once(load(postgres_url, study_name), cells)
    files = sorted(tmp_path.rglob("run.h5"))
    assert len(files) == len(cells)
    assert {str(p.resolve()) for p in files} == {t.user_attrs["hdf5_path"] for t in done.values()}


def test_workers_auto_is_cells_left_capped_by_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "cpu_count", lambda: 2)
    assert [cores.resolve_workers("auto", left) for left in (0, 1, 2, 5)] == [1, 1, 2, 2]
    assert cores.resolve_workers("3", 1) == 3  # an explicit count is taken as given
    for bad in ("0", "-1", "two"):
        with pytest.raises(UserError, match="--workers"):
            cores.resolve_workers(bad, 4)


def test_auto_workers_each_run_one_torch_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the auto policy itself, not the env's
    out = tmp_path / "abl"
    result = invoke(*TINY, "--batch-size", "1", "--init-batches", "4,8", "--seeds", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    workers = min(2, cores.cpu_count())
    assert f"2 to run on {workers} worker(s)" in result.output
    trials = load(sqlite_url(out)).get_trials(states=COMPLETE)
    assert [t.user_attrs["torch_threads"] for t in trials] == [1, 1]
    # On a loaded machine one worker may take both cells before the other starts.
    pids = {t.user_attrs["worker_pid"] for t in trials}
    assert 1 <= len(pids) <= workers
    if workers > 1:  # worker processes ran the cells, not the launcher
        assert os.getpid() not in pids


def test_workers_start_whatever_omp_num_threads_says(tmp_path: Path) -> None:
    """Seen once: with OMP_NUM_THREADS set, the launcher's OpenMP pool existed when it forked, and every
    worker hung at its first parallel region. The launcher now runs one thread whatever the environment
    says, and forks only then; the workers take the environment's count."""
    out = tmp_path / "abl"
    args = [
        *TINY,
        "--batch-size",
        "1",
        "--init-batches",
        "4,8",
        "--seeds",
        "0",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "2"}
    finished = subprocess.run(
        [sys.executable, "-m", "flowdiag", "ablate", *args], env=env, timeout=240, capture_output=True
    )
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    trials = load(sqlite_url(out)).get_trials(states=COMPLETE)
    assert [t.user_attrs["torch_threads"] for t in trials] == [2, 2]


@pytest.mark.parametrize(
    ("env", "requested", "expected"), [("", 0, 1), ("abc", 0, 1), ("3", 0, 3), ("3", 2, 2)]
)
def test_thread_count(monkeypatch: pytest.MonkeyPatch, env: str, requested: int, expected: int) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    try:
        assert environment.configure_threads(requested) == expected
    finally:
        torch.set_num_threads(1)
