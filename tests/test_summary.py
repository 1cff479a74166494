"""The report's ablation statistics from synthetic run files: summary.json holds scipy's numbers for the
runs that have an outcome, the report and the terminal say the verdicts, and the diagnosis recommends
the penalty only on evidence."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from scipy import stats

from flowdiag.record.store import read_run
from flowdiag.report import ReportSummary, build_report, collect_runs, diagnose, render_summary
from flowdiag.report.draw_study import MIN_BPD_SPAN, bpd_colour_range
from flowdiag.report.runs import run_settings
from tests.test_report import NAMES, Injected, make_run

SEEDS = range(6)
INTERRUPTED_AT = 12


def onset_of(seed: int) -> Injected:
    """M = 1 diverges within the first three steps; the crossing step lies past the end (none)."""
    return Injected(1 + seed % 3, "levels.1.steps.0.coupling", 999, NAMES[0])


@pytest.fixture(scope="module")
def grid_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReportSummary]:
    """2 M × 2 λ × 6 seeds at batch 1, and one interrupted run; reported once for every test here."""
    out = tmp_path_factory.mktemp("grid")
    for m in (1, 256):
        for lam in (0.0, 1e-3):
            for seed in SEEDS:
                # λ = 1e-3 at M = 256 stops at step 15: its best held-out bpd is 0.25 worse, every seed.
                steps = 15 if (m, lam) == (256, 1e-3) else 20
                inject = onset_of(seed) if m == 1 else None
                make_run(
                    out / "runs" / f"m{m}-l{lam:g}-s{seed}",
                    m=m,
                    lam=lam,
                    seed=seed,
                    inject=inject,
                    steps=steps,
                )
    make_run(out / "runs" / "m256-l0-s6", m=256, seed=6, steps=INTERRUPTED_AT, status="interrupted")
    summary = build_report(collect_runs(out), out / "report", title="grid", max_layer_maps=1)
    return out, summary


def no_nan(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in summary.json")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_counts_the_run_files_with_scipys_numbers(
    grid_report: tuple[Path, ReportSummary],
) -> None:
    out, summary = grid_report
    data = no_nan(summary.summary_json.read_text(encoding="utf-8"))
    assert summary.summary_json == out / "report" / "summary.json"
    assert set(data) == {"cells", "comparisons", "importance", "not_counted"}
    heads = [read_run(p).head for p in sorted((out / "runs").rglob("run.h5"))]
    cells = {(c["settings"]["init_batches"], c["settings"]["lam"]): c for c in data["cells"]}
    assert list(cells) == [(1, 0.0), (1, 1e-3), (256, 0.0), (256, 1e-3)]
    for (m, lam), cell in cells.items():
        assert set(cell) == {
            "settings",
            "seeds",
            "runs",
            "diverged",
            "diverged_ci95",
            "onset_steps",
            "best_bpd",
        }
        assert set(cell["settings"]) == {"init_batches", "lam"}  # batch size is 1 everywhere: not swept
        files = [h for h in heads if (run_settings(h).init_batches, run_settings(h).lam) == (m, lam)]
        counted = [h for h in files if h.status in ("completed", "diverged")]
        assert cell["runs"] == len(counted) == 6 and cell["seeds"] == list(SEEDS)
        assert cell["diverged"] == sum(h.status == "diverged" for h in counted)
        expected = stats.binomtest(cell["diverged"], cell["runs"]).proportion_ci(method="wilson")
        assert cell["diverged_ci95"] == [pytest.approx(expected.low), pytest.approx(expected.high)]
        if m == 1:
            assert cell["onset_steps"] == [onset_of(s).onset_step for s in SEEDS]
            assert cell["best_bpd"] == [None] * 6  # a diverged run's early evaluation is no result
        else:
            assert cell["onset_steps"] == [None] * 6
            last_eval = 20 if lam == 0.0 else 15
            assert cell["best_bpd"] == [
                pytest.approx(5.5 - 0.05 * last_eval + 0.01 * s, abs=1e-5) for s in SEEDS
            ]
    # The interrupted run has no outcome: in no cell, and named with the reason.
    assert len(data["not_counted"]) == 1
    assert f"interrupted at step {INTERRUPTED_AT}" in data["not_counted"][0]
    assert data["not_counted"][0].endswith("not counted") and 6 not in cells[(256, 0.0)]["seeds"]


def test_comparisons_and_importance_follow_their_rules(grid_report: tuple[Path, ReportSummary]) -> None:
    _, summary = grid_report
    data = no_nan(summary.summary_json.read_text(encoding="utf-8"))
    entries = data["comparisons"]
    assert len(entries) == 8  # 4 one-axis pairs × 2 metrics
    for e in entries:
        if e["metric"] == "diverged":
            (k1, n1), (k2, n2) = e["from_counts"], e["to_counts"]
            expected = stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided").pvalue
            assert e["p_value"] == pytest.approx(expected)
        elif e["ci95"] is not None:
            low, high = e["ci95"]
            assert e["verdict"] == ("better" if high < 0 else "worse" if low > 0 else "cannot tell")
        else:
            assert e["verdict"] == "cannot tell"
    m_div = [e for e in entries if e["axis"] == "init_batches" and e["metric"] == "diverged"]
    assert [(e["from"], e["to"], e["verdict"]) for e in m_div] == [(1, 256, "better")] * 2
    assert [e["p_value"] for e in m_div] == [pytest.approx(0.0021645, rel=1e-3)] * 2
    lam_bpd = next(
        e
        for e in entries
        if e["axis"] == "lam" and e["where"] == {"init_batches": 256} and e["metric"] == "best_bpd"
    )
    assert (
        lam_bpd["verdict"] == "worse"
        and lam_bpd["n"] == 6
        and lam_bpd["difference"] == pytest.approx(0.25, abs=1e-5)
    )
    assert set(data["importance"]) == {"best_bpd", "diverged"}
    assert summary.comparisons == tuple(entries)


def test_summary_csv_has_one_row_per_cell(grid_report: tuple[Path, ReportSummary]) -> None:
    _, summary = grid_report
    rows = list(csv.DictReader(summary.summary_csv.read_text(encoding="utf-8").splitlines()))
    assert len(rows) == 4
    interval = ["diverged_ci95_low", "diverged_ci95_high"]
    assert list(rows[0]) == ["init_batches", "lam", "runs", "diverged", *interval, "mean_best_bpd", "seeds"]
    assert [(r["init_batches"], r["runs"], r["diverged"]) for r in rows] == [("1", "6", "6")] * 2 + [
        ("256", "6", "0")
    ] * 2
    assert rows[0]["mean_best_bpd"] == "" and float(rows[2]["mean_best_bpd"]) == pytest.approx(
        4.525, abs=1e-5
    )
    assert rows[0]["seeds"] == "0 1 2 3 4 5"


def test_the_report_speaks_the_verdicts(grid_report: tuple[Path, ReportSummary]) -> None:
    out, summary = grid_report
    md = summary.markdown.read_text(encoding="utf-8")
    assert "## Comparisons" in md and "| axis | from → to | where | metric |" in md
    assert "- M 1 → 256 at λ 0: diverged 6/6 → 0/6, Fisher p = 0.0022: better." in md
    assert (
        "- λ 0 → 0.001 at M 256: best held-out bpd 0.250 (95 % CI 0.25 to 0.25, 6 paired seeds): worse." in md
    )
    assert "95 % interval" in md and re.search(
        r"\| 1 \| 0 \| 1 \| 6 \| 6 \| 6/6 \(100%\) \| 0\.61 to 1\.00 \|", md
    )
    assert "Importance of the swept axes" in md
    assert "interrupted at step 12: not counted" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images[images.index("bpd.png") + 1] == "survival.png"  # right after Fig. 4
    assert (out / "report" / "survival.png").exists() and "censored at its last step" in md
    console = Console(file=io.StringIO(), width=250)
    render_summary(summary, console)
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "M 1 → 256 at λ 0: diverged 6/6 → 0/6, Fisher p = 0.0022: better." in printed
    assert str(summary.summary_json) in printed and "0.61 to 1.00" in printed


def test_a_lambda_sweep_over_seeds_has_one_row_per_lambda(tmp_path: Path) -> None:
    sweep = tmp_path / "tune"
    for i, lam in enumerate((0.0, 1e-5, 1e-3)):
        for seed in range(3):
            inject = onset_of(seed) if lam == 0.0 else None
            make_run(sweep / "runs" / f"trial{i}-s{seed}", lam=lam, seed=seed, inject=inject)
    make_run(sweep / "runs" / "trial9", lam=1e-2, seed=0, steps=4, status="interrupted")
    summary = build_report(collect_runs(sweep), tmp_path / "out", title="tune-lambda", max_layer_maps=1)
    assert len(summary.lambda_points) == 9 and 1e-2 not in {p.lam for p in summary.lambda_points}
    md = summary.markdown.read_text(encoding="utf-8")
    table = md.split("## λ sweep", 1)[1].split("![", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| λ")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1e-05", "| 0.001"]
    assert rows[0].startswith("| 0 | 0 1 2 | 3/3 (100%) |") and "(reference)" in rows[0]
    assert rows[1].startswith("| 1e-05 | 0 1 2 | 0/3 (0%) |")
    assert "cannot tell (Fisher p = 0.1)" in rows[1]  # 3/3 against 0/3: too few seeds to tell
    assert "vs λ = 0: best bpd" in table


def test_the_console_never_prints_a_diverged_runs_bpd(tmp_path: Path) -> None:
    make_run(tmp_path / "r", steps=3, status="diverged")  # its last bpd, 5.7, is no result
    summary = build_report(collect_runs(tmp_path / "r"), tmp_path / "out", title="one")
    console = Console(file=io.StringIO(), width=250)
    render_summary(summary, console)
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "diverged at step 3" in printed and "5.7000" not in printed
    data = no_nan(summary.summary_json.read_text(encoding="utf-8"))
    assert len(data["cells"]) == 1 and set(data["cells"][0]["settings"]) == {
        "init_batches",
        "lam",
        "batch_size",
    }
    assert "note" in data["importance"] and data["comparisons"] == []


def test_the_bpd_colour_range_never_magnifies_seed_noise() -> None:
    low, high = bpd_colour_range([8.156, 8.255, 8.2]) or (0.0, 0.0)
    assert high - low == pytest.approx(MIN_BPD_SPAN) and low < 8.156 and high > 8.255
    assert bpd_colour_range([3.0, 5.0]) == (3.0, 5.0) and bpd_colour_range([float("nan")]) is None


@pytest.mark.parametrize("drift", [False, True])
def test_the_penalty_is_recommended_only_on_drift(tmp_path: Path, drift: bool) -> None:
    late = Injected(15, "levels.1.steps.0.coupling", 999, NAMES[0])  # 14 updates: room to drift
    run = make_run(tmp_path / "r", lam=0.0, inject=late, steps=20, drift=drift)
    diagnosis = diagnose(read_run(run))
    assert diagnosis is not None and diagnosis.severity == "diverged"
    if drift:
        assert diagnosis.rule == "logdet_drift" and "--lam" in diagnosis.cause
    else:
        assert diagnosis.rule != "logdet_drift"
        assert "--lam" not in diagnosis.cause and "penalty" not in diagnosis.cause
