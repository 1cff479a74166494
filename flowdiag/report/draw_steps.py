"""Drawing the figures over steps and over λ; the data come from `curves` and `cells`, already
extracted."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.ticker import MaxNLocator

from flowdiag.report.canvas import (
    DIVERGED_MARKER,
    NONFINITE_COLOR,
    colors_for,
    deduplicated_legend,
    legend_keys,
    new_figure,
    save,
)
from flowdiag.report.cells import LambdaPoint
from flowdiag.report.curves import BpdFigureData, PenaltyCurves, use_log_scale
from flowdiag.report.runs import given

_MAX_CONV_LEGEND = 8


def draw_bpd(data: BpdFigureData, path: Path) -> Path:
    """Paper Fig. 4: training bpd per run, an X where a run diverged."""
    figure = new_figure(8.0, 4.6)
    axes = figure.add_subplot()
    keys = legend_keys([c.label for c in data.curves], [c.group for c in data.curves])
    colors = colors_for(keys)
    for curve, key in zip(data.curves, keys, strict=True):
        axes.plot(curve.steps, curve.bpd, color=colors[key], linewidth=1.2, label=key)
    if data.log_y:
        axes.set_yscale("log")
    if data.y_range is not None:
        axes.set_ylim(data.y_range)
    ylim = axes.get_ylim()
    for curve, key in zip(data.curves, keys, strict=True):
        if curve.onset_step < 0:
            continue
        # The axis belongs to the finite runs: a diverged run's X sits on the top edge at its onset.
        axes.plot(
            [curve.onset_step],
            [ylim[1]],
            DIVERGED_MARKER,
            color=colors[key],
            markersize=11,
            markeredgecolor="black",
            clip_on=False,
            label="diverged: NaN onset (top edge)",
        )
        axes.annotate(
            f"onset {curve.onset_step}",
            (curve.onset_step, ylim[1]),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize="x-small",
        )
    axes.set_ylim(ylim)
    _whole_step_ticks(axes)
    axes.set_xlabel("training step (1 = first forward pass after init)")
    axes.set_ylabel("training loss NLL (bits/dim)" + (", log scale" if data.log_y else ""))
    axes.set_title("Training bpd per run: X marks the step where the run diverged")
    axes.grid(alpha=0.3)
    deduplicated_legend(axes, fontsize="small", loc="best")
    return save(figure, path)


def _whole_step_ticks(axes: Axes) -> None:
    """Steps are whole numbers: no tick at step 1.5 when a run has two steps."""
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _penalty_axes(axes: Axes, curves: PenaltyCurves) -> None:
    axes.plot(curves.penalty.steps, curves.penalty.values, color="black", linewidth=1.2)
    if use_log_scale(curves.penalty.values):
        axes.set_yscale("log")
    axes.set_xlabel("training step")
    axes.set_ylabel("Σ (h·w·Σlog|u|)²  (nats²)")
    lam = given(curves.lam, "λ", "{:g}").replace("=", " = ")
    axes.set_title(f"{curves.label}: penalty before λ ({lam})", fontsize="medium")
    axes.grid(alpha=0.3)
    _whole_step_ticks(axes)


def _conv_axes(axes: Axes, curves: PenaltyCurves) -> None:
    n = len(curves.conv_names)
    cmap = colormaps["viridis"]
    colors = [cmap(j / max(n - 1, 1)) for j in range(n)]
    if 0 < n <= _MAX_CONV_LEGEND:
        for name, series, color in zip(curves.conv_names, curves.conv_logdet, colors, strict=True):
            axes.plot(series.steps, series.values, color=color, linewidth=1.0, label=name)
    elif n:  # 96 convs of Glow at K = 32: one collection draws 4x faster than 96 lines
        lines = [np.column_stack([s.steps, s.values]) for s in curves.conv_logdet]
        axes.add_collection(LineCollection(lines, colors=colors, linewidths=1.0))
        axes.autoscale_view()
    axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("training step")
    axes.set_ylabel("h·w·Σlog|u| per 1x1 conv (nats)")
    axes.set_title("each 1x1 conv's log-det (what λ pulls to 0)", fontsize="medium")
    axes.grid(alpha=0.3)
    _whole_step_ticks(axes)
    if 0 < n <= _MAX_CONV_LEGEND:
        axes.legend(fontsize="x-small", loc="best")
    elif n:
        axes.text(
            0.01,
            0.02,
            f"{n} convs; colour = depth (dark: input side, yellow: top)",
            transform=axes.transAxes,
            fontsize="x-small",
        )


def draw_penalty(runs: list[PenaltyCurves], path: Path) -> Path:
    """The penalty and every 1x1 conv's log-det over steps, one row per run."""
    figure = new_figure(11.0, 3.0 * max(len(runs), 1))
    grid = figure.subplots(max(len(runs), 1), 2, squeeze=False)
    for row, curves in zip(grid, runs, strict=False):
        _penalty_axes(row[0], curves)
        _conv_axes(row[1], curves)
    return save(figure, path)


def draw_lambda(points: list[LambdaPoint], path: Path) -> Path:
    """λ against best held-out bpd; diverged trials as red X (on the top edge when never evaluated)."""
    figure = new_figure(7.0, 4.4)
    axes = figure.add_subplot()
    lams = np.array([p.lam for p in points], dtype=np.float64)
    bpds = np.array([p.best_bpd for p in points], dtype=np.float64)
    diverged = np.array([p.diverged for p in points], dtype=bool)
    positive = lams[lams > 0]
    # symlog, linear below the smallest positive λ: λ = 0 (no penalty) stays on the axis.
    axes.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1e-8)
    ok = ~diverged & np.isfinite(bpds)
    axes.plot(lams[ok], bpds[ok], "o", color="tab:blue", label="completed")
    seen = np.isfinite(bpds)
    if seen.any():
        low, high = float(bpds[seen].min()), float(bpds[seen].max())
        pad = max(0.05 * (high - low), 0.05)
        axes.set_ylim(low - pad, high + 3 * pad)
    ylim = axes.get_ylim()
    for lam, bpd in zip(lams[diverged], bpds[diverged], strict=True):
        y = bpd if math.isfinite(bpd) else ylim[1]
        axes.plot(
            [lam],
            [y],
            DIVERGED_MARKER,
            color=NONFINITE_COLOR,
            markersize=10,
            clip_on=False,
            label="diverged: best bpd before onset (top edge: none)",
        )
    lost = ~diverged & ~np.isfinite(bpds)
    for lam in lams[lost]:
        axes.plot([lam], [ylim[1]], "s", mfc="none", color="grey", clip_on=False, label="no evaluation")
    axes.set_ylim(ylim)
    axes.set_xlabel("λ, weight of the log-det penalty (symlog axis; 0 = no penalty)")
    axes.set_ylabel("best held-out bpd (bits/dim)")
    axes.set_title("λ sweep: best held-out bpd per trial")
    axes.grid(alpha=0.3)
    deduplicated_legend(axes, fontsize="small", loc="best")
    return save(figure, path)
