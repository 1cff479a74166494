"""The report's figure sections: Fig. 4 (bpd), Fig. 5 (couplings at one step), the layer × step maps,
the penalty and the inverse. Each adds its headings, figures and tables to the document; every layer
map of a report shares one colour scale (`layer_maps`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flowdiag.report.canvas import colors_for
from flowdiag.report.curves import bpd_curves, penalty_curves, select_penalty_runs
from flowdiag.report.digest import RunDigest
from flowdiag.report.document import Document, Heading, Image, Paragraph, Table
from flowdiag.report.draw_inverse import draw_failure_rates, draw_inverse_layers, draw_invertibility
from flowdiag.report.draw_layers import MAPS_PER_FIGURE, draw_coupling_peaks, draw_layer_maps
from flowdiag.report.draw_steps import draw_bpd, draw_penalty
from flowdiag.report.inverse_curves import InverseCurves, failure_rates, has_inverse_records, inverse_curves
from flowdiag.report.per_layer import (
    ColourScale,
    CouplingPeaks,
    coupling_peaks,
    layer_heatmap,
    map_scales,
    scale_caption,
    select_heatmap_runs,
)
from flowdiag.report.runs import recon_threshold
from flowdiag.report.wording import fmt


class LayerMaps(NamedTuple):
    """The runs that got a layer map, and the colour scales every map of the report shares."""

    chosen: list[int]
    scales: tuple[ColourScale, ColourScale]  # (log10 max |output|, signed-log log-det)
    inverse: tuple[InverseCurves, ...]  # the inverse's maps of the chosen runs that sampled


def layer_maps(runs: list[RunDigest], labels: list[str], cap: int, threshold: float) -> LayerMaps:
    """Which runs get a layer map, and one colour scale over every map of the report: the chosen runs'
    training maps and their inverse's maps alike."""
    chosen = [i for i in select_heatmap_runs(runs, cap) if runs[i].layers is not None]
    maps = [layer_heatmap(runs[i], labels[i]) for i in chosen]
    inverse = tuple(inverse_curves(runs[i], labels[i]) for i in chosen if has_inverse_records(runs[i]))
    return LayerMaps(chosen, map_scales(maps, threshold, [c.cells() for c in inverse]), inverse)


def bpd_section(
    doc: Document, figures: list[Path], runs: list[RunDigest], labels: list[str], out_dir: Path
) -> None:
    """Fig. 4: training bpd per run."""
    doc.add(Heading("Training bpd (paper Fig. 4)"))
    data = bpd_curves(runs, labels)
    figures.append(draw_bpd(data, out_dir / "bpd.png"))
    smoothing = (
        f"Faint: the bpd of every step; bold: its mean over the last {data.window} steps, for the eye only "
        "(it uses no later step, so no rise shows before it happened). "
        if data.window > 1
        else ""
    )
    doc.add(
        Image(
            "bpd.png",
            f"Training bpd per run. {smoothing}Above the axes, a row per run that ended without a result: "
            "X where it diverged, a bar where it was interrupted, at the step the run file records.",
        )
    )


def coupling_section(
    doc: Document, figures: list[Path], runs: list[RunDigest], labels: list[str], out_dir: Path
) -> None:
    """Fig. 5: coupling outputs at one step."""
    peaks = coupling_peaks(runs, labels)
    step = peaks.step
    doc.add(Heading(f"Coupling outputs at step {step} (paper Fig. 5)"))
    name = f"coupling_step{step}.png"
    figures.append(draw_coupling_peaks(peaks, out_dir / name))
    doc.add(
        Image(name, f"log10 max |output| of each coupling layer at step {step}; inf/NaN on the top edge."),
        _peaks_table(peaks),
    )


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


def layer_maps_section(
    doc: Document, figures: list[Path], runs: list[RunDigest], labels: list[str], cap: int, maps: LayerMaps,
    out_dir: Path,
) -> None:  # fmt: skip
    """The layer × step maps, up to MAPS_PER_FIGURE runs a figure, each captioned with the scale."""
    doc.add(Heading("Layer × step maps"))
    chosen = maps.chosen
    doc.add(
        Paragraph(
            f"{len(chosen)} of {len(runs)} run(s), diverged ones first (at most {cap}); runs trained "
            "without diagnostics have no per-layer records and are left out. A column pools consecutive "
            "steps: its largest max |output|, and red where any of them was non-finite. A circle marks a "
            "run's first max |output| over the threshold (or non-finite), found in every step: on a long "
            "run, a one-step spike is a pixel."
        )
    )
    # Up to MAPS_PER_FIGURE runs a figure, the figures as even as they can be.
    n_figures = math.ceil(len(chosen) / MAPS_PER_FIGURE)
    for n in range(n_figures):
        part = chosen[n * len(chosen) // n_figures : (n + 1) * len(chosen) // n_figures]
        name = f"layers_{n + 1:02d}.png"
        drawn = [layer_heatmap(runs[i], labels[i]) for i in part]
        figures.append(draw_layer_maps(drawn, maps.scales, out_dir / name))
        names = "; ".join(labels[i] for i in part)
        caption = f"Per-layer log10 max |output| and signed-log log-det over steps: {names}. "
        doc.add(Image(name, caption + scale_caption(*maps.scales)))


def penalty_section(
    doc: Document, figures: list[Path], runs: list[RunDigest], labels: list[str], out_dir: Path
) -> None:
    """The penalty and the 1x1 convs' log-dets of every run that made an update."""
    doc.add(Heading("Log-det penalty and 1x1 convs (what λ acts on)"))
    drawn, one_step = select_penalty_runs(runs)
    if drawn:
        penalty = [penalty_curves(runs[i], labels[i]) for i in drawn]
        colors = colors_for(labels)  # each run in Fig. 4's colour (runs are named there up to ten)
        figures.append(draw_penalty(penalty, out_dir / "penalty.png", colors))
        doc.add(
            Image(
                "penalty.png",
                "The penalty Σ(h·w·Σlog|u|)² of every run on one axes, then each run's 1x1 convs' "
                "h·w·Σlog|u| over steps, every panel on one y scale.",
            )
        )
    if one_step:
        names = ", ".join(labels[i] for i in one_step)
        doc.add(Paragraph(f"Ended at step 1, before any update, so no penalty curve to draw: {names}."))


def inverse_section(
    doc: Document,
    figures: list[Path],
    runs: list[RunDigest],
    labels: list[str],
    maps: LayerMaps,
    out_dir: Path,
) -> None:
    """Sampling, reconstruction and conditioning at every evaluation: where a drifting conv shows first."""
    indices = [i for i, run in enumerate(runs) if has_inverse_records(run)]
    if not indices:
        return
    doc.add(Heading("The inverse: sampling, reconstruction, conditioning"))
    curves = [inverse_curves(runs[i], labels[i]) for i in indices]
    threshold = recon_threshold(runs[indices[0]].head)
    figures.append(draw_invertibility(curves, threshold, out_dir / "invertibility.png", colors_for(labels)))
    doc.add(
        Image(
            "invertibility.png",
            "Reconstruction error max |x - f⁻¹(f(x))| and each 1x1 conv's condition number at every "
            "evaluation, coloured by λ (by run, in Fig. 4's colours, where every run has one λ).",
        )
    )
    body = []
    for c, i in zip(curves, indices, strict=True):
        inv = runs[i].inverse
        worst = float(np.nanmax(c.conv_cond[-1])) if c.conv_cond.size else math.nan
        body.append(
            [
                c.label,
                fmt(float(c.recon_error[-1])),
                fmt(worst),
                fmt(float(inv.nonfinite_samples[-1])),
                c.onset,
            ]
        )
    doc.add(
        Table(
            ["run", "last recon error", "worst conv condition", "non-finite samples", "inverse onset"], body
        )
    )
    if maps.inverse:
        figures.append(
            draw_inverse_layers(list(maps.inverse), maps.scales[0], out_dir / "inverse_layers.png")
        )
        caption = "The inverse's per-layer log10 max |output| while sampling. " + scale_caption(
            maps.scales[0]
        )
        doc.add(Image("inverse_layers.png", caption))
    rates = failure_rates([runs[i] for i in indices])
    if len(rates) > 1:
        figures.append(draw_failure_rates(rates, out_dir / "failures.png"))
        doc.add(Image("failures.png", "Divergence and inverse-failure rate against λ, every run marked."))
