"""Drawing the per-layer figures; the data come from `per_layer`, already extracted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from flowdiag.report.canvas import (
    LOGDET_PALETTE,
    MAP_HEADER,
    NONFINITE_COLOR,
    OUTPUT_PALETTE,
    Bar,
    colors_for,
    deduplicated_legend,
    draw_map,
    inches,
    label_margin,
    layer_ticks,
    legend_keys,
    map_header,
    map_rgba,
    map_row_height,
    new_figure,
    save,
    whole_steps,
)
from flowdiag.report.per_layer import (
    MIN_DECADES,
    ColourScale,
    CouplingPeakLine,
    CouplingPeaks,
    LayerHeatmap,
    cell_states,
)

Color = tuple[float, float, float, float]
MapScales = tuple[ColourScale, ColourScale]  # (log10 max |output|, signed-log log-det)
_NAMED_COUPLINGS = 16  # past this many, Fig. 5 numbers its couplings instead of naming them


def _missing_note(line: CouplingPeakLine, step: int) -> str | None:
    if not line.recorded:
        return "no per-layer records (diagnostics off)"
    if not line.shown_step:
        reason = f"diverged at step {line.last_step}" if line.last_step else "no steps recorded"
        return f"no row at step {step}: {reason}"
    return None


def _peak_lines(axes: Axes, data: CouplingPeaks, keys: list[str], colors: dict[str, Color]) -> list[str]:
    """One line per run with a row; the runs without one named in the legend or in notes returned."""
    per_run_legend = len(data.lines) == len(set(keys)) and keys == [line.label for line in data.lines]
    notes: list[str] = []
    for line, key in zip(data.lines, keys, strict=True):
        note = _missing_note(line, data.step)
        numbers = np.arange(1, len(line.layer_names) + 1)
        if note is not None:
            if per_run_legend:
                axes.plot([], [], color=colors[key], label=f"{key} ({note})")
            else:
                notes.append(f"{line.label}: {note}")
            continue
        # Not finite, or not run (a gap): no point; the flagged ones go on the top edge below.
        shown = np.where(np.isfinite(line.log10_max_abs) & line.ran, line.log10_max_abs, np.nan)
        if line.has_row:
            axes.plot(numbers, shown, "o-", color=colors[key], markersize=4, linewidth=1.2, label=key)
        else:
            earlier = f"{key} (step {line.shown_step}: ended before step {data.step})"
            axes.plot(numbers, shown, "s--", color=colors[key], markersize=4, linewidth=1.2, label=earlier)
    return notes


def _nonfinite_marks(axes: Axes, data: CouplingPeaks, keys: list[str], colors: dict[str, Color]) -> None:
    """The couplings the row flags non-finite, on the top edge (inf and NaN alike: it blew up)."""
    top = axes.get_ylim()[1]
    for line, key in zip(data.lines, keys, strict=True):
        if _missing_note(line, data.step) is not None:
            continue
        numbers = np.arange(1, len(line.layer_names) + 1)
        bad = line.nonfinite & line.ran
        if bad.any():
            axes.plot(
                numbers[bad],
                np.full(bad.sum(), top),
                "^",
                color=colors[key],
                markersize=9,
                markeredgecolor=NONFINITE_COLOR,
                markeredgewidth=1.5,
                clip_on=False,
            )
            axes.plot([], [], "^", color="white", markeredgecolor=NONFINITE_COLOR, label="inf/NaN (top edge)")
    axes.set_ylim(axes.get_ylim()[0], top)


def _shared_names(data: CouplingPeaks) -> tuple[str, ...]:
    """The couplings' names where every run has the same few (the names the table and the maps use);
    empty where they differ or are too many to write under the axis (numbered instead)."""
    names = {tuple(line.layer_names) for line in data.lines}
    shared = next(iter(names)) if len(names) == 1 else ()
    return shared if len(shared) <= _NAMED_COUPLINGS else ()


def _coupling_ticks(axes: Axes, names: tuple[str, ...]) -> None:
    if names:
        axes.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize="x-small")
        axes.set_xlabel("coupling layer, forward order (input side on the left)")
        return
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("coupling layer (1 = nearest the input)")


def draw_coupling_peaks(data: CouplingPeaks, path: Path) -> Path:
    """Paper Fig. 5: log10 max |output| per coupling layer at one step, inf/NaN on the top edge."""
    names = _shared_names(data)
    # Room for the names written at 30° (x-small type: about 0.054 in a character), or for numbers.
    bottom = 0.75 + 0.5 * 0.054 * max((len(n) for n in names), default=0)
    figure = new_figure(9.0, 4.0 + bottom, layout=None)
    axes = inches(figure, 0.8, bottom, 8.0, 3.6)
    keys = legend_keys([line.label for line in data.lines], [line.group for line in data.lines])
    colors = colors_for(keys)
    notes = _peak_lines(axes, data, keys, colors)
    values = [line.log10_max_abs[line.ran & np.isfinite(line.log10_max_abs)] for line in data.lines]
    every = np.concatenate(values) if values else np.array([])
    low, high = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
    # As in the maps: at least MIN_DECADES, so that healthy couplings' noise stays a flat line.
    axes.set_ylim(low - 0.5, max(high + 1.0, low - 0.5 + MIN_DECADES))
    _nonfinite_marks(axes, data, keys, colors)
    _coupling_ticks(axes, names)
    axes.set_ylabel(f"log10 max |output| at step {data.step}")
    axes.set_title(f"Coupling outputs at step {data.step} (step 2 = after one update)")
    axes.grid(alpha=0.3)
    deduplicated_legend(axes, fontsize="small", loc="upper left")
    if notes:
        more = f" (+{len(notes) - 4} more)" if len(notes) > 4 else ""
        figure.text(0.01, 0.005, "; ".join(notes[:4]) + more, fontsize="x-small")
    return save(figure, path)


# A layer map figure, in inches: rows of runs, each a max |output| map and a log-det map.
MAPS_PER_FIGURE = 4
_WIDTH, _TITLE, _XTICKS, _XLABEL, _GAP = 11.5, 0.3, 0.32, 0.25, 0.3


def _palette(signed: bool) -> str:
    return LOGDET_PALETTE if signed else OUTPUT_PALETTE


def _map_panel(axes: Axes, data: LayerHeatmap, signed: bool, scale: ColourScale) -> None:
    values = data.logdet_signed_log10 if signed else data.log10_max_abs
    rgba = map_rgba(values, cell_states(values, data.nonfinite, data.ran), _palette(signed), scale)
    extent = (data.first_step[0] - 0.5, data.last_step[-1] + 0.5, len(data.layer_names) - 0.5, -0.5)
    draw_map(axes, rgba, extent)
    axes.set_xlim(extent[0], extent[1])
    axes.set_ylim(extent[2], extent[3])
    whole_steps(axes, nbins=8)
    axes.tick_params(axis="x", labelsize="x-small", pad=1)
    if data.onset_step >= 0:
        axes.axvline(data.onset_step, color=NONFINITE_COLOR, linestyle="--", linewidth=1.0)
    if not signed and data.crossing is not None:
        step, row = data.crossing
        for colour, width in (("black", 2.2), ("white", 1.0)):  # seen on the darkest and lightest colours
            axes.plot([step], [row], "o", ms=10, mfc="none", mec=colour, mew=width, clip_on=False)
    ever = np.flatnonzero(data.nonfinite.any(axis=1))
    if not signed and ever.size:
        # A run stops at its onset, so its non-finite column is the last one, a pixel wide over
        # thousands of steps: the layers that went inf/NaN are marked on the right edge as well.
        x = np.full(ever.size, extent[1])
        axes.plot(x, ever, "<", color=NONFINITE_COLOR, markersize=4, clip_on=False)


def draw_layer_maps(maps: list[LayerHeatmap], scales: MapScales, path: Path) -> Path:
    """Layer × step maps of up to MAPS_PER_FIGURE runs, a row each: log10 max |output| and the signed
    log of each layer's log-det, every map on the report's shared colour scales (`map_scales`)."""
    left = label_margin([name for m in maps for name in m.layer_names])
    inner = _WIDTH - left - 0.3 - _GAP
    widths = (0.6 * inner, 0.4 * inner)
    rows = [map_row_height(len(m.layer_names)) for m in maps]
    height = MAP_HEADER + sum(rows) + len(maps) * (_TITLE + _XTICKS) + _XLABEL
    figure = new_figure(_WIDTH, height, layout=None)
    output = "log10 max |output|, every map (black: threshold)"
    bars = [
        Bar(left, widths[0], OUTPUT_PALETTE, scales[0], output),
        Bar(
            left + widths[0] + _GAP,
            widths[1],
            LOGDET_PALETTE,
            scales[1],
            "sign · log10(1 + |log-det in nats|)",
        ),
    ]
    map_header(
        figure,
        bars,
        onset=any(m.onset_step >= 0 for m in maps),
        crossing=any(m.crossing is not None for m in maps),
    )
    y = height - MAP_HEADER
    for data, row in zip(maps, rows, strict=True):
        y -= _TITLE + row
        pair = [inches(figure, bar.left, y, bar.width, row) for bar in bars]
        for axes, signed, scale in zip(pair, (False, True), scales, strict=True):
            _map_panel(axes, data, signed, scale)
            layer_ticks(axes, data.layer_names, row, labelled=not signed)
        pair[0].set_title(f"{data.label}: {data.end_text}", loc="left", fontsize="small", pad=3)
        y -= _XTICKS
    pair[0].set_xlabel("training step (a column pools consecutive steps)", fontsize="small", labelpad=1)
    pair[1].set_xlabel("training step", fontsize="small", labelpad=1)
    return save(figure, path)
