"""A user's own Optuna study: `Monitor(trial=trial)` keeps each run's stability on its trial under the
names `flowdiag ablate` uses, and `StabilityPruner` prunes the trials whose flow went unstable, leaving
the rest to the pruner it wraps. Real studies on SQLite, a y0ast-style Glow trained at batch 2."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

import flowdiag
from flowdiag.ablation.attempt import record_result
from flowdiag.integrations.optuna import StabilityPruner
from flowdiag.record import trial_record
from flowdiag.record.store import read_run
from flowdiag.report import collect_runs
from flowdiag.runtime.distributed import Ranks
from flowdiag.runtime.errors import UserError
from flowdiag.train.trainer import RunResult
from tests.examples import load_example
from tests.handwritten_flows import threaded_glow
from tests.library_flows import images

BROKEN_LAYER = "flow.layers.5.invconv"
STEPS = 6


def _objective(root: Path, events: dict[int, tuple[str, int]]) -> Callable[[optuna.Trial], float]:
    """Each trial trains STEPS steps; `events[trial.number] = (what, step)`: "nan" (an inf log|u|),
    "spike" (inputs 30 times larger from then on: finite, over 100) or "loss" (1e9 reported then)."""

    def objective(trial: optuna.Trial) -> float:
        what, at = events.get(trial.number, ("calm", 0))
        model = threaded_glow(noise=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        with flowdiag.Monitor(model, root / f"trial-{trial.number}", trial=trial, log_every=1) as monitor:
            for step in range(1, STEPS + 1):
                if what == "nan" and step == at:
                    with torch.no_grad():
                        model.flow.layers[5].invconv.log_s[0] = float("inf")
                x = images(2, size=8, seed=step) * (30.0 if what == "spike" and step >= at else 1.0)
                optimizer.zero_grad()
                loss = model(x)[1].mean()
                loss.backward()
                monitor.step(loss)
                trial.report(1e9 if what == "loss" and step == at else float(loss.detach()), step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
                optimizer.step()
        return float(loss.detach())

    return objective


def test_the_pruner_prunes_unstable_trials_and_report_reads_the_studys_runs(tmp_path: Path) -> None:
    pruner = StabilityPruner(max_abs=100.0, wrapped=optuna.pruners.ThresholdPruner(upper=1e6))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", pruner=pruner)
    events = {1: ("nan", 3), 2: ("spike", 2), 3: ("loss", 4)}
    study.optimize(_objective(tmp_path / "runs", events), n_trials=4)
    calm, nan, spike, loss = study.get_trials()
    assert [t.state for t in (calm, nan, spike, loss)] == [TrialState.COMPLETE, *[TrialState.PRUNED] * 3]
    assert (calm.user_attrs["status"], calm.user_attrs["nan_onset_step"]) == ("completed", -1)
    assert calm.user_attrs["steps"] == STEPS and calm.user_attrs["peak_max_abs"] < 100.0
    attrs = nan.user_attrs  # pruned at the onset's own step
    assert (attrs["status"], attrs["nan_onset_step"], attrs["nan_onset_layer"]) == (
        "diverged",
        3,
        BROKEN_LAYER,
    )
    assert attrs["steps"] == 3 and attrs["peak_max_abs"] == math.inf  # inf through SQLite's JSON
    assert spike.user_attrs["steps"] == 2 and spike.user_attrs["peak_max_abs"] > 100.0
    assert (spike.user_attrs["status"], spike.user_attrs["nan_onset_step"]) == ("interrupted", -1)
    assert loss.user_attrs["steps"] == 4 and loss.user_attrs["peak_max_abs"] < 100.0  # the wrapped pruner's
    for trial in study.get_trials():
        record = read_run(Path(trial.user_attrs["hdf5_path"]))
        assert (record.status, record.nan_onset_step) == (
            trial.user_attrs["status"],
            trial.user_attrs["nan_onset_step"],
        )
    assert len(collect_runs(tmp_path / "runs")) == 4


class Recorder:
    """A trial that remembers its attribute writes, in order (around a real in-memory trial)."""

    def __init__(self, trial: Any = None) -> None:
        self.trial = trial
        self.writes: list[str] = []

    def set_user_attr(self, key: str, value: Any) -> None:
        self.writes.append(key)
        if self.trial is not None:
            self.trial.set_user_attr(key, value)


def test_a_step_writes_to_the_trial_only_at_the_onset_and_every_n_steps(tmp_path: Path) -> None:
    trial = Recorder(optuna.create_study().ask())
    model = threaded_glow(noise=False)
    with flowdiag.Monitor(model, tmp_path, trial=trial, log_every=5) as monitor:
        per_step: list[list[str]] = []
        for step in range(1, 13):
            if step == 8:
                with torch.no_grad():
                    model.flow.layers[5].invconv.log_s[0] = float("inf")
            before = len(trial.writes)
            loss = model(images(2, size=8, seed=step))[1].mean()
            loss.backward()
            monitor.step(loss)
            per_step.append(trial.writes[before:])
    assert trial.writes[:2] == ["hdf5_path", "status"]
    written = {step: keys for step, keys in enumerate(per_step, start=1) if keys}
    assert written == {5: ["peak_max_abs"], 8: ["nan_onset_step", "nan_onset_layer", "peak_max_abs"]}
    assert trial.trial.user_attrs["nan_onset_layer"] == BROKEN_LAYER


def test_the_trial_attributes_are_the_ones_ablate_writes(tmp_path: Path) -> None:
    ablate = Recorder()
    result = RunResult("completed", tmp_path, 3, 1.0, 1.0, -1, "", 2.0, 2.0, 10.0)
    record_result(ablate, result)  # type: ignore[arg-type]
    ours = Recorder()
    with flowdiag.Monitor(threaded_glow(noise=False), tmp_path / "run", trial=ours):
        pass
    assert set(ours.writes) - {trial_record.PEAK} <= set(ablate.writes)
    assert {"status", "nan_onset_step", "nan_onset_layer", "hdf5_path"} <= set(ours.writes)


def test_only_rank_0_writes_to_the_trial_and_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    trial = Recorder()
    flowdiag.Monitor(threaded_glow(noise=False), tmp_path, trial=trial, ranks=Ranks(rank=1, world=2))
    assert trial.writes == []
    with pytest.raises(UserError, match=r"takes the optuna\.Trial"):
        flowdiag.Monitor(threaded_glow(noise=False), tmp_path / "x", trial=object())
    with pytest.raises(UserError, match="max_abs"):
        StabilityPruner(max_abs=0)
    with pytest.raises(UserError, match="takes an Optuna pruner"):
        StabilityPruner(wrapped="median")  # type: ignore[arg-type]


def test_the_optuna_example_prunes_the_m_1_trial_at_a_tiny_size(tmp_path: Path) -> None:
    study = load_example("optuna_study").main(["--tiny", "--out", str(tmp_path)])
    by_m = {t.params["init_batches"]: t for t in study.get_trials()}
    assert by_m[1].state == TrialState.PRUNED and by_m[1].user_attrs["status"] == "diverged"
    assert by_m[16].state == TrialState.COMPLETE and by_m[16].user_attrs["status"] == "completed"
    assert len(collect_runs(tmp_path)) == 2
