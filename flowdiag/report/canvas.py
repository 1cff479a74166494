"""What every figure shares: Agg figures without pyplot, colours per group, saving, and the look of a
layer map (its colours, its non-finite and not-run cells, its colour bar).

Figures are built as `matplotlib.figure.Figure` on an Agg canvas directly, never through pyplot, so
drawing a report neither needs a display nor changes the process-wide backend of whoever calls it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba_array
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.markers import TICKLEFT
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from flowdiag.report.per_layer import GAP, MEASURED, NONFINITE, ColourScale

# 100 dpi: a figure of 11.5 inches is 1,150 pixels, the width of the HTML report's column, so the
# browser shows it pixel for pixel (at 110 dpi Chromium shrank every figure, and its text, by 15 %).
DPI = 100
NONFINITE_COLOR = "#d62728"  # red: inf / NaN everywhere in the report, and in no colour map it uses
DIVERGED_MARKER = "X"
# Past this many runs a legend entry per run is unreadable: runs are then labelled by their cell.
MAX_RUN_LEGEND = 10
# Layer maps: viridis (violet to yellow) and PRGn (purple, white, green) hold no red (BrBG's brown
# and PuOr's orange come within 35 to 46 CIELAB units of it, these 80 and more), so a non-finite
# cell can be no value's colour; viridis' dark end is violet, not the black the maps once used for
# inf/NaN. A cell that holds nothing (the layer did not run) is hatched, which no colour can be.
OUTPUT_PALETTE, LOGDET_PALETTE = "viridis", "PRGn"
GAP_FACE, GAP_EDGE, GAP_HATCH = "#f4f4f4", "#a8a8a8", "////"
LABEL_PT = 6.5  # a map's layer labels
MAP_HEADER = 1.05  # inches above a figure's maps: the legend, then the colour bars


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """An Agg figure; `layout=None` for figures placed by hand (constrained layout measures every
    tick label twice: half the time of a figure with many axes)."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> Path:
    """Write the figure as a PNG at the report's DPI; return `path`."""
    # zlib level 3, not PIL's 6: a third less time encoding a report's figures (0.06 against 0.09 s
    # a layer map figure) for files 5 % larger.
    figure.savefig(path, format="png", dpi=DPI, pil_kwargs={"compress_level": 3})
    return path


def inches(figure: Figure, left: float, bottom: float, width: float, height: float) -> Axes:
    """Axes at a rectangle given in inches from the figure's bottom left corner."""
    w, h = figure.get_size_inches()
    return figure.add_axes((left / w, bottom / h, width / w, height / h))


def colors_for(keys: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per distinct key, in first-seen order (tab10, then tab20 past ten)."""
    distinct = list(dict.fromkeys(keys))
    cmap = colormaps["tab10" if len(distinct) <= 10 else "tab20"]
    return {key: cmap(i % cmap.N) for i, key in enumerate(distinct)}


def legend_keys(labels: Sequence[str], groups: Sequence[str]) -> list[str]:
    """What each line is coloured and named by: the run, or its cell when there are too many runs."""
    return list(labels) if len(labels) <= MAX_RUN_LEGEND else list(groups)


def deduplicated_legend(axes: Axes, **kwargs: object) -> None:
    """A legend with one entry per label, however many lines share it."""
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        axes.legend(unique.values(), unique.keys(), **kwargs)  # type: ignore[arg-type]


def map_rgba(values: np.ndarray, states: np.ndarray, palette: str, scale: ColourScale) -> np.ndarray:
    """A map as RGBA bytes: values on `scale`, NONFINITE cells red, GAP cells transparent (the hatched
    background shows through). Bytes, because Agg resamples a (N, B, 4) byte image several times
    faster than it colours a masked float array (1.0 against 0.25 s for a map of 288 × 500)."""
    rgba = colormaps[palette](scale.position(np.where(states == MEASURED, values, scale.low)), bytes=True)
    rgba[states == NONFINITE] = np.round(to_rgba_array(NONFINITE_COLOR)[0] * 255).astype(np.uint8)
    rgba[states == GAP] = 0
    return rgba


def draw_map(axes: Axes, rgba: np.ndarray, extent: tuple[float, float, float, float]) -> None:
    """A map over a hatched background: the hatching shows only where a cell holds nothing."""
    left, right, bottom, top = extent
    background = Rectangle(
        (left, top), right - left, bottom - top, facecolor=GAP_FACE, edgecolor=GAP_EDGE,
        hatch=GAP_HATCH, linewidth=0, zorder=0,
    )  # fmt: skip
    axes.add_patch(background)
    axes.imshow(rgba, aspect="auto", interpolation="nearest", extent=extent, zorder=1)


def map_legend_handles(onset: bool, crossing: bool = False) -> list[Patch | Line2D]:
    """What a map's non-value cells and marks mean, for a legend."""
    handles: list[Patch | Line2D] = [
        Patch(facecolor=NONFINITE_COLOR, label="inf / NaN"),
        Patch(facecolor=GAP_FACE, edgecolor=GAP_EDGE, hatch=GAP_HATCH, label="did not run / no value"),
    ]
    if onset:
        handles.append(Line2D([], [], color=NONFINITE_COLOR, linestyle="--", label="NaN onset step"))
    if crossing:
        circle = {"marker": "o", "markerfacecolor": "none", "markeredgecolor": "black", "linestyle": "none"}
        handles.append(Line2D([], [], **circle, label="first over the threshold or inf/NaN"))  # type: ignore[arg-type]
    return handles


def scale_bar(axes: Axes, palette: str, scale: ColourScale, label: str) -> None:
    """A horizontal colour bar in `axes`, laid out as the maps use the colours (`ColourScale.position`),
    its ticks at whole numbers, `scale.mark` drawn across it in black."""
    gradient = np.linspace(0.0, 1.0, 256)[None, :]
    axes.imshow(gradient, aspect="auto", cmap=colormaps[palette], extent=(0.0, 1.0, 0.0, 1.0))
    ticks = scale.ticks()
    axes.set_xticks(scale.position(np.array(ticks)), [f"{t:.3g}" for t in ticks])
    axes.set_yticks([])
    axes.tick_params(labelsize="x-small", length=2, pad=1)
    axes.set_title(label, fontsize="small", pad=3)
    if math.isfinite(scale.mark):
        axes.axvline(float(scale.position(scale.mark)), color="black", linewidth=1.5)


def map_row_height(n_layers: int) -> float:
    """A map's height in inches: about 0.055 in a layer (a label every second layer), 1.3 to 3.6."""
    return min(max(0.055 * n_layers + 0.4, 1.3), 3.6)


def label_margin(names: Sequence[str]) -> float:
    """Inches left of a map for its layer labels and the axis label."""
    return 0.4 + max((len(n) for n in names), default=8) * LABEL_PT * 0.56 / 72


def layer_ticks(axes: Axes, names: Sequence[str], height: float, labelled: bool = True) -> None:
    """A label per layer that fits (`LABEL_PT` type, 1.25 line spacing), input side at the top, with a
    tick mark; nothing on a panel beside a labelled one.

    Drawn as plain text and one line of marks, not as the axis' ticks: matplotlib builds each tick as
    two lines, two texts and a grid line, 3 ms apiece, a third of a layer map figure's time.
    """
    axes.set_yticks([])
    if not labelled:
        return
    fits = max(1, int(height * 72 / (LABEL_PT * 1.25)))
    rows = np.arange(0, len(names), max(1, math.ceil(len(names) / fits)))
    transform = axes.get_yaxis_transform()  # x in axes fraction, y in rows
    marks = {"marker": TICKLEFT, "linestyle": "none", "color": "black", "markersize": 3, "clip_on": False}
    axes.plot(np.zeros(rows.size), rows, transform=transform, **marks)  # type: ignore[arg-type]
    for row in rows:
        axes.text(
            -0.012, row, names[row], transform=transform, ha="right", va="center", fontsize=LABEL_PT,
        )  # fmt: skip


class Bar(NamedTuple):
    """A colour bar above a column of maps."""

    left: float  # inches
    width: float
    palette: str
    scale: ColourScale
    label: str


def map_header(figure: Figure, bars: Sequence[Bar], onset: bool, crossing: bool = False) -> None:
    """The colour bars above the maps (one scale each, shared by every map of the report) and, above
    them, what a red and a hatched cell mean."""
    height = figure.get_size_inches()[1]
    for bar in bars:
        axes = inches(figure, bar.left + 0.1 * bar.width, height - 0.78, 0.8 * bar.width, 0.12)
        scale_bar(axes, bar.palette, bar.scale, bar.label)
    figure.legend(
        handles=map_legend_handles(onset, crossing), loc="upper left", bbox_to_anchor=(0.005, 0.998), ncols=4,
        fontsize="x-small", frameon=False, handlelength=1.6,
    )  # fmt: skip


def whole_steps(axes: Axes, nbins: int | str = "auto") -> None:
    """Steps are whole numbers: ticks only on them, one tick when a run has a single step (a plain
    integer locator falls back to 0.6, 0.75, ... when fewer than two whole numbers are in view)."""
    axes.xaxis.set_major_locator(MaxNLocator(nbins=nbins, integer=True, min_n_ticks=1))
