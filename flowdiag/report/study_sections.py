"""The report's ablation sections: the grid with each rate's interval, time to divergence, the λ sweep
seed by seed, every one-axis comparison with its verdict in words, and the axes' importance.

The numbers come from `study_stats` (cells of counted runs) and `statistics` (scipy); this module only
lays them out, so that report.md, report.html, summary.json and the terminal say the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from flowdiag.report.cells import GridCell, LambdaPoint, grid_cell, is_grid, lambda_points
from flowdiag.report.digest import RunDigest
from flowdiag.report.document import Bullets, Document, Heading, Image, Paragraph, Table
from flowdiag.report.draw_steps import draw_lambda
from flowdiag.report.draw_study import MIN_BPD_SPAN, draw_grid, draw_survival
from flowdiag.report.statistics import CellResult, survival_curve
from flowdiag.report.study_stats import (
    StudyCell,
    interval_of,
    not_counted,
    study_cells,
    study_summary,
    swept_cells,
)
from flowdiag.report.wording import (
    AXIS_NAMES,
    comparison_evidence,
    comparison_sentence,
    comparison_where,
    fmt_interval,
    fmt_rate,
    fmt_setting,
)


class Study(NamedTuple):
    """The runs of a report as an ablation: its cells, the λ sweep, and what summary.json holds."""

    cells: list[StudyCell]  # counted runs only (completed or diverged)
    grid: list[GridCell]  # one per cell, in the same order
    swept: list[CellResult]  # the cells with only their swept axes as settings
    points: list[LambdaPoint]  # one per counted run; empty unless the runs form a λ sweep
    summary: dict[str, Any]  # summary.json: cells, comparisons, importance, not_counted

    @property
    def comparisons(self) -> list[dict[str, Any]]:
        return list(self.summary["comparisons"])


def study_of(runs: list[RunDigest], labels: list[str]) -> Study:
    """The cells of the counted runs, the λ sweep, and the summary (with the runs left out named)."""
    cells = study_cells(runs)
    swept = swept_cells(cells)
    summary = study_summary(swept, not_counted(runs, labels))
    return Study(cells, [grid_cell(c) for c in cells], swept, lambda_points(runs, labels), summary)


def grid_table(cells: list[GridCell]) -> Table:
    """One row per cell: its settings, counts, rate with its Wilson 95 % interval, and best bpd."""
    header = ["M", "λ", "batch", "runs", "diverged", "divergence rate", "95 % interval"]
    header += ["best held-out bpd", "mean best bpd"]
    body = [
        [
            fmt_setting(c.key.init_batches),
            fmt_setting(c.key.lam),
            fmt_setting(c.key.batch_size),
            str(c.n_runs),
            str(c.n_diverged),
            fmt_rate(c.n_diverged, c.n_runs),
            fmt_interval(c.ci95),
            c.bpd_text(c.best_bpd),
            c.bpd_text(c.mean_best_bpd),
        ]
        for c in cells
    ]
    return Table(header, body)


def comparisons_table(entries: list[dict[str, Any]]) -> Table:
    """Every one-axis comparison: what changed, where, on which metric, the evidence and the verdict."""
    header = ["axis", "from → to", "where", "metric", "counts or paired difference"]
    header += ["p-value or 95 % interval", "verdict"]
    body = []
    for e in entries:
        what, evidence = comparison_evidence(e)
        change = f"{fmt_setting(e['from'])} → {fmt_setting(e['to'])}"
        metric = "diverged" if e["metric"] == "diverged" else "best held-out bpd"
        where = comparison_where(e).removeprefix("at ") or "-"
        body.append(
            [AXIS_NAMES.get(e["axis"], e["axis"]), change, where, metric, what, evidence, e["verdict"]]
        )
    return Table(header, body)


def importance_block(result: dict[str, Any]) -> Table | Paragraph:
    """Optuna's importance of each swept axis per metric, or the note saying why there is none."""
    if "note" in result:
        return Paragraph(f"Importance of the swept axes: none, {result['note']}.")
    axes = next((list(v) for v in result.values() if isinstance(v, dict)), [])
    names = {"diverged": "diverged", "best_bpd": "best held-out bpd"}
    if not axes:  # neither metric had enough distinct values: each says why
        said = "; ".join(f"{names.get(m, m)}: {v}" for m, v in result.items())
        return Paragraph(f"Importance of the swept axes: {said}.")
    body = [
        [names.get(m, m), *(f"{v[a]:.2f}" for a in axes)]
        if isinstance(v, dict)
        else [names.get(m, m), str(v), *["-"] * (len(axes) - 1)]
        for m, v in result.items()
    ]
    return Table(["metric", *(AXIS_NAMES.get(a, a) for a in axes)], body)


def _verdict_vs_zero(entries: list[dict[str, Any]], lam: float, metric: str) -> str:
    for e in entries:
        if e["axis"] == "lam" and e["from"] == 0.0 and e["to"] == lam and e["metric"] == metric:
            what, evidence = comparison_evidence(e)
            return f"{e['verdict']} ({what if evidence == '-' else evidence})"
    return "-"


def lambda_table(cells: list[CellResult], entries: list[dict[str, Any]]) -> Table:
    """One row per λ: its seeds, diverged k/n with the Wilson interval, best bpd per seed, and the
    verdicts against λ = 0 on both metrics."""
    body = []
    for cell in cells:
        lam = cell.settings["lam"]
        bests = [b for b in cell.best_bpd if b is not None]
        spread = f"{sum(bests) / len(bests):.4f} ({min(bests):.4f} to {max(bests):.4f})" if bests else "-"
        per_seed = ", ".join("diverged" if b is None else f"{b:.4f}" for b in cell.best_bpd)
        body.append(
            [
                fmt_setting(lam),
                " ".join(str(s) for s in cell.seeds),
                fmt_rate(cell.n_diverged, cell.runs),
                fmt_interval(interval_of(cell)),
                per_seed,
                spread,
                _verdict_vs_zero(entries, lam, "diverged") if lam != 0 else "(reference)",
                _verdict_vs_zero(entries, lam, "best_bpd") if lam != 0 else "(reference)",
            ]
        )
    header = ["λ", "seeds", "diverged", "95 % interval", "best held-out bpd per seed", "mean (range)"]
    return Table([*header, "vs λ = 0: diverged", "vs λ = 0: best bpd"], body)


def survival_section(doc: Document, figures: list[Path], study: Study, out_dir: Path) -> None:
    """Time to divergence per cell, placed right after Fig. 4; only for several cells and a divergence."""
    if not is_grid(study.grid) or not any(c.result.n_diverged for c in study.cells):
        return
    curves = [(c.key.label(), survival_curve(c.result)) for c in study.cells]
    figures.append(draw_survival(curves, out_dir / "survival.png"))
    caption = (
        "Time to divergence per cell: the Kaplan–Meier estimate of the share of runs not yet diverged by "
        "each step, with its 95 % band. A run that did not diverge is censored at its last step."
    )
    doc.add(Heading("Time to divergence"), Image("survival.png", caption))


def ablation_sections(doc: Document, figures: list[Path], study: Study, out_dir: Path) -> None:
    """The grid, the λ sweep, the comparisons with their verdicts and the axes' importance."""
    left_out = study.summary["not_counted"]
    if left_out:
        doc.add(Paragraph("Left out of the cells, the comparisons and the λ sweep (no outcome):"))
        doc.add(Bullets(list(left_out)))
    if is_grid(study.grid):
        doc.add(Heading("Ablation grid (M × λ × batch size)"), grid_table(study.grid))
        figures.append(draw_grid(study.grid, out_dir / "grid.png"))
        caption = (
            "Divergence rate across seeds with its Wilson 95 % interval, and best held-out bpd per cell "
            f"(its colour range spans at least {MIN_BPD_SPAN:g} bpd, so that seed noise is not painted "
            "as a difference)."
        )
        doc.add(Image("grid.png", caption))
    if study.points:
        doc.add(Heading("λ sweep"), lambda_table(study.swept, study.comparisons))
        figures.append(draw_lambda(study.points, out_dir / "lambda.png"))
        caption = "λ against best held-out bpd: every seed's run (red X: diverged) and the mean per λ."
        doc.add(Image("lambda.png", caption))
    if study.comparisons:
        doc.add(Heading("Comparisons"), comparisons_table(study.comparisons))
        doc.add(Bullets([comparison_sentence(e) for e in study.comparisons]))
    if is_grid(study.grid):
        doc.add(Heading("Importance of the swept axes", 3), importance_block(study.summary["importance"]))
