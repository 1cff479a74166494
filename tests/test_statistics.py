"""The ablation statistics: every number equals scipy's, and every verdict follows its rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flowdiag.report.statistics import (
    BOOTSTRAP_SEED,
    CellResult,
    cell_summary,
    comparisons,
    fisher_p,
    importance,
    one_axis_pairs,
    paired_difference,
    survival_curve,
    wilson_ci95,
)


def cell(settings: dict, diverged: list[bool], best: list[float | None] | None = None) -> CellResult:
    seeds = tuple(range(len(diverged)))
    onsets = tuple(3 if bad else None for bad in diverged)
    last = tuple(3 if bad else 200 for bad in diverged)
    values = tuple(best) if best is not None else tuple(None if bad else 5.0 for bad in diverged)
    return CellResult(dict(settings), seeds, tuple(diverged), onsets, last, values)


@pytest.mark.parametrize(("k", "n"), [(0, 6), (3, 6), (6, 6), (1, 3)])
def test_wilson_interval_is_scipys(k: int, n: int) -> None:
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_ci95(k, n) == (pytest.approx(expected.low), pytest.approx(expected.high))
    low, high = wilson_ci95(k, n)
    assert low <= k / n <= high  # the interval holds the observed rate


def test_fisher_p_is_scipys_two_sided() -> None:
    assert fisher_p((6, 6), (0, 6)) == pytest.approx(stats.fisher_exact([[6, 0], [0, 6]]).pvalue)
    assert fisher_p((1, 3), (0, 3)) == pytest.approx(1.0)  # one of three: seed noise


def test_divergence_verdicts_follow_p_and_direction() -> None:
    m1, m256 = cell({"M": 1}, [True] * 6), cell({"M": 256}, [False] * 6)
    [diverged, _] = comparisons([m1, m256])
    assert diverged["verdict"] == "better" and diverged["p_value"] < 0.05
    assert diverged["from_counts"] == [6, 6] and diverged["to_counts"] == [0, 6]
    [worse, _] = comparisons([m256, m1])  # the same pair in the other grid order
    assert worse["from"] == 256 and worse["verdict"] == "worse"
    few = comparisons([cell({"lam": 0.0}, [True, False, False]), cell({"lam": 1e-3}, [False] * 3)])
    assert few[0]["verdict"] == "cannot tell" and few[0]["p_value"] == pytest.approx(1.0)


def test_paired_bpd_difference_is_scipys_bootstrap_of_the_mean() -> None:
    before = [5.0, 5.3, 5.1, 5.2, 5.15]
    after = [4.8, 5.0, 5.05, 4.9, 4.95]
    result = paired_difference(before, after)
    differences = np.subtract(after, before)
    expected = stats.bootstrap(
        (differences,), np.mean, confidence_level=0.95, rng=np.random.default_rng(BOOTSTRAP_SEED)
    ).confidence_interval
    assert result.n == 5 and result.difference == pytest.approx(differences.mean())
    assert result.ci95 == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert result.ci95[1] < 0 and result.verdict == "better"
    assert paired_difference(after, before).verdict == "worse"


def test_fewer_than_five_pairs_report_their_interval_but_cannot_tell() -> None:
    """Four seeds all better by 0.2-0.3: the interval is scipy's and excludes 0, yet four pairs are
    too few for a bootstrap to carry a verdict (MIN_PAIRS_FOR_VERDICT)."""
    few = paired_difference([5.0, 5.3, 5.1, 5.2], [4.8, 5.0, 5.05, 4.9])
    assert few.n == 4 and few.ci95 is not None and few.ci95[1] < 0
    assert few.verdict == "cannot tell"


def test_a_bpd_difference_that_crosses_zero_or_has_no_pairs_cannot_tell() -> None:
    assert paired_difference([5.0, 5.2, 5.1], [5.1, 5.0, 5.15]).verdict == "cannot tell"
    assert paired_difference([5.0], [4.0]).verdict == "cannot tell"  # one pair: no interval
    none = paired_difference([5.0, None], [None, 4.0])
    assert none.n == 0 and none.difference is None and none.verdict == "cannot tell"


def test_pairs_are_seed_matched_not_positional() -> None:
    a = CellResult({"lam": 0.0}, (0, 1, 2), (False,) * 3, (None,) * 3, (200,) * 3, (5.0, 6.0, 7.0))
    b = CellResult({"lam": 1e-3}, (2, 0), (False,) * 2, (None,) * 2, (200,) * 2, (6.5, 4.5))
    [_, bpd] = comparisons([a, b])
    assert bpd["n"] == 2 and bpd["difference"] == pytest.approx(((4.5 - 5.0) + (6.5 - 7.0)) / 2)


def test_only_cells_differing_in_one_axis_are_compared() -> None:
    grid = [cell({"M": m, "lam": lam}, [False] * 2) for m in (1, 256) for lam in (0.0, 1e-3)]
    pairs = one_axis_pairs(grid)
    assert len(pairs) == 4  # 2 x 2: two pairs along each axis, never the diagonal
    for axis, a, b in pairs:
        assert [k for k in a.settings if a.settings[k] != b.settings[k]] == [axis]
    entries = comparisons(grid)
    assert {e["metric"] for e in entries} == {"diverged", "best_bpd"} and len(entries) == 8
    where = {(e["axis"], tuple(sorted(e["where"].items()))) for e in entries}
    assert ("M", (("lam", 0.0),)) in where and ("lam", (("M", 256),)) in where


def test_cell_summary_has_the_documented_keys() -> None:
    summary = cell_summary(cell({"M": 1}, [True, False, True]))
    assert list(summary) == [
        "settings", "seeds", "runs", "diverged", "diverged_ci95", "onset_steps", "best_bpd",
    ]  # fmt: skip
    assert summary["diverged"] == 2 and summary["runs"] == 3
    assert summary["onset_steps"] == [3, None, 3] and summary["best_bpd"] == [None, 5.0, None]


def test_survival_curve_is_kaplan_meier_with_censoring() -> None:
    runs = CellResult(
        {}, (0, 1, 2, 3), (True, True, False, False), (1, 5, None, None), (1, 5, 200, 150), (None,) * 4
    )
    curve = survival_curve(runs)
    expected = stats.ecdf(stats.CensoredData(uncensored=[1, 5], right=[200, 150])).sf
    assert curve.steps.tolist() == [0.0, *expected.quantiles.tolist()]
    assert curve.survival.tolist() == pytest.approx([1.0, *expected.probabilities.tolist()])
    assert curve.survival.tolist()[:3] == pytest.approx([1.0, 0.75, 0.5])
    assert (curve.low <= curve.survival + 1e-12).all() and (curve.survival <= curve.high + 1e-12).all()
    assert (curve.events, curve.censored) == (2, 2)


def test_survival_without_any_divergence_stays_at_one() -> None:
    curve = survival_curve(cell({}, [False] * 3))
    assert curve.survival.tolist() == [1.0, 1.0] and curve.steps[-1] == 200 and curve.events == 0


def test_importance_ranks_the_axis_that_decides_divergence() -> None:
    rng = np.random.default_rng(0)
    grid = []
    for m in (1, 256):
        for lam in (0.0, 1e-3):
            bad = [m == 1] * 6
            best = [None if b else float(5.0 + rng.normal(0, 0.05)) for b in bad]
            grid.append(cell({"init_batches": m, "lam": lam}, bad, best))
    found = importance(grid)
    assert found["diverged"]["init_batches"] > found["diverged"]["lam"]
    assert math.isclose(sum(found["diverged"].values()), 1.0)
    # Every M = 1 run diverged, so only λ varies among the runs with a best bpd: nothing to rank.
    assert found["best_bpd"] == "cannot tell: among the runs with a value only lam varies"


def test_importance_says_when_there_are_too_few_trials() -> None:
    few = [cell({"M": m, "lam": 0.0}, [m == 1]) for m in (1, 256)]
    few += [cell({"M": m, "lam": 1e-3}, [m == 1]) for m in (1, 256)]
    assert "not enough trials" in importance(few)["note"]


def test_a_lone_swept_axis_has_no_importance_to_rank() -> None:
    """fANOVA's normalized importances sum to 1: one axis would read 1.00 whether it matters or not."""
    found = importance([cell({"M": 1}, [True] * 6), cell({"M": 256}, [False] * 6)])
    assert "one swept axis (M)" in found["note"] and "diverged" not in found
