"""Drawing the inverse views; the data come from `inverse_curves`, already extracted."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection

from flowdiag.report.canvas import (
    DIVERGED_MARKER,
    MAP_HEADER,
    NONFINITE_COLOR,
    OUTPUT_PALETTE,
    Bar,
    draw_map,
    inches,
    label_margin,
    layer_ticks,
    map_header,
    map_rgba,
    map_row_height,
    new_figure,
    save,
    whole_steps,
)
from flowdiag.report.curves import use_log_scale
from flowdiag.report.inverse_curves import FailureRate, InverseCurves
from flowdiag.report.per_layer import ColourScale
from flowdiag.report.runs import given

Color = tuple[float, float, float, float]


def _line_colors(
    curves: list[InverseCurves], run_colors: dict[str, Color] | None
) -> tuple[list[Color], list[str]]:
    """A colour and legend entry per run: by λ where the runs differ in λ (what drives the convs'
    conditioning), else by run, in Fig. 4's colours."""
    lams = sorted({c.lam for c in curves}, key=lambda lam: (lam is None, lam or 0.0))
    if len(lams) > 1 or run_colors is None:
        cmap = colormaps["viridis"]
        by_lam = {lam: cmap(0.9 * i / max(len(lams) - 1, 1)) for i, lam in enumerate(lams)}
        return [by_lam[c.lam] for c in curves], [given(c.lam, "λ", "{:g}") for c in curves]
    return [run_colors[c.label] for c in curves], [c.label for c in curves]


def _recon_axes(axes: Axes, curves: list[InverseCurves], colors: list[Color], names: list[str]) -> None:
    for c, color, name in zip(curves, colors, names, strict=True):
        shown = np.where(np.isfinite(c.recon_error), c.recon_error, np.nan)
        axes.plot(c.steps, np.maximum(shown, 1e-12), "o-", color=color, markersize=3, label=name)
        bad = ~np.isfinite(c.recon_error)
        if bad.any():
            axes.plot(c.steps[bad], np.full(bad.sum(), 1e3), DIVERGED_MARKER, color=NONFINITE_COLOR)
    axes.set_yscale("log")
    axes.set_ylabel("max |x - f⁻¹(f(x))| on a held-out batch", fontsize="small")
    axes.set_title("Reconstruction error (X: non-finite)", fontsize="medium")


def _cond_axes(axes: Axes, curves: list[InverseCurves], colors: list[Color], names: list[str]) -> None:
    for c, color, name in zip(curves, colors, names, strict=True):
        if not c.conv_cond.size:
            continue
        # Every conv faint (one collection: 36 convs × runs as lines took half the figure's time).
        lines = [np.column_stack([c.steps, column]) for column in c.conv_cond.T]
        axes.add_collection(LineCollection(lines, colors=[color], linewidths=0.5, alpha=0.35))
        worst = np.nanmax(np.where(np.isfinite(c.conv_cond), c.conv_cond, np.nan), axis=1)
        axes.plot(c.steps, worst, color=color, linewidth=1.8, label=name)
    conds = np.concatenate([c.conv_cond.ravel() for c in curves]) if curves else np.zeros(0)
    if use_log_scale(conds):  # near-orthogonal convs (1.000 to 1.004) read on a linear axis
        axes.set_yscale("log")
    axes.autoscale_view()
    axes.set_ylabel("condition number of W (float64 SVD)", fontsize="small")
    axes.set_title("Each 1x1 conv's conditioning (bold: the worst)", fontsize="medium")


def draw_invertibility(
    curves: list[InverseCurves], threshold: float, path: Path, run_colors: dict[str, Color] | None = None
) -> Path:
    """Reconstruction error, and every conv's condition number (the worst in bold), per run; coloured
    by λ, or by run (`run_colors`, Fig. 4's) where every run has the same λ."""
    figure = new_figure(11.5, 4.2, layout=None)
    recon_axes, cond_axes = inches(figure, 0.85, 0.55, 4.3, 3.3), inches(figure, 6.65, 0.55, 4.6, 3.3)
    colors, names = _line_colors(curves, run_colors)
    _recon_axes(recon_axes, curves, colors, names)
    if np.isfinite(threshold):  # NaN: the run's config does not give n_bits
        recon_axes.axhline(threshold, color="grey", linestyle=":", linewidth=1.0, label="quarter bin")
    _cond_axes(cond_axes, curves, colors, names)
    evaluated = sorted({int(s) for c in curves for s in c.steps})
    for axes in (recon_axes, cond_axes):
        axes.set_xlabel("training step (evaluations)", fontsize="small")
        axes.grid(alpha=0.3)
        if len(evaluated) <= _MAX_EVAL_TICKS:  # a tick at each evaluation, none between them
            axes.set_xticks(evaluated)
        else:
            whole_steps(axes)
        axes.tick_params(labelsize="small")
        handles, labels = axes.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        if unique:
            axes.legend(unique.values(), unique.keys(), fontsize="x-small", loc="upper left")
    return save(figure, path)


_WIDTH, _TITLE, _XTICKS, _GAP = 11.5, 0.42, 0.45, 0.25
_PER_ROW, _MAX_EVAL_TICKS = 4, 8


def _inverse_panel(axes: Axes, c: InverseCurves, scale: ColourScale, height: float, labelled: bool) -> None:
    values, states = c.cells()
    extent = (-0.5, len(c.steps) - 0.5, len(c.layer_names) - 0.5, -0.5)
    draw_map(axes, map_rgba(values, states, OUTPUT_PALETTE, scale), extent)
    axes.set_xlim(extent[0], extent[1])
    axes.set_ylim(extent[2], extent[3])
    ticks = range(0, len(c.steps), max(1, -(-len(c.steps) // _MAX_EVAL_TICKS)))
    axes.set_xticks(ticks, [str(c.steps[i]) for i in ticks], fontsize="x-small")
    axes.tick_params(axis="x", pad=1)
    layer_ticks(axes, c.layer_names, height, labelled)
    # A panel is a quarter of the figure: a long label wraps onto a second line rather than run
    # into the next panel's title (x-small type: about 0.055 in a character).
    width = axes.get_position().width * axes.get_figure().get_size_inches()[0]  # type: ignore[union-attr]
    axes.set_title(textwrap.fill(c.label, max(12, int(width / 0.055))), loc="left", fontsize="x-small", pad=3)
    axes.set_xlabel("evaluation at step", fontsize="x-small", labelpad=1)


def draw_inverse_layers(curves: list[InverseCurves], scale: ColourScale, path: Path) -> Path:
    """Per run, the inverse's log10 max |output| per layer at each evaluation, on the colour scale
    every layer map of the report shares (`map_scales`); inf/NaN red. Up to four runs side by side:
    a run has a few evaluations, not thousands of steps."""
    left = label_margin([name for c in curves for name in c.layer_names])
    columns = min(max(len(curves), 1), _PER_ROW)
    width = (_WIDTH - left - 0.3 - _GAP * (columns - 1)) / columns
    starts = range(0, len(curves), columns)
    rows = [max(map_row_height(len(c.layer_names)) for c in curves[k : k + columns]) for k in starts]
    height = MAP_HEADER + sum(rows) + len(rows) * (_TITLE + _XTICKS)
    figure = new_figure(_WIDTH, height, layout=None)
    label = "log10 max |output|, the training maps' scale (black: threshold)"
    map_header(figure, [Bar(left, min(_WIDTH - left - 0.3, 6.0), OUTPUT_PALETTE, scale, label)], onset=False)
    y = height - MAP_HEADER
    for start, row in zip(starts, rows, strict=True):
        y -= _TITLE + row
        for column, c in enumerate(curves[start : start + columns]):
            axes = inches(figure, left + column * (width + _GAP), y, width, row)
            _inverse_panel(axes, c, scale, row, labelled=column == 0)
        y -= _XTICKS
    figure.text(0.005, 0.005, "Each panel: the inverse (sampling) of one run.", fontsize="x-small")
    return save(figure, path)


def draw_failure_rates(rates: list[FailureRate], path: Path) -> Path:
    """Against λ: the fraction of runs that diverged, and that completed but failed in the inverse."""
    figure = new_figure(7.0, 4.2)
    axes = figure.add_subplot()
    lams = np.array([np.nan if r.lam is None else r.lam for r in rates], dtype=np.float64)
    positive = lams[lams > 0]
    axes.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1e-8)
    diverged = np.array([r.n_diverged / r.n_runs for r in rates])
    inverse = np.array([r.n_inverse_failed / r.n_runs for r in rates])
    axes.plot(lams, diverged, "-", color=NONFINITE_COLOR, label="diverged (training)")
    axes.plot(lams, inverse, "--", color="tab:purple", label="completed, inverse failed")
    for r in rates:  # each run, stacked a little so seeds stay visible
        for k, outcome in enumerate(r.run_outcomes):
            y = -0.06 - 0.04 * k
            marker = {"diverged": DIVERGED_MARKER, "inverse": "o", "ok": "."}[outcome]
            color = {"diverged": NONFINITE_COLOR, "inverse": "tab:purple", "ok": "grey"}[outcome]
            axes.plot([r.lam], [y], marker, color=color, clip_on=False)
    axes.set_ylim(-0.06 - 0.04 * max(len(r.run_outcomes) for r in rates) if rates else -0.1, 1.05)
    axes.set_xlabel("λ (symlog; 0 = no penalty)")
    axes.set_ylabel("fraction of runs (seeds)")
    axes.set_title("Failures against λ (markers below 0: each run; X diverged, o inverse failed)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper right")
    return save(figure, path)
