"""Drawing the figures over steps and over λ; the data come from `curves` and `cells`, already
extracted."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection

from flowdiag.report.canvas import (
    DIVERGED_MARKER,
    NONFINITE_COLOR,
    colors_for,
    deduplicated_legend,
    inches,
    legend_keys,
    new_figure,
    save,
    whole_steps,
)
from flowdiag.report.cells import LambdaPoint, lambda_means
from flowdiag.report.curves import BpdFigureData, EndLane, PenaltyCurves, end_lanes, use_log_scale

Color = tuple[float, float, float, float]

_MAX_CONV_LEGEND = 8
# Fig. 4, in inches: a lane a run above the axes, the axes, the legend below them.
_WIDTH, _LANE, _AXES_HEIGHT, _LEFT, _RIGHT = 11.5, 0.24, 3.6, 0.8, 0.3


def _lane_marks(
    axes: Axes, lanes: list[EndLane], colors: dict[str, Color], x_range: tuple[float, float]
) -> None:
    """A row per lane: its marks at the steps where its runs ended, its text beside them."""
    for row, lane in enumerate(lanes):
        marker = DIVERGED_MARKER if lane.kind == "diverged" else "|"
        axes.plot(
            lane.steps, [row] * len(lane.steps), marker, linestyle="none", color=colors[lane.key],
            markersize=9, markeredgecolor="black" if lane.kind == "diverged" else colors[lane.key],
            markeredgewidth=0.8 if lane.kind == "diverged" else 2.5, clip_on=False,
        )  # fmt: skip
        # The text on the side with more room: never over the marks of the same lane.
        right_side = lane.steps[-1] <= x_range[0] + 0.55 * (x_range[1] - x_range[0])
        x = lane.steps[-1] if right_side else lane.steps[0]
        axes.annotate(
            lane.text, (x, row), xytext=(8 if right_side else -8, 0), textcoords="offset points",
            ha="left" if right_side else "right", va="center", fontsize="x-small",
        )  # fmt: skip
    axes.set_ylim(len(lanes) - 0.5, -0.5)
    axes.set_yticks([])
    axes.set_facecolor("#f7f7f7")
    axes.tick_params(axis="x", labelbottom=False)


def _bpd_lines(axes: Axes, data: BpdFigureData, keys: list[str], colors: dict[str, Color]) -> None:
    smoothed = data.window > 1
    for curve, key in zip(data.curves, keys, strict=True):
        unfinished = curve.end.kind in ("interrupted", "failed")  # part-trained: dashed
        style = "--" if unfinished else "-"
        if smoothed:
            axes.plot(curve.steps, curve.bpd, style, color=colors[key], linewidth=0.7, alpha=0.3)
        # A run named in the legend that ended without a result says so there too: its line may be
        # a single point far above the axes (a first step that overflowed to 1e24 bits/dim).
        named = key == curve.label and curve.end.kind not in ("completed", "running")
        label = f"{key} ({curve.end.text})" if named else key
        shown = curve.smoothed if smoothed else curve.bpd
        axes.plot(curve.steps, shown, style, color=colors[key], linewidth=1.6, label=label)
        if curve.end.kind not in ("completed", "running"):
            axes.axvline(curve.end.step, color=colors[key], linewidth=0.8, linestyle=":", alpha=0.8)


def draw_bpd(data: BpdFigureData, path: Path) -> Path:
    """Paper Fig. 4: training bpd per run, faint as recorded under a trailing mean (for the eye only),
    and above the axes a lane per run that ended without a result: an X where it diverged, a bar
    where it was interrupted, its text beside it. No run's mark can hide another's."""
    keys = legend_keys([c.label for c in data.curves], [c.group for c in data.curves])
    colors = colors_for(keys)
    lanes = end_lanes(data.curves, keys)
    n_keys = len(dict.fromkeys(keys))
    legend_rows = math.ceil(n_keys / 2)
    lanes_height = _LANE * len(lanes) + (0.15 if lanes else 0.0)
    bottom = 0.55 + 0.2 * legend_rows
    height = 0.45 + lanes_height + _AXES_HEIGHT + bottom
    figure = new_figure(_WIDTH, height, layout=None)
    width = _WIDTH - _LEFT - _RIGHT
    axes = inches(figure, _LEFT, bottom, width, _AXES_HEIGHT)
    _bpd_lines(axes, data, keys, colors)
    if data.log_y:
        axes.set_yscale("log")
    if data.y_range is not None:
        axes.set_ylim(data.y_range)
    whole_steps(axes)
    axes.set_xlabel("training step (1 = first forward pass after init)")
    axes.set_ylabel("training NLL (bits/dim)" + (", log scale" if data.log_y else ""))
    axes.grid(alpha=0.3)
    if lanes:
        lane_axes = inches(figure, _LEFT, bottom + _AXES_HEIGHT + 0.1, width, _LANE * len(lanes))
        lane_axes.sharex(axes)
        _lane_marks(lane_axes, lanes, colors, axes.get_xlim())
    how = f"bold: mean of the last {data.window} steps, for the eye" if data.window > 1 else "every step"
    figure.suptitle(f"Training bpd per run (faint: every step; {how})", y=1 - 0.08 / height, va="top")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # runs of one cell share an entry
    figure.legend(
        unique.values(), unique.keys(), loc="lower left", bbox_to_anchor=(_LEFT / _WIDTH, 0.0), ncols=2,
        fontsize="small", frameon=False,
    )  # fmt: skip
    return save(figure, path)


def _penalty_overview(axes: Axes, runs: list[PenaltyCurves], colors: dict[str, Color]) -> None:
    """Every run's penalty on one axes: λ acts on this sum, so the runs are compared on one scale."""
    for curves in runs:
        axes.plot(curves.penalty.steps, curves.penalty.values, color=colors[curves.label], label=curves.label)
    if use_log_scale(np.concatenate([c.penalty.values for c in runs])):
        axes.set_yscale("log")
    axes.set_ylabel("Σ (h·w·Σlog|u|)²  (nats²)", fontsize="small")
    axes.set_xlabel("training step", fontsize="small")
    axes.set_title("The penalty before λ, every run", loc="left", fontsize="medium")
    axes.grid(alpha=0.3)
    whole_steps(axes)


def _conv_axes(axes: Axes, curves: PenaltyCurves) -> None:
    n = len(curves.conv_names)
    cmap = colormaps["viridis"]
    colors = [cmap(j / max(n - 1, 1)) for j in range(n)]
    if 0 < n <= _MAX_CONV_LEGEND:
        for name, series, color in zip(curves.conv_names, curves.conv_logdet, colors, strict=True):
            axes.plot(series.steps, series.values, color=color, linewidth=1.0, label=name)
        axes.legend(fontsize="xx-small", loc="best")
    elif n:  # 96 convs of Glow at K = 32: one collection draws 4x faster than 96 lines
        lines = [np.column_stack([s.steps, s.values]) for s in curves.conv_logdet]
        axes.add_collection(LineCollection(lines, colors=colors, linewidths=0.9))
        axes.autoscale_view()
    axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_title(curves.label, fontsize="x-small", pad=2)
    axes.grid(alpha=0.3)
    axes.tick_params(labelsize="x-small", pad=1)
    whole_steps(axes, nbins=5)


# The penalty figure, in inches: the overview, then a grid of small panels.
_OVERVIEW, _PANEL, _PANEL_ROW, _PANEL_GAP = 3.45, 1.45, 2.0, 0.35


def draw_penalty(runs: list[PenaltyCurves], path: Path, colors: dict[str, Color] | None = None) -> Path:
    """The penalty of every run on one axes, then each run's 1x1 convs' h·w·Σlog|u| (what λ pulls
    to 0) in small panels on one shared y scale, so that a drift reads the same in every panel.
    `colors`: by run label, as Fig. 4 colours them (default: by these runs alone)."""
    columns = min(max(len(runs), 1), 3 if len(runs) <= 9 else 4)
    rows = math.ceil(max(len(runs), 1) / columns)
    height = _OVERVIEW + _PANEL_ROW * rows
    figure = new_figure(_WIDTH, height, layout=None)
    width = _WIDTH - _LEFT - _RIGHT
    overview = inches(figure, _LEFT, height - 2.65, 0.6 * width, 2.25)
    _penalty_overview(overview, runs, colors or colors_for([c.label for c in runs]))
    figure.legend(
        *overview.get_legend_handles_labels(), loc="upper left", fontsize="x-small", frameon=False,
        bbox_to_anchor=((_LEFT + 0.62 * width) / _WIDTH, 1 - 0.35 / height),
    )  # fmt: skip
    what = "Each 1x1 conv's h·w·Σlog|u| (nats), what λ pulls to 0: one y scale for every run; colour = depth"
    figure.text(
        _LEFT / _WIDTH, (_PANEL_ROW * rows + 0.1) / height, f"{what} (dark: input side)", fontsize="small"
    )
    panel_width = (width - _PANEL_GAP * (columns - 1)) / columns
    panels: list[Axes] = []
    for k, curves in enumerate(runs):
        row, column = divmod(k, columns)
        bottom = _PANEL_ROW * (rows - row - 1) + 0.4
        axes = inches(figure, _LEFT + column * (panel_width + _PANEL_GAP), bottom, panel_width, _PANEL)
        if panels:
            axes.sharey(panels[0])
        _conv_axes(axes, curves)
        axes.tick_params(labelleft=column == 0)
        panels.append(axes)
    return save(figure, path)


def draw_lambda(points: list[LambdaPoint], path: Path) -> Path:
    """λ against best held-out bpd: every run (every seed) as a point, diverged ones as red X (on the top
    edge when never evaluated), and the mean per λ over the runs that did not diverge."""
    figure = new_figure(7.0, 4.4)
    axes = figure.add_subplot()
    lams = np.array([p.lam for p in points], dtype=np.float64)
    bpds = np.array([p.best_bpd for p in points], dtype=np.float64)
    diverged = np.array([p.diverged for p in points], dtype=bool)
    positive = lams[lams > 0]
    # symlog, linear below the smallest positive λ: λ = 0 (no penalty) stays on the axis.
    axes.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1e-8)
    ok = ~diverged & np.isfinite(bpds)
    axes.plot(lams[ok], bpds[ok], "o", color="tab:blue", alpha=0.6, label="completed (one point per seed)")
    means = np.array(lambda_means(points), dtype=np.float64).reshape(-1, 2)
    axes.plot(means[:, 0], means[:, 1], "_-", color="black", markersize=18, label="mean per λ (completed)")
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
    axes.set_title("λ sweep: best held-out bpd per seed, and the mean per λ")
    axes.grid(alpha=0.3)
    deduplicated_legend(axes, fontsize="small", loc="best")
    return save(figure, path)
