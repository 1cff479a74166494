"""`flowdiag tune-lambda`: TPE steered away from diverging λ, resume, a real run over seeds, and bad input."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from flowdiag.ablation.spec import TuneSpec
from flowdiag.ablation.storage import default_storage_url
from flowdiag.ablation.tune import open_tuning, run_tuning, tuning_rows, worst_case_bpd
from flowdiag.cli import app
from flowdiag.record.store import read_run
from flowdiag.settings.config import RunConfig
from flowdiag.train.trainer import RunResult

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
DIVERGES_ABOVE = 1e-2
BEST_LAM = 1e-4
TINY = [
    *("--dataset", "digits", "--levels", "3", "--steps-per-level", "1", "--hidden", "8", "--device", "cpu"),
    *("--batch-size", "4", "--init-batches", "4", "--lr", "1e-4", "--steps", "6", "--eval-every", "3"),
    *("--eval-batches", "1", "--flush-every", "3"),
]


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeTrain:
    """Stands in for `train`: diverges above λ = 1e-2 (and, on the seeds in `diverging_seeds`, above
    λ = 1e-3), else a bpd smooth in log λ, least at 1e-4, plus `seed_offset` per seed."""

    def __init__(self, seed_offset: float = 0.0, diverging_seeds: tuple[int, ...] = ()) -> None:
        self.runs: list[tuple[float, int]] = []  # (λ, seed) of every run trained, in order
        self.out_dirs: list[Path] = []
        self.seed_offset, self.diverging_seeds = seed_offset, diverging_seeds
        self.after: Callable[[], None] = lambda: None  # called once a run has trained

    @property
    def lams(self) -> list[float]:
        return [lam for lam, _ in self.runs]

    def __call__(self, config: RunConfig, out_dir: Path, **_: object) -> RunResult:
        lam, seed = config.train.lam, config.train.seed
        self.runs.append((lam, seed))
        self.out_dirs.append(out_dir)
        self.after()
        if lam > DIVERGES_ABOVE or (seed in self.diverging_seeds and lam > DIVERGES_ABOVE / 10):
            return RunResult("diverged", out_dir, 1, math.nan, math.inf, 1, "loss", math.nan, math.nan, 1.0)
        bpd = 1.0 + 0.1 * (math.log10(max(lam, 1e-9)) - math.log10(BEST_LAM)) ** 2 + self.seed_offset * seed
        return RunResult("completed", out_dir, 10, bpd + 0.01, bpd, -1, "", 2.0, 2.0, 1.0)


def spec_for(
    out: Path, n_trials: int, lam_min: float = 1e-6, lam_max: float = 1e2, seeds: tuple[int, ...] = ()
) -> TuneSpec:
    storage = default_storage_url(out)
    return TuneSpec(RunConfig(), lam_min, lam_max, n_trials, out, storage, "tune", seeds=seeds)


def tune(spec: TuneSpec, fake: FakeTrain) -> optuna.Study:
    study, data = open_tuning(spec)
    return run_tuning(spec, study, data, train_fn=fake)


def test_tpe_learns_to_avoid_the_diverging_lambdas(tmp_path: Path) -> None:
    fake = FakeTrain()
    study = tune(spec_for(tmp_path, 25), fake)
    trials = study.get_trials()
    assert len(trials) == 25 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].user_attrs["lam_value"] == 0.0 == fake.lams[0]  # the unpenalized baseline first
    diverged = [t for t in trials if t.user_attrs["status"] == "diverged"]
    assert diverged, "the first, random trials should have hit the diverging range"
    for trial in trials:  # a diverged trial is a result: worst-case value and an infeasible constraint
        if trial.user_attrs["status"] == "diverged":
            assert trial.value == worst_case_bpd(RunConfig()) == 16.0
            assert trial.constraints == {"diverged": 1.0}  # the rate of its seeds that diverged
            assert trial.user_attrs["lam_value"] > DIVERGES_ABOVE and trial.user_attrs["nan_onset_step"] == 1
        else:
            assert trial.value < 16.0 and trial.constraints == {"diverged": 0.0}
    # Log-uniform sampling over [1e-6, 1e2] lands above 1e-2 half the time; TPE, told that this
    # range diverges, mostly stays below it once it has seen a few trials.
    late = [t.user_attrs["lam_value"] for t in trials[-10:]]
    assert sum(lam > DIVERGES_ABOVE for lam in late) <= 2, late
    lowest = min((row for row in tuning_rows(study) if row.feasible), key=lambda row: row.value)
    assert BEST_LAM / 10 < lowest.lam < BEST_LAM * 10
    assert study.best_trial.user_attrs["lam_value"] == lowest.lam  # Optuna's best is feasible too


def test_tuning_resumes_and_runs_only_what_is_missing(tmp_path: Path) -> None:
    fake = FakeTrain()
    tune(spec_for(tmp_path, 3), fake)
    assert len(fake.lams) == 3 and fake.lams[0] == 0.0
    tune(spec_for(tmp_path, 3), fake)
    assert len(fake.lams) == 3  # n_trials reached: nothing runs
    study = tune(spec_for(tmp_path, 5), fake)
    assert len(fake.lams) == 5  # only the difference
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 5
    assert [t.user_attrs["lam_value"] for t in study.get_trials()].count(0.0) >= 1
    with pytest.raises(Exception, match="other fixed settings"):
        tune(spec_for(tmp_path, 6, lam_max=1.0), fake)  # another λ range is another study
    with pytest.raises(Exception, match="other fixed settings"):
        tune(spec_for(tmp_path, 6, seeds=(0, 1)), fake)  # other seeds, another objective
    assert len(fake.lams) == 5
    tune(spec_for(tmp_path, 6, seeds=(0,)), fake)  # --seeds 0 is --seed 0: the same study
    assert len(fake.lams) == 6


def test_tune_lambda_command_end_to_end_over_seeds(tmp_path: Path) -> None:
    import json

    from rich.text import Text

    from flowdiag.cli.tune import best_lambda, compare_with_baseline, conclusion
    from flowdiag.runtime.files import CELLS_FILE

    out = tmp_path / "tune"
    args = ["tune-lambda", *TINY, "--n-trials", "2", "--lam-min", "1e-5", "--lam-max", "1e-2"]
    args += ["--seeds", "0,1", "--out", str(out)]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    assert "each λ on seed(s) 0,1" in result.output.splitlines()[0]
    study = optuna.load_study(study_name="tune-lambda", storage=default_storage_url(out))
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 and trials[0].user_attrs["lam_value"] == 0.0
    assert 1e-5 <= trials[1].user_attrs["lam_value"] <= 1e-2
    runs = []
    for trial in trials:  # every λ on every seed, each in a folder that names both
        lam, seeds = trial.user_attrs["lam_value"], trial.user_attrs["seeds"]
        assert sorted(seeds) == ["0", "1"]
        for seed, run in seeds.items():
            record = read_run(Path(run["hdf5_path"]))
            assert record.status == run["status"] and record.config["train"]["seed"] == int(seed)
            assert record.config["train"]["lam"] == lam
            assert run["run"] == f"trial{trial.number:04d}-lam{lam:.3g}-seed{seed}" == record.path.parent.name
            runs.append(run["run"])
        values = [16.0 if r["status"] == "diverged" else r["best_bpd"] for r in seeds.values()]
        assert trial.value == pytest.approx(sum(values) / 2)  # the objective: the seeds' mean
    assert json.loads((out / CELLS_FILE).read_text())["cells"] == dict.fromkeys(runs, "done")
    rows = tuning_rows(study)
    verdicts = compare_with_baseline(rows)
    said = Text.from_markup(conclusion(rows, verdicts, best_lambda(rows, verdicts))).plain
    assert said and said in result.output  # the verdict line, worded from the verdict
    # Rerun: the study already holds 2 trials, so nothing runs and the table is printed again.
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    assert said in result.output
    assert len(optuna.load_study(study_name="tune-lambda", storage=default_storage_url(out)).trials) == 2


@pytest.mark.parametrize(
    "bad",
    [
        ["--lam-min", "1e-2", "--lam-max", "1e-3"],
        ["--lam-min", "1e-3", "--lam-max", "1e-3"],
        ["--lam-min", "0"],
        ["--n-trials", "0"],
        ["--timeout", "0"],
        ["--storage", "not a url"],
        ["--storage", "postgresql://u:secret@127.0.0.1:1/db"],
        ["--batch-size", "0"],
        ["--dataset", "nosuch"],
        ["--dataset", "mnist"],
        ["--seeds", "0,,1"],
        ["--seeds", "a"],
        ["--seeds", "1,1"],
        ["--seeds", "-1"],
        ["--seed", "1", "--seeds", "0,1"],
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, bad: list[str]) -> None:
    out = tmp_path / "tune"
    result = CliRunner().invoke(app, ["tune-lambda", *TINY, "--out", str(out), *bad], env=ENV)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "secret" not in result.output
    assert not out.exists()


def test_parallel_workers_do_not_draw_the_same_lambda(tmp_path: Path) -> None:
    """Two workers with one sampler seed proposed the same λ twice (seen in a real study): each
    worker gets its own seed, and a λ still training counts as taken (constant liar)."""
    from flowdiag.ablation.tune import make_sampler, worker_spec

    spec = spec_for(tmp_path, 6)
    specs = [worker_spec(spec, index) for index in range(3)]
    assert len({s.sampler_seed for s in specs}) == 3 and specs[0] == spec
    drawn = []
    for s in specs:  # the same (empty) study for each: only the worker's seed differs
        study = optuna.create_study(sampler=make_sampler(s))
        drawn.append(study.ask().suggest_float("lam", 1e-6, 1e2, log=True))
    assert len(set(drawn)) == 3


def test_an_interrupted_multi_seed_trial_resumes_the_seeds_it_had_not_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import numpy as np

    from flowdiag.runtime.files import CELLS_FILE
    from flowdiag.train import trainer
    from tests.test_interrupt import signal_once

    out = tmp_path / "tune"
    args = ["tune-lambda", *TINY, "--n-trials", "1", "--seeds", "0,1", "--workers", "1", "--out", str(out)]
    env = {**ENV, "FLOWDIAG_GRACE_SECONDS": "600"}  # a rerun that waited for a stale heartbeat would hang
    seed1_step1 = lambda self, *a, **k: self.config.train.seed == 1 and self.state.step == 1  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        signal_once(patch, trainer.Trainer, "one_step", seed1_step1)
        result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 130, result.output
    (first,) = optuna.load_study(study_name="tune-lambda", storage=default_storage_url(out)).get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["status"] == "interrupted"
    assert first.user_attrs["steps"] == 2 and list(first.user_attrs["seeds"]) == ["0"]  # seed 0 finished
    cells = {"trial0000-lam0-seed0": "done", "trial0000-lam0-seed1": "interrupted"}
    assert json.loads((out / CELLS_FILE).read_text())["cells"] == cells
    seed0_file = Path(first.user_attrs["seeds"]["0"]["hdf5_path"])
    written = seed0_file.stat().st_mtime_ns

    trained: list[tuple[int, int]] = []
    original = trainer.Trainer.one_step

    def counted(self: trainer.Trainer, *a: object, **k: object) -> object:
        trained.append((self.config.train.seed, self.state.step))
        return original(self, *a, **k)

    monkeypatch.setattr(trainer.Trainer, "one_step", counted)
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "0 of 1 trials done, 1 interrupted (trial0000-lam0-seed1) resume;" in result.output.splitlines()[0]
    assert {seed for seed, _ in trained} == {1} and len(trained) == 4  # seed 1's steps 3-6, no more
    assert seed0_file.stat().st_mtime_ns == written  # seed 0 was not trained again
    (done,) = optuna.load_study(study_name="tune-lambda", storage=default_storage_url(out)).get_trials(
        states=(TrialState.COMPLETE,)
    )
    assert done.user_attrs["run_name"] == "trial0000-lam0" and done.user_attrs["resumed_from_step"] == 2
    assert sorted(done.user_attrs["seeds"]) == ["0", "1"] and done.user_attrs["lam_value"] == 0.0
    assert done.intermediate_values == first.intermediate_values != {}  # the first seed's curve, carried
    record = read_run(Path(done.user_attrs["seeds"]["1"]["hdf5_path"]))
    assert np.array_equal(record.step, np.arange(1, 7))  # continued, not restarted
    assert set(json.loads((out / CELLS_FILE).read_text())["cells"].values()) == {"done"}
