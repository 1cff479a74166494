"""tune-lambda over seeds, on real Optuna studies with a stand-in trainer: no λ trained twice, the
objective the seeds' mean, infeasible when a seed diverged, a stop between seeds, a used-up range."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import typer
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from flowdiag.ablation import tune as tune_module
from flowdiag.ablation.stopping import StopRequest
from flowdiag.ablation.tune import LambdaObjective, open_tuning, repeats_at_end, run_tuning, tuning_rows
from tests.test_tune import DIVERGES_ABOVE, FakeTrain, spec_for, tune

WORST = 16.0  # worst_case_bpd of the default config: 2 · 8 bits


def test_no_lambda_is_trained_twice_not_even_lambda_0(tmp_path: Path) -> None:
    """λ = 0 was trained twice in 4 trials when TPE could propose it: now it is no parameter, only the
    enqueued first trial; a second launcher's baseline and a proposal of a trained λ are pruned."""
    fake = FakeTrain()
    spec = spec_for(tmp_path, 4, lam_min=1e-6, lam_max=1e-2, seeds=(0, 1))
    study = tune(spec, fake)
    assert len(fake.runs) == len(set(fake.runs)) == 8  # 4 λ × 2 seeds, each (λ, seed) once
    assert fake.lams.count(0.0) == 2  # λ = 0 once, on both seeds
    for trial in study.get_trials():
        assert set(trial.distributions.values()) <= {FloatDistribution(1e-6, 1e-2, log=True)}
    trained = study.get_trials()[1].user_attrs["lam_value"]
    study.enqueue_trial({}, user_attrs={"lam_value": 0.0})  # what a second launcher would queue
    study.enqueue_trial({"lam": trained * (1 + 1e-5)})  # a proposal within a hair of a trained λ
    study = tune(spec_for(tmp_path, 5, lam_min=1e-6, lam_max=1e-2, seeds=(0, 1)), fake)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert [t.user_attrs["repeats"] for t in pruned] == ["trial0000-lam0", f"trial0001-lam{trained:.3g}"]
    assert len(fake.runs) == len(set(fake.runs)) == 10 and fake.lams.count(0.0) == 2
    assert len(tuning_rows(study)) == 5 and repeats_at_end(study) == 0  # the last trial trained


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() rather than optimize(): the race by hand
def test_of_two_trials_running_one_lambda_the_earlier_trains(tmp_path: Path) -> None:
    """Two launchers starting one study at once both queue λ = 0; both trials run: the later one,
    whichever checks first, sees the earlier and is pruned; the earlier trains."""
    fake = FakeTrain()
    spec = spec_for(tmp_path, 2, seeds=(0, 1))
    study, data = open_tuning(spec)
    study.enqueue_trial({}, user_attrs={"lam_value": 0.0})
    objective = LambdaObjective(spec, data, train_fn=fake)
    earlier, later = study.ask(), study.ask()
    with pytest.raises(optuna.TrialPruned, match="trained by trial 0"):
        objective(later)
    study.tell(later, state=TrialState.PRUNED)
    assert fake.runs == []
    study.tell(earlier, objective(earlier))
    assert fake.runs == [(0.0, 0), (0.0, 1)]


def test_the_objective_is_the_seeds_mean_and_a_diverged_seed_makes_the_trial_infeasible(
    tmp_path: Path,
) -> None:
    fake = FakeTrain(seed_offset=0.5, diverging_seeds=(2,))  # seed 2 diverges above λ = 1e-3
    spec = spec_for(tmp_path, 3, seeds=(0, 1, 2))
    study, data = open_tuning(spec)
    study.enqueue_trial({"lam": 1e-4})
    study.enqueue_trial({"lam": 5e-3})
    study = run_tuning(spec, study, data, train_fn=fake)
    base, good, bad = study.get_trials(states=(TrialState.COMPLETE,))
    good_bpds = [1.0 + 0.5 * seed for seed in (0, 1, 2)]  # best held-out bpd per seed at λ = 1e-4
    assert good.value == pytest.approx(sum(good_bpds) / 3) and good.constraints == {"diverged": 0.0}
    assert [good.user_attrs["seeds"][s]["best_bpd"] for s in "012"] == pytest.approx(good_bpds)
    bad_bpds = [b + 0.1 * (math.log10(5e-3) + 4) ** 2 for b in good_bpds[:2]] + [WORST]
    assert bad.value == pytest.approx(sum(bad_bpds) / 3)  # the diverged seed at the worst case
    assert bad.constraints == {"diverged": pytest.approx(1 / 3)}  # infeasible: one seed of three
    assert bad.user_attrs["status"] == "diverged" and bad.user_attrs["nan_onset_step"] == 1
    assert bad.user_attrs["seeds"]["2"]["status"] == "diverged" and bad.user_attrs["best_bpd"] is None
    assert [row.feasible for row in tuning_rows(study)] == [True, True, False]  # λ ascending
    names = [d.name for d in fake.out_dirs]
    assert names[:3] == ["trial0000-lam0-seed0", "trial0000-lam0-seed1", "trial0000-lam0-seed2"]
    assert names[3:6] == [f"trial0001-lam0.0001-seed{s}" for s in (0, 1, 2)]
    assert base.user_attrs["best_bpd"] == pytest.approx(sum(good_bpds) / 3 + 0.1 * 25)  # λ = 0: 1e-9


def test_a_stop_between_two_seeds_resumes_at_the_next_seed(tmp_path: Path) -> None:
    fake = FakeTrain()
    spec = spec_for(tmp_path, 1, seeds=(0, 1, 2))
    study, data = open_tuning(spec)
    stop = StopRequest()
    fake.after = lambda: stop.ask() if len(fake.runs) == 2 else None  # a signal during seed 1
    run_tuning(spec, study, data, train_fn=fake, stop=stop)
    (first,) = study.get_trials()
    assert first.state == TrialState.FAIL and sorted(first.user_attrs["seeds"]) == ["0", "1"]
    assert first.user_attrs["status"] == "interrupted" and fake.runs == [(0.0, 0), (0.0, 1)]
    study = tune(spec, fake)  # the rerun queues the trial again; it trains seed 2 only
    assert fake.runs == [(0.0, 0), (0.0, 1), (0.0, 2)]
    (done,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert done.user_attrs["run_name"] == first.user_attrs["run_name"] and len(done.user_attrs["seeds"]) == 3


def test_a_range_with_no_untried_lambda_left_ends_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Every λ in [1e-4, 1.00005e-4] is the same λ: after the first, TPE can only repeat it."""
    from flowdiag.ablation import lambda_choice
    from flowdiag.cli.tune import _exit_when_short

    for module in (tune_module, lambda_choice):  # the real 20 only takes longer
        monkeypatch.setattr(module, "MAX_REPEATS_IN_A_ROW", 3)
    fake = FakeTrain()
    spec = spec_for(tmp_path, 4, lam_min=1e-4, lam_max=1.00005e-4)
    study = tune(spec, fake)
    assert fake.lams[0] == 0.0 and len(fake.lams) == 2 and fake.lams[1] < DIVERGES_ABOVE
    assert len(study.get_trials(states=(TrialState.PRUNED,))) == 3 == repeats_at_end(study)
    assert len(tuning_rows(study)) == 2  # short of the 4 asked: the command says why and exits 1
    with pytest.raises(typer.Exit) as ended:
        _exit_when_short(spec, study, 2, stopped=False)
    assert ended.value.exit_code == 1 and "is used up; widen --lam-min/--lam-max" in capsys.readouterr().err
