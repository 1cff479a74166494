"""`build_report`: digest each run, draw, and write report.md, report.html and the PNGs into one folder.

Runs are read one at a time into digests (`digest`): memory holds one run's block and the digests,
whose layer maps are kept only for the runs that get one, however many runs a folder has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flowdiag.record.store import RunRecord
from flowdiag.report.cells import GridCell, LambdaPoint, grid_cells, is_grid, lambda_points
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
from flowdiag.report.draw_layers import draw_grid
from flowdiag.report.draw_steps import draw_lambda
from flowdiag.report.figure_sections import (
    inverse_section,
    layer_maps,
    layer_maps_section,
    penalty_section,
    steps_sections,
)
from flowdiag.report.per_layer import heatmap_rank
from flowdiag.report.run_table import RunRow, run_rows, runs_table
from flowdiag.report.runs import NOT_GIVEN, run_labels
from flowdiag.report.wording import diagnosis_lines, fmt_bpd, fmt_rate, headline
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.version import __version__

MARKDOWN_NAME, HTML_NAME = "report.md", "report.html"
MAX_HEATMAP_RUNS = 12


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
    doc.add(Heading("Runs"), runs_table(rows))
    doc.add(Heading("Diagnoses"))
    if not diagnoses:
        doc.add(Paragraph(f"No run diverged and no layer's max |output| passed {threshold:g}."))
    for label, diagnosis in diagnoses:
        doc.add(Heading(f"{label}: {headline(diagnosis)}", 3), Bullets(diagnosis_lines(diagnosis)))


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
    steps_sections(doc, figures, digests, labels, out_dir)
    maps = layer_maps(digests, labels, max_layer_maps, threshold)
    layer_maps_section(doc, figures, digests, labels, max_layer_maps, maps, out_dir)
    penalty_section(doc, figures, digests, labels, out_dir)
    inverse_section(doc, figures, digests, labels, maps, out_dir)
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
