"""`build_report`: digest each run, draw, and write report.md, report.html and the PNGs into one folder.

Runs are read one at a time into digests (`digest`): memory holds one run's block and the digests,
whose layer maps are kept only for the runs that get one, however many runs a folder has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowdiag.record.store import RunRecord
from flowdiag.report.cells import GridCell, LambdaPoint, grid_cells, is_grid, lambda_points
from flowdiag.report.curves import bpd_curves, penalty_curves, select_penalty_runs
from flowdiag.report.diagnose import DEFAULT_THRESHOLD, Diagnosis, diagnose
from flowdiag.report.digest import RunDigest, digest_of
from flowdiag.report.document import (
    Bullets,
    Code,
    Document,
    Heading,
    Image,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)
from flowdiag.report.draw_inverse import draw_failure_rates, draw_inverse_layers, draw_invertibility
from flowdiag.report.draw_layers import draw_coupling_peaks, draw_grid, draw_heatmap
from flowdiag.report.draw_steps import draw_bpd, draw_lambda, draw_penalty
from flowdiag.report.inverse_curves import failure_rates, has_inverse_records, inverse_curves
from flowdiag.report.per_layer import (
    CouplingPeaks,
    coupling_peaks,
    heatmap_rank,
    layer_heatmap,
    select_heatmap_runs,
)
from flowdiag.report.runs import (
    NOT_GIVEN,
    best_eval_bpd,
    is_diverged,
    onset_step,
    recon_threshold,
    run_labels,
)
from flowdiag.report.wording import diagnosis_lines, fmt, fmt_bpd, fmt_rate, fmt_step, headline
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.version import __version__

MARKDOWN_NAME, HTML_NAME = "report.md", "report.html"
MAX_HEATMAP_RUNS = 12


@dataclass(frozen=True)
class RunRow:
    label: str
    path: Path
    status: str
    steps: int  # last recorded step (0: none)
    final_bpd: float
    best_bpd: float  # best held-out bpd, NaN if never evaluated
    onset_step: int  # -1: none
    onset_layer: str
    forwards: int  # the most training forwards one row covers (gradient accumulation: more than 1)


@dataclass(frozen=True)
class ReportSummary:
    """What the CLI prints: the table of runs, the diagnoses, and where the files went."""

    title: str
    out_dir: Path
    markdown: Path
    html: Path
    figures: tuple[Path, ...]
    runs: tuple[RunRow, ...]
    diagnoses: tuple[tuple[str, Diagnosis], ...]  # (run label, diagnosis)
    cells: tuple[GridCell, ...]  # empty unless the runs form a grid of more than one cell
    lambda_points: tuple[LambdaPoint, ...]  # empty unless the runs form a λ sweep
    threshold: float

    @property
    def n_diverged(self) -> int:
        return sum(d.severity == "diverged" for _, d in self.diagnoses)


def run_rows(runs: list[RunDigest], labels: list[str]) -> list[RunRow]:
    return [
        RunRow(
            label=label,
            path=run.head.path,
            status=run.head.status,
            steps=run.head.last_step,
            final_bpd=run.final_bpd,
            best_bpd=best_eval_bpd(run.eval_bpd),
            onset_step=onset_step(run.head) if is_diverged(run.head) else -1,
            onset_layer=run.head.nan_onset_layer,
            forwards=run.most_forwards,
        )
        for run, label in zip(runs, labels, strict=True)
    ]


def _runs_table(rows: list[RunRow]) -> Table:
    # Gradient accumulation: a row covers several training forwards; said only where it happened.
    accumulated = any(r.forwards > 1 for r in rows)
    header = ["run", "status", "steps", "final bpd", "best held-out bpd", "NaN onset step", "onset"]
    header += ["forwards per row (most)"] * accumulated + ["file"]
    body = [
        [
            r.label,
            r.status,
            str(r.steps),
            fmt_bpd(r.final_bpd),
            fmt_bpd(r.best_bpd),
            fmt_step(r.onset_step),
            r.onset_layer or "-",
            *[str(r.forwards)] * accumulated,
            str(r.path),
        ]
        for r in rows
    ]
    return Table(header, body)


def _peaks_table(peaks: CouplingPeaks) -> Table:
    body = []
    for line in peaks.lines:
        values = line.log10_max_abs
        if not line.shown_step or not line.recorded:
            body.append([line.label, "-", "-", "no row" if line.recorded else "diagnostics off"])
            continue
        bad = int((line.nonfinite & line.ran).sum())  # flagged: a coupling that did not run is no blow-up
        finite = np.where(np.isfinite(values) & line.ran, values, -np.inf)
        top = int(np.argmax(finite)) if len(values) else -1
        peak = fmt(float(values[top])) if top >= 0 and np.isfinite(values[top]) else "-"
        where = f"{top + 1} ({line.layer_names[top]})" if top >= 0 else "-"
        label = line.label if line.has_row else f"{line.label} (step {line.shown_step})"
        body.append([label, peak, where, str(bad)])
    header = [
        "run",
        f"largest finite log10 max |output| at step {peaks.step}",
        "at coupling",
        "inf/NaN couplings",
    ]
    return Table(header, body)


def _setting_text(value: float | None, spell: str = "{}") -> str:
    return NOT_GIVEN if value is None else spell.format(value)


def _grid_table(cells: list[GridCell]) -> Table:
    header = ["M", "λ", "batch", "runs", "diverged", "divergence rate", "best held-out bpd", "mean best bpd"]
    body = [
        [
            _setting_text(c.key.init_batches),
            _setting_text(c.key.lam, "{:g}"),
            _setting_text(c.key.batch_size),
            str(c.n_runs),
            str(c.n_diverged),
            fmt_rate(c.n_diverged, c.n_runs),
            fmt_bpd(c.best_bpd),
            fmt_bpd(c.mean_best_bpd),
        ]
        for c in cells
    ]
    return Table(header, body)


def _lambda_table(points: list[LambdaPoint]) -> Table:
    body = [[f"{p.lam:g}", fmt_bpd(p.best_bpd), "yes" if p.diverged else "no", p.label] for p in points]
    return Table(["λ", "best held-out bpd", "diverged", "run"], body)


def headline_counts(diagnoses: list[tuple[str, Diagnosis]], n_runs: int, threshold: float) -> str:
    """How many runs diverged, and how many crossed the threshold, diverged or not: one sentence."""
    n_div = sum(d.severity == "diverged" for _, d in diagnoses)
    crossed = [d for _, d in diagnoses if d.crossing is not None]
    crossed_div = sum(d.severity == "diverged" for d in crossed)
    inverse = sum(d.severity == "invertibility" for _, d in diagnoses)
    return (
        f"{n_runs} run(s), {n_div} diverged. {len(crossed)} run(s) had a layer's max |output| over "
        f"{threshold:g} or non-finite: {crossed_div} of them diverged, {len(crossed) - crossed_div} "
        f"completed (a warning). {inverse} completed run(s) lost invertibility."
    )


def _inverse_section(
    doc: Document,
    figures: list[Path],
    runs: list[RunDigest],
    labels: list[str],
    heatmap_runs: list[int],
    out_dir: Path,
) -> None:
    """Sampling, reconstruction and conditioning at every evaluation: where a drifting conv shows first."""
    indices = [i for i, run in enumerate(runs) if has_inverse_records(run)]
    if not indices:
        return
    doc.add(Heading("The inverse: sampling, reconstruction, conditioning"))
    curves = [inverse_curves(runs[i], labels[i]) for i in indices]
    threshold = recon_threshold(runs[indices[0]].head)
    figures.append(draw_invertibility(curves, threshold, out_dir / "invertibility.png"))
    doc.add(
        Image(
            "invertibility.png",
            "Reconstruction error max |x - f⁻¹(f(x))| and each 1x1 conv's condition number at every "
            "evaluation, coloured by λ.",
        )
    )
    body = []
    for c, i in zip(curves, indices, strict=True):
        inv = runs[i].inverse
        worst = float(np.nanmax(c.conv_cond[-1])) if c.conv_cond.size else math.nan
        onset = f"step {inv.onset_step} in {inv.onset_layer}" if inv.onset_step >= 0 else "-"
        body.append(
            [c.label, fmt(float(c.recon_error[-1])), fmt(worst), fmt(float(inv.nonfinite_samples[-1])), onset]
        )
    doc.add(
        Table(
            ["run", "last recon error", "worst conv condition", "non-finite samples", "inverse onset"], body
        )
    )
    shown = [i for i in heatmap_runs if i in indices]
    if shown:
        picked = [inverse_curves(runs[i], labels[i]) for i in shown]
        figures.append(draw_inverse_layers(picked, out_dir / "inverse_layers.png"))
        doc.add(Image("inverse_layers.png", "The inverse's per-layer log10 max |output| while sampling."))
    rates = failure_rates([runs[i] for i in indices])
    if len(rates) > 1:
        figures.append(draw_failure_rates(rates, out_dir / "failures.png"))
        doc.add(Image("failures.png", "Divergence and inverse-failure rate against λ, every run marked."))


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror}): choose another --out") from None


def digest_runs(
    sources: Sequence[Path | RunRecord | RunDigest], threshold: float, fig5_step: int, max_layer_maps: int
) -> list[RunDigest]:
    """Every run's digest, read one at a time; only the `max_layer_maps` runs that will get a layer map
    (`heatmap_rank`) keep theirs, so memory never holds more than those and one run's block."""
    digests: list[RunDigest] = []
    holding: list[tuple[tuple[int, int, int], int]] = []  # (rank, index) of the maps kept, best first
    for index, source in enumerate(sources):
        digest = digest_of(source, threshold, fig5_step)
        digests.append(digest)
        rank = heatmap_rank(digest, index)
        if rank is None:
            digests[index] = digest._replace(layers=None)
            continue
        holding = sorted([*holding, (rank, index)])
        for _, dropped in holding[max_layer_maps:]:
            digests[dropped] = digests[dropped]._replace(layers=None)
        holding = holding[:max_layer_maps]
    return digests


def _summary_section(
    doc: Document,
    diagnoses: list[tuple[str, Diagnosis]],
    rows: list[RunRow],
    threshold: float,
    command: str | None,
) -> None:
    doc.add(
        Paragraph(f"{headline_counts(diagnoses, len(rows), threshold)} Written by flowdiag {__version__}.")
    )
    if command:
        doc.add(Code(command))
    doc.add(Heading("Runs"), _runs_table(rows))
    doc.add(Heading("Diagnoses"))
    if not diagnoses:
        doc.add(Paragraph(f"No run diverged and no layer's max |output| passed {threshold:g}."))
    for label, diagnosis in diagnoses:
        doc.add(Heading(f"{label}: {headline(diagnosis)}", 3), Bullets(diagnosis_lines(diagnosis)))


def _steps_sections(
    doc: Document, figures: list[Path], runs: list[RunDigest], labels: list[str], out_dir: Path
) -> None:
    """Fig. 4 (bpd) and Fig. 5 (coupling outputs at one step)."""
    doc.add(Heading("Training bpd (paper Fig. 4)"))
    figures.append(draw_bpd(bpd_curves(runs, labels), out_dir / "bpd.png"))
    doc.add(Image("bpd.png", "Training bpd per run; X marks the NaN onset of a diverged run."))
    peaks = coupling_peaks(runs, labels)
    step = peaks.step
    doc.add(Heading(f"Coupling outputs at step {step} (paper Fig. 5)"))
    name = f"coupling_step{step}.png"
    figures.append(draw_coupling_peaks(peaks, out_dir / name))
    doc.add(
        Image(name, f"log10 max |output| of each coupling layer at step {step}; inf/NaN on the top edge."),
        _peaks_table(peaks),
    )


def _layer_maps_section(
    doc: Document, figures: list[Path], runs: list[RunDigest], labels: list[str], cap: int, out_dir: Path
) -> list[int]:
    doc.add(Heading("Layer × step maps"))
    chosen = [i for i in select_heatmap_runs(runs, cap) if runs[i].layers is not None]
    doc.add(
        Paragraph(
            f"{len(chosen)} of {len(runs)} run(s), diverged ones first (at most {cap}); runs trained "
            "without diagnostics have no per-layer records and are left out. A column pools consecutive "
            "steps: its largest max |output|, and black where any of them was non-finite."
        )
    )
    for n, index in enumerate(chosen, start=1):
        name = f"layers_{n:02d}.png"
        figures.append(draw_heatmap(layer_heatmap(runs[index], labels[index]), out_dir / name))
        doc.add(
            Image(name, f"{labels[index]}: per-layer log10 max |output| and signed-log log-det over steps.")
        )
    return chosen


def _penalty_section(
    doc: Document, figures: list[Path], runs: list[RunDigest], labels: list[str], out_dir: Path
) -> None:
    doc.add(Heading("Log-det penalty and 1x1 convs (what λ acts on)"))
    drawn, one_step = select_penalty_runs(runs)
    if drawn:
        penalty = [penalty_curves(runs[i], labels[i]) for i in drawn]
        figures.append(draw_penalty(penalty, out_dir / "penalty.png"))
        doc.add(
            Image(
                "penalty.png",
                "Every run: the penalty Σ(h·w·Σlog|u|)² and each 1x1 conv's h·w·Σlog|u| over steps.",
            )
        )
    if one_step:
        names = ", ".join(labels[i] for i in one_step)
        doc.add(Paragraph(f"Ended at step 1, before any update, so no penalty curve to draw: {names}."))


def _ablation_sections(
    doc: Document, figures: list[Path], cells: list[GridCell], points: list[LambdaPoint], out_dir: Path
) -> None:
    if is_grid(cells):
        doc.add(Heading("Ablation grid (M × λ × batch size)"), _grid_table(cells))
        figures.append(draw_grid(cells, out_dir / "grid.png"))
        doc.add(Image("grid.png", "Divergence rate across seeds and best held-out bpd per cell."))
    if points:
        doc.add(Heading("λ sweep"), _lambda_table(points))
        figures.append(draw_lambda(points, out_dir / "lambda.png"))
        doc.add(Image("lambda.png", "λ against best held-out bpd; red X: diverged trials."))


def build_report(
    runs: Sequence[Path | RunRecord | RunDigest],
    out_dir: Path,
    *,
    title: str,
    command: str | None = None,
    fig5_step: int = 2,
    threshold: float = DEFAULT_THRESHOLD,
    max_layer_maps: int = MAX_HEATMAP_RUNS,
) -> ReportSummary:
    """Write report.md, report.html (PNGs embedded) and the PNGs into `out_dir`; return the summary.

    `runs`: run files (read one at a time, a block at a time), RunRecords or digests. Every run is read
    before anything is written, so a bad file leaves `out_dir` as it was.
    """
    if not runs:
        raise UserError(
            "no runs to report: point at a run folder, a run.h5 file or an ablation output folder"
        )
    digests = digest_runs(runs, threshold, fig5_step, max_layer_maps)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {out_dir} ({error.strerror}): choose another --out") from None
    labels = run_labels([d.head for d in digests])
    rows = run_rows(digests, labels)
    diagnoses = [(label, d) for run, label in zip(digests, labels, strict=True) if (d := diagnose(run))]
    cells, points = grid_cells(digests), lambda_points(digests, labels)
    figures: list[Path] = []
    doc = Document(title)
    _summary_section(doc, diagnoses, rows, threshold, command)
    _steps_sections(doc, figures, digests, labels, out_dir)
    chosen = _layer_maps_section(doc, figures, digests, labels, max_layer_maps, out_dir)
    _penalty_section(doc, figures, digests, labels, out_dir)
    _inverse_section(doc, figures, digests, labels, chosen, out_dir)
    _ablation_sections(doc, figures, cells, points, out_dir)
    markdown, html = out_dir / MARKDOWN_NAME, out_dir / HTML_NAME
    _write(markdown, to_markdown(doc))
    _write(html, to_html(doc, out_dir))
    return ReportSummary(
        title=title,
        out_dir=out_dir,
        markdown=markdown,
        html=html,
        figures=tuple(figures),
        runs=tuple(rows),
        diagnoses=tuple(diagnoses),
        cells=tuple(cells) if is_grid(cells) else (),
        lambda_points=tuple(points),
        threshold=threshold,
    )
