"""What every figure shares: Agg figures without pyplot, colours per group, saving.

Figures are built as `matplotlib.figure.Figure` on an Agg canvas directly, never through pyplot, so
drawing a report neither needs a display nor changes the process-wide backend of whoever calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
NONFINITE_COLOR = "#d62728"  # red: inf / NaN everywhere in the report
DIVERGED_MARKER = "X"
# Past this many runs a legend entry per run is unreadable: runs are then labelled by their cell.
MAX_RUN_LEGEND = 10


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png", dpi=DPI)
    return path


def colors_for(keys: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per distinct key, in first-seen order (tab10, then tab20 past ten)."""
    from matplotlib import colormaps

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
