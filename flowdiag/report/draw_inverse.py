"""Drawing the inverse views; the data come from `inverse_curves`, already extracted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import MaxNLocator

from flowdiag.report.canvas import DIVERGED_MARKER, NONFINITE_COLOR, new_figure, save
from flowdiag.report.inverse_curves import FailureRate, InverseCurves
from flowdiag.report.runs import given

HEATMAP_BAD = "black"


def _lam_colors(curves: list[InverseCurves]) -> dict[float | None, tuple[float, float, float, float]]:
    lams = sorted({c.lam for c in curves}, key=lambda lam: (lam is None, lam or 0.0))
    cmap = colormaps["viridis"]
    return {lam: cmap(i / max(len(lams) - 1, 1)) for i, lam in enumerate(lams)}


def draw_invertibility(curves: list[InverseCurves], threshold: float, path: Path) -> Path:
    """Reconstruction error, and every conv's condition number (the worst in bold), per run, coloured by λ."""
    figure = new_figure(11.0, 4.2)
    recon_axes, cond_axes = figure.subplots(1, 2)
    colors = _lam_colors(curves)
    for c in curves:
        color = colors[c.lam]
        shown = np.where(np.isfinite(c.recon_error), c.recon_error, np.nan)
        recon_axes.plot(
            c.steps,
            np.maximum(shown, 1e-12),
            "o-",
            color=color,
            markersize=3,
            label=given(c.lam, "λ", "{:g}"),
        )
        bad = ~np.isfinite(c.recon_error)
        if bad.any():
            recon_axes.plot(c.steps[bad], np.full(bad.sum(), 1e3), DIVERGED_MARKER, color=NONFINITE_COLOR)
        if c.conv_cond.size:
            cond_axes.plot(c.steps, c.conv_cond, color=color, linewidth=0.5, alpha=0.35)
            worst = np.nanmax(np.where(np.isfinite(c.conv_cond), c.conv_cond, np.nan), axis=1)
            cond_axes.plot(c.steps, worst, color=color, linewidth=1.8, label=given(c.lam, "λ", "{:g}"))
    if np.isfinite(threshold):  # NaN: the run's config does not give n_bits
        recon_axes.axhline(threshold, color="grey", linestyle=":", linewidth=1.0, label="quarter bin")
    recon_axes.set_yscale("log")
    recon_axes.set_xlabel("training step (evaluations)")
    recon_axes.set_ylabel("max |x - f⁻¹(f(x))| on a held-out batch")
    recon_axes.set_title("Reconstruction error (X: non-finite)", fontsize="medium")
    cond_axes.set_yscale("log")
    cond_axes.set_xlabel("training step (evaluations)")
    cond_axes.set_ylabel("condition number of W (float64 SVD)")
    cond_axes.set_title("Each 1x1 conv's conditioning (bold: the worst)", fontsize="medium")
    for axes in (recon_axes, cond_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = axes.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        if unique:
            axes.legend(unique.values(), unique.keys(), fontsize="x-small", loc="upper left")
    return save(figure, path)


def draw_inverse_layers(curves: list[InverseCurves], path: Path) -> Path:
    """Per run, the inverse's log10 max |output| per flow layer over evaluations (black: inf/NaN)."""
    figure = new_figure(11.0, 2.8 * max(len(curves), 1))
    grid = figure.subplots(max(len(curves), 1), 1, squeeze=False)
    cmap = colormaps["magma"].with_extremes(bad=HEATMAP_BAD)
    for (axes,), c in zip(grid, curves, strict=False):
        values = np.ma.masked_invalid(np.where(c.nonfinite, np.nan, c.log10_max_abs))
        image = axes.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
        axes.set_xticks(range(len(c.steps)), [str(s) for s in c.steps], fontsize="x-small")
        step = max(1, len(c.layer_names) // 12)
        axes.set_yticks(range(0, len(c.layer_names), step), c.layer_names[::step], fontsize="xx-small")
        axes.set_title(f"{c.label}: inverse (sampling) log10 max |output| per layer", fontsize="small")
        axes.set_xlabel("evaluation at step")
        figure.colorbar(image, ax=axes, fraction=0.03)
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
