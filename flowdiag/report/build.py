"""`build_report`: digest each run, draw, and write report.md, report.html, the PNGs and summary.json /
summary.csv (the ablation's cells, comparisons and importance) into one folder.

Runs are read one at a time into digests (`digest`): memory holds one run's block and the digests,
whose layer maps are kept only for the runs that get one, however many runs a folder has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowdiag.record.store import RunRecord
from flowdiag.report.cells import GridCell, LambdaPoint, is_grid
from flowdiag.report.diagnose import DEFAULT_THRESHOLD, Diagnosis, diagnose
from flowdiag.report.digest import RunDigest, digest_of
from flowdiag.report.document import Bullets, Code, Document, Heading, Paragraph, to_html, to_markdown
from flowdiag.report.figure_sections import (
    bpd_section,
    coupling_section,
    inverse_section,
    layer_maps,
    layer_maps_section,
    penalty_section,
)
from flowdiag.report.per_layer import heatmap_rank
from flowdiag.report.run_table import RunRow, run_rows, runs_table
from flowdiag.report.runs import run_labels
from flowdiag.report.study_sections import ablation_sections, study_of, survival_section
from flowdiag.report.study_stats import SUMMARY_CSV, SUMMARY_JSON, summary_csv, summary_json
from flowdiag.report.wording import diagnosis_lines, headline
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
    lambda_points: tuple[LambdaPoint, ...]  # one per counted run; empty unless the runs form a λ sweep
    threshold: float
    summary_json: Path  # the cells, comparisons and importance, for scripts (`study_stats`)
    summary_csv: Path
    comparisons: tuple[dict[str, Any], ...]  # `statistics.comparisons` of the counted runs' cells
    not_counted: tuple[str, ...]  # a line per run left out of the cells: no outcome, and why

    @property
    def n_diverged(self) -> int:
        return sum(d.severity == "diverged" for _, d in self.diagnoses)


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


def _write_files(doc: Document, summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path, Path, Path]:
    """report.md, report.html, summary.json and summary.csv, written; their paths in that order."""
    paths = (out_dir / MARKDOWN_NAME, out_dir / HTML_NAME, out_dir / SUMMARY_JSON, out_dir / SUMMARY_CSV)
    texts = (to_markdown(doc), to_html(doc, out_dir), summary_json(summary), summary_csv(summary))
    for path, text in zip(paths, texts, strict=True):
        _write(path, text)
    return paths


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
    """Write report.md, report.html (PNGs embedded), the PNGs, summary.json and summary.csv into
    `out_dir`; return the summary.

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
    study = study_of(digests, labels)
    figures: list[Path] = []
    doc = Document(title)
    _summary_section(doc, diagnoses, rows, threshold, command)
    bpd_section(doc, figures, digests, labels, out_dir)
    survival_section(doc, figures, study, out_dir)  # right after Fig. 4: when the runs diverged
    coupling_section(doc, figures, digests, labels, out_dir)
    maps = layer_maps(digests, labels, max_layer_maps, threshold)
    layer_maps_section(doc, figures, digests, labels, max_layer_maps, maps, out_dir)
    penalty_section(doc, figures, digests, labels, out_dir)
    inverse_section(doc, figures, digests, labels, maps, out_dir)
    ablation_sections(doc, figures, study, out_dir)
    markdown, html, json_path, csv_path = _write_files(doc, study.summary, out_dir)
    return ReportSummary(
        title=title,
        out_dir=out_dir,
        markdown=markdown,
        html=html,
        figures=tuple(figures),
        runs=tuple(rows),
        diagnoses=tuple(diagnoses),
        cells=tuple(study.grid) if is_grid(study.grid) else (),
        lambda_points=tuple(study.points),
        threshold=threshold,
        summary_json=json_path,
        summary_csv=csv_path,
        comparisons=tuple(study.comparisons),
        not_counted=tuple(study.summary["not_counted"]),
    )
