"""Drawing the per-layer figures and the grid; the data come from `per_layer` and `cells`, already
extracted."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm, to_rgba_array
from matplotlib.figure import Figure

from flowdiag.report.canvas import (
    NONFINITE_COLOR,
    colors_for,
    deduplicated_legend,
    legend_keys,
    new_figure,
    save,
)
from flowdiag.report.cells import GridCell
from flowdiag.report.per_layer import CouplingPeakLine, CouplingPeaks, LayerHeatmap
from flowdiag.report.runs import NOT_GIVEN

HEATMAP_BAD = "black"  # inf / NaN cells; no colormap used here contains black
HEATMAP_GAP = "#d9d9d9"  # a layer that did not run: light grey, not a value and not a blow-up
Color = tuple[float, float, float, float]
_MAX_LAYER_TICKS = 40


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


def draw_coupling_peaks(data: CouplingPeaks, path: Path) -> Path:
    """Paper Fig. 5: log10 max |output| per coupling layer at one step, inf/NaN on the top edge."""
    figure = new_figure(8.0, 4.6)
    axes = figure.add_subplot()
    keys = legend_keys([line.label for line in data.lines], [line.group for line in data.lines])
    colors = colors_for(keys)
    notes = _peak_lines(axes, data, keys, colors)
    values = [line.log10_max_abs[line.ran & np.isfinite(line.log10_max_abs)] for line in data.lines]
    every = np.concatenate(values) if values else np.array([])
    low, high = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
    axes.set_ylim(low - 0.5, high + 1.0)
    _nonfinite_marks(axes, data, keys, colors)
    axes.set_xlabel("coupling layer (1 = nearest the input)")
    axes.set_ylabel(f"log10 max |output| at step {data.step}")
    axes.set_title(f"Coupling outputs at step {data.step} (step 2 = after one update)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    deduplicated_legend(axes, fontsize="small", loc="upper left")
    if notes:
        more = f" (+{len(notes) - 4} more)" if len(notes) > 4 else ""
        figure.text(0.01, 0.005, "; ".join(notes[:4]) + more, fontsize="x-small")
    return save(figure, path)


def short_layer_name(name: str) -> str:
    """levels.2.steps.0.actnorm -> L2 K0 actnorm: readable as a tick label."""
    return re.sub(r"^levels\.(\d+)\.steps\.(\d+)\.", r"L\1 K\2 ", name)


def _layer_ticks(axes: Axes, names: list[str]) -> None:
    n = len(names)
    every = max(1, math.ceil(n / _MAX_LAYER_TICKS))
    ticks = list(range(0, n, every))
    axes.set_yticks(ticks, [short_layer_name(names[i]) for i in ticks], fontsize="x-small")


def _colours(values: np.ndarray, data: LayerHeatmap, palette: Colormap, norm: Normalize) -> np.ndarray:
    """The map as RGBA bytes, drawn as they are: Agg resamples a (N, B, 4) byte image several times
    faster than it colours a masked float array (1.0 against 0.25 s for a map of 288 × 500)."""
    measured = np.isfinite(values) & data.ran & ~data.nonfinite
    rgba = palette(norm(np.where(measured, values, np.nan)), bytes=True)
    rgba[~measured] = to_rgba_array(HEATMAP_GAP)[0] * 255  # a layer that did not run
    rgba[data.nonfinite] = to_rgba_array(HEATMAP_BAD)[0] * 255  # never mistaken for a gap
    return rgba


def _heatmap_panel(figure: Figure, axes: Axes, data: LayerHeatmap, values: np.ndarray, signed: bool) -> None:
    # Gaps (a layer that ran in none of a column's steps) in light grey, non-finite in black: a layer
    # that did not run is never drawn as one that blew up.
    palette = colormaps["coolwarm" if signed else "viridis"]
    measured = values[np.isfinite(values) & data.ran & ~data.nonfinite]
    low, high = (float(measured.min()), float(measured.max())) if measured.size else (0.0, 1.0)
    norm: Normalize = Normalize(low, high if high > low else low + 1.0)
    if signed:
        reach = max(abs(low), abs(high), 1e-9)
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-reach, vmax=reach)
    extent = (
        data.first_step[0] - 0.5, data.last_step[-1] + 0.5, len(data.layer_names) - 0.5, -0.5,
    )  # fmt: skip
    axes.imshow(_colours(values, data, palette, norm), aspect="auto", interpolation="nearest", extent=extent)
    label = "sign · log10(1 + |log-det|)  (log-det in nats)" if signed else "log10 max |output|"
    figure.colorbar(ScalarMappable(norm=norm, cmap=palette), ax=axes, label=label)
    if data.onset_step >= 0:
        axes.axvline(data.onset_step, color=NONFINITE_COLOR, linestyle="--", linewidth=1.0)
    onset = f" (dashed: NaN onset, step {data.onset_step})" if data.onset_step >= 0 else ""
    axes.set_xlabel("training step" + onset)
    _layer_ticks(axes, data.layer_names)
    what = "per-layer log-det" if signed else "per-layer max |output|"
    axes.set_title(f"{what}; black = inf/NaN, grey = did not run", fontsize="medium")
    ever = np.flatnonzero(data.nonfinite.any(axis=1))
    if not signed and ever.size:
        # A run stops at its onset, so its non-finite column is the last one, a pixel wide over
        # thousands of steps: mark those layers on the right edge as well.
        x = np.full(ever.size, extent[1])
        axes.plot(x, ever, "<", color=NONFINITE_COLOR, markersize=5, clip_on=False)
        axes.set_title(f"{what}; black = inf/NaN, red ◂ = layer went inf/NaN", fontsize="medium")


def draw_heatmap(data: LayerHeatmap, path: Path) -> Path:
    """Layer × step maps for one run: log10 max |output| and the signed log of each layer's log-det."""
    n = len(data.layer_names)
    figure = new_figure(13.0, min(3.0 + 0.16 * min(n, _MAX_LAYER_TICKS), 10.0))
    left, right = figure.subplots(1, 2, sharey=True)
    _heatmap_panel(figure, left, data, data.log10_max_abs, signed=False)
    _heatmap_panel(figure, right, data, data.logdet_signed_log10, signed=True)
    # The layers' names once, on the left: laying out 40 tick labels twice was a third of the figure.
    right.tick_params(labelleft=False)
    left.set_ylabel("layer, forward order (input at top)")
    figure.suptitle(data.label)
    return save(figure, path)


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
        if rate:
            text = f"{cell.n_diverged}/{cell.n_runs}"
        else:
            text = f"{cell.best_bpd:.3f}" if math.isfinite(cell.best_bpd) else "all\ndiverged"
        # A white box keeps the number readable on the darkest and the lightest colours alike.
        box = {"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 2}
        axes.text(j, i, text, ha="center", va="center", fontsize="small", bbox=box)
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
    axes.set_title(
        f"{batch_text}: " + ("diverged / runs" if rate else "best held-out bpd"), fontsize="medium"
    )


def _not_given_last(value: float | None) -> tuple[bool, float]:
    return value is None, value or 0.0


def draw_grid(cells: list[GridCell], path: Path) -> Path:
    """Per batch size, M × λ maps of the divergence rate and of the best held-out bpd."""
    batches = sorted({c.key.batch_size for c in cells}, key=_not_given_last)
    figure = new_figure(max(5.5 * len(batches), 7.0), 7.5)
    panels = figure.subplots(2, len(batches), squeeze=False)
    bpds = [c.best_bpd for c in cells if math.isfinite(c.best_bpd)]
    bpd_range = (min(bpds), max(bpds)) if bpds else None
    for column, batch in enumerate(batches):
        _grid_panel(panels[0][column], cells, batch, rate=True, bpd_range=None)
        _grid_panel(panels[1][column], cells, batch, rate=False, bpd_range=bpd_range)
    figure.suptitle(
        "Ablation grid by batch size\ntop: diverged / runs; bottom: best held-out bpd (non-diverged runs)"
    )
    return save(figure, path)
