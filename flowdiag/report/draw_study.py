"""Drawing the ablation's figures: the grid of cells with each divergence rate's Wilson interval, and
time to divergence per cell (Kaplan–Meier). The data come from `cells` and `statistics`, already
computed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes

from flowdiag.report.canvas import colors_for, new_figure, save, whole_steps
from flowdiag.report.cells import GridCell
from flowdiag.report.runs import NOT_GIVEN
from flowdiag.report.statistics import SurvivalCurve

# The best-bpd colour scale spans at least this many bits/dim: seeds of one setting differ by a few
# hundredths, and a 0.1 bpd gap stretched over the whole colour map would paint noise as a result.
MIN_BPD_SPAN = 0.5


def bpd_colour_range(values: list[float]) -> tuple[float, float] | None:
    """The best-bpd colour range: the values' range, widened about its middle to MIN_BPD_SPAN.

    >>> bpd_colour_range([8.156, 8.255])
    (7.9555, 8.4555)
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    if high - low >= MIN_BPD_SPAN:
        return low, high
    middle = (low + high) / 2
    return round(middle - MIN_BPD_SPAN / 2, 10), round(middle + MIN_BPD_SPAN / 2, 10)


def _not_given_last(value: float | None) -> tuple[bool, float]:
    return value is None, value or 0.0


def _cell_text(cell: GridCell, rate: bool) -> str:
    if rate:
        low, high = cell.ci95
        return f"{cell.n_diverged}/{cell.n_runs}\n[{low:.2f}, {high:.2f}]"
    return f"{cell.best_bpd:.3f}" if math.isfinite(cell.best_bpd) else "all\ndiverged"


def _grid_panel(
    axes: Axes, cells: list[GridCell], batch: int | None, rate: bool, bpd_range: tuple[float, float] | None
) -> None:
    ms = sorted({c.key.init_batches for c in cells}, key=_not_given_last)
    lams = sorted({c.key.lam for c in cells}, key=_not_given_last)
    values = np.full((len(ms), len(lams)), np.nan)
    for cell in cells:
        if cell.key.batch_size != batch:
            continue
        i, j = ms.index(cell.key.init_batches), lams.index(cell.key.lam)
        values[i, j] = cell.divergence_rate if rate else cell.best_bpd
        # A white box keeps the number readable on the darkest and the lightest colours alike.
        box = {"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 2}
        axes.text(j, i, _cell_text(cell, rate), ha="center", va="center", fontsize="small", bbox=box)
    palette = colormaps["Reds" if rate else "viridis_r"].with_extremes(bad="#dddddd")
    # One colour scale for every batch size, so that equal colours mean equal values across panels.
    limits = (
        {"vmin": 0.0, "vmax": 1.0} if rate else dict(zip(("vmin", "vmax"), bpd_range or (), strict=False))
    )
    image = axes.imshow(np.ma.masked_invalid(values), cmap=palette, aspect="auto", **limits)
    label = "divergence rate over seeds" if rate else "best held-out bpd (bits/dim)"
    axes.figure.colorbar(image, ax=axes, label=label)
    axes.set_xticks(range(len(lams)), [NOT_GIVEN if lam is None else f"{lam:g}" for lam in lams])
    axes.set_yticks(range(len(ms)), [NOT_GIVEN if m is None else str(m) for m in ms])
    axes.set_xlabel("λ (log-det penalty)")
    axes.set_ylabel("M (ActNorm init minibatches)")
    batch_text = f"batch {batch}" if batch is not None else f"batch size {NOT_GIVEN}"
    what = "diverged / runs [Wilson 95 %]" if rate else "best held-out bpd"
    axes.set_title(f"{batch_text}: {what}", fontsize="medium")


def _rate_bars(axes: Axes, cells: list[GridCell]) -> None:
    """Each cell's divergence rate with its Wilson 95 % interval as an error bar."""
    x = np.arange(len(cells))
    rates = np.array([c.divergence_rate for c in cells])
    low = rates - np.array([c.ci95[0] for c in cells])
    high = np.array([c.ci95[1] for c in cells]) - rates
    axes.errorbar(x, rates, yerr=[low, high], fmt="o", color="tab:red", ecolor="black", capsize=4)
    axes.set_xticks(x, [c.key.label() for c in cells], rotation=20, ha="right", fontsize="small")
    axes.set_ylim(-0.05, 1.05)
    axes.set_ylabel("divergence rate")
    axes.set_title("Divergence rate per cell with its Wilson 95 % interval", fontsize="medium")
    axes.grid(alpha=0.3, axis="y")


def draw_grid(cells: list[GridCell], path: Path) -> Path:
    """Per batch size, M × λ maps of the divergence rate (with its interval) and of the best held-out bpd,
    then every cell's rate with its Wilson 95 % interval as an error bar."""
    batches = sorted({c.key.batch_size for c in cells}, key=_not_given_last)
    figure = new_figure(max(5.5 * len(batches), 7.0), 10.5)
    grid = figure.add_gridspec(3, len(batches), height_ratios=(1.0, 1.0, 0.8))
    bpd_range = bpd_colour_range([c.best_bpd for c in cells])
    for column, batch in enumerate(batches):
        _grid_panel(figure.add_subplot(grid[0, column]), cells, batch, rate=True, bpd_range=None)
        _grid_panel(figure.add_subplot(grid[1, column]), cells, batch, rate=False, bpd_range=bpd_range)
    _rate_bars(figure.add_subplot(grid[2, :]), cells)
    figure.suptitle(
        "Ablation grid by batch size\ntop: diverged / runs; middle: best held-out bpd of the runs that\n"
        f"did not diverge (colour range at least {MIN_BPD_SPAN:g} bpd); bottom: divergence rates with\n"
        "their Wilson 95 % intervals",
        fontsize="medium",
    )
    return save(figure, path)


_CURVE_STYLES = ("-", "--", ":", "-.")


def draw_survival(curves: list[tuple[str, SurvivalCurve]], path: Path) -> Path:
    """Per cell, the Kaplan–Meier estimate of the share of runs not yet diverged by each step, as a step
    plot with its 95 % band; a run that did not diverge is censored at its last step."""
    figure = new_figure(9.0, 4.8)
    axes = figure.add_subplot()
    colors = colors_for([label for label, _ in curves])
    for k, (label, curve) in enumerate(curves):
        color = colors[label]
        name = f"{label} ({curve.events} diverged, {curve.censored} censored)"
        # Cells that diverged alike draw one curve: the dash tells each apart where they coincide.
        style = _CURVE_STYLES[k % len(_CURVE_STYLES)]
        axes.step(curve.steps, curve.survival, style, where="post", color=color, linewidth=1.6, label=name)
        axes.fill_between(curve.steps, curve.low, curve.high, step="post", color=color, alpha=0.15)
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("training step")
    axes.set_ylabel("share of runs not yet diverged")
    axes.set_title("Time to divergence per cell (Kaplan–Meier, 95 % band)", fontsize="medium")
    axes.grid(alpha=0.3)
    whole_steps(axes)
    axes.legend(fontsize="x-small", loc="best")
    return save(figure, path)
