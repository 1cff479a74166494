"""Figures that cannot be misread (issue 23, point 4): one colour scale over every map of a report,
non-finite and not-run cells apart from every value, one naming of layers in every figure and table,
every diverged run visible and labelled in Fig. 4 with smoothing that never moves an onset, and no bpd
for a run without a result. Extraction is tested by its numbers; the drawing under Agg, by its pixels."""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.image import imread

from flowdiag.record.store import read_run
from flowdiag.report import build_report, digest_run, find_runs
from flowdiag.report.canvas import (
    DPI,
    GAP_EDGE,
    LOGDET_PALETTE,
    MAP_HEADER,
    NONFINITE_COLOR,
    OUTPUT_PALETTE,
    map_rgba,
)
from flowdiag.report.curves import bpd_curves, end_lanes, penalty_curves, trailing_mean
from flowdiag.report.draw_layers import draw_layer_maps
from flowdiag.report.draw_steps import draw_bpd
from flowdiag.report.figure_sections import layer_maps
from flowdiag.report.layer_naming import head_layer_labels, layer_label
from flowdiag.report.per_layer import (
    GAP,
    MEASURED,
    MIN_DECADES,
    NONFINITE,
    cell_states,
    coupling_peaks,
    layer_heatmap,
    map_scales,
    output_scale,
)
from flowdiag.report.run_table import run_rows, runs_table
from flowdiag.report.runs import run_labels
from tests.test_report import COUPLINGS, DIVERGE, N_STEPS, NAMES, Injected, layer_row, make_run

LOUD = Injected(onset_step=99, onset_layer=NAMES[0], cross_step=4, cross_layer=NAMES[2])  # 5e4, finite


def _digests(folder: Path) -> list:
    return [digest_run(f) for f in find_runs(folder)]


def _labels(runs: list) -> list[str]:
    return run_labels([r.head for r in runs])


# --- one colour scale ---------------------------------------------------------------------------


def test_one_colour_scale_spans_every_run_and_never_stretches_noise(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "calm")
    make_run(tmp_path / "runs" / "loud", seed=1, inject=LOUD)
    make_run(tmp_path / "runs" / "dead", seed=2, inject=DIVERGE)
    runs = _digests(tmp_path / "runs")
    maps = [layer_heatmap(r, "r") for r in runs]
    output, logdet = map_scales(maps, threshold=1e4)
    # The data's range over every run: the loud run's 5e4 on top, never the dead run's inf.
    calm_values = np.log10(np.stack([layer_row(s, 0)[0] for s in range(1, N_STEPS + 1)]).astype(np.float64))
    assert output.data_high == pytest.approx(math.log10(5e4))
    assert output.data_low == pytest.approx(calm_values.min())
    assert (output.low, output.high, output.mark) == (0.0, 5.0, 4.0)  # whole decades, threshold marked
    assert logdet.low == -logdet.high and logdet.high >= abs(logdet.data_low)
    # The calm run alone still spans the threshold (4 decades), not its own 0.04 to 1.56.
    alone = map_scales(maps[:1], threshold=1e4)[0]
    assert (alone.low, alone.high) == (0.0, 4.0) and alone.data_high < 1.6
    # No threshold that would shrink it: still MIN_DECADES wide.
    assert (
        output_scale([(np.array([0.2, 0.8]), np.zeros(2, np.int8))], threshold=math.nan).high == MIN_DECADES
    )
    # The inverse's maps join the same scale.
    inverse = (np.array([[7.2]]), np.array([[MEASURED]], np.int8))
    assert map_scales(maps, 1e4, [inverse])[0].high == 8.0


def test_the_threshold_sits_mid_scale_whatever_the_extremes() -> None:
    """An inverse that sampled 1e30 must not leave the training maps' 1e4 crossings in the dark."""
    values = np.array([-0.4, 0.5, 4.17, 29.8])
    scale = output_scale([(values, np.zeros(4, np.int8))], threshold=1e4)
    assert (scale.low, scale.mark, scale.high) == (-1.0, 4.0, 30.0)
    positions = scale.position(values)
    assert scale.position(scale.mark) == 0.5 and scale.position(-1.0) == 0.0 and scale.position(30.0) == 1.0
    assert (np.diff(positions) > 0).all() and positions[2] > 0.5 and positions[1] < 0.2
    assert scale.ticks() == [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 14.0, 19.0, 24.0, 30.0]  # none overlap
    # Nothing past the threshold: linear, the threshold at the top.
    calm = output_scale([(values[:2], np.zeros(2, np.int8))], threshold=1e4)
    assert not calm.has_knee and calm.position(2.0) == pytest.approx(0.6)


def test_every_map_of_a_report_names_the_same_colour_range(tmp_path: Path) -> None:
    for i in range(5):  # five maps: two figures (three and two runs)
        make_run(tmp_path / "runs" / f"r{i}", seed=i, inject=LOUD if i == 3 else None)
    summary = build_report(_digests(tmp_path / "runs"), tmp_path / "report", title="t")
    assert {"layers_01.png", "layers_02.png"} <= {p.name for p in summary.figures}
    md = summary.markdown.read_text(encoding="utf-8")
    captions = re.findall(r"\*Per-layer log10 max \|output\|.*\*", md)
    assert len(captions) == 2
    ranges = {re.search(r"from (\S+) to (\S+) \(max", c).groups() for c in captions}  # type: ignore[union-attr]
    assert ranges == {("0", "5")}  # the loud run's 5e4 sets the top of both figures


# --- non-finite, not run, values ----------------------------------------------------------------


def test_cell_states_keep_values_flags_and_gaps_apart() -> None:
    values = np.array([[0.5, np.inf, np.nan, np.nan, 2.0]])
    nonfinite = np.array([[False, True, True, False, False]])
    ran = np.array([[True, True, True, False, True]])
    states = cell_states(values, nonfinite, ran)
    assert states.tolist() == [[MEASURED, NONFINITE, NONFINITE, GAP, MEASURED]]
    # A layer that ran but holds no value (diagnostics off) is no blow-up either.
    assert cell_states(np.array([np.nan]), np.array([False]), np.array([True])).tolist() == [GAP]
    scale = output_scale([(values, states)], threshold=1e4)
    rgba = map_rgba(values, states, OUTPUT_PALETTE, scale)
    red = np.round(np.array(to_rgba(NONFINITE_COLOR)) * 255)
    np.testing.assert_array_equal(rgba[states == NONFINITE], [red, red])
    assert (rgba[states == GAP][:, 3] == 0).all()  # transparent: the hatching shows
    assert (rgba[states == MEASURED][:, 3] == 255).all()
    assert not (rgba[states == MEASURED] == red).all(axis=1).any()


@pytest.mark.parametrize("palette", [OUTPUT_PALETTE, LOGDET_PALETTE])
def test_no_colour_of_a_map_is_near_the_non_finite_red_or_black(palette: str) -> None:
    colours = colormaps[palette](np.linspace(0, 1, 256))[:, :3]
    red = np.array(to_rgba(NONFINITE_COLOR)[:3])
    assert np.linalg.norm(colours - red, axis=1).min() > 0.35
    assert colours.sum(axis=1).min() > 0.3  # the dark end is a colour, not black


def _pixels(png: Path, colour: str) -> int:
    """Pixels of `colour` below the figure's header (its legend shows every special colour once)."""
    image = imread(png)[int(MAP_HEADER * DPI) + 5 :, :, :3]
    target = np.array(to_rgba(colour)[:3])
    return int((np.abs(image - target).max(axis=2) < 0.08).sum())


def test_a_layer_map_is_red_only_where_a_layer_went_non_finite(tmp_path: Path) -> None:
    healthy = [
        digest_run(make_run(tmp_path / n, seed=s, skipped=COUPLINGS[1])) for n, s in (("a", 0), ("b", 1))
    ]
    dead = digest_run(make_run(tmp_path / "dead", inject=DIVERGE))
    scales = map_scales([layer_heatmap(r, "r") for r in [*healthy, dead]], 1e4)
    calm = draw_layer_maps([layer_heatmap(r, "r") for r in healthy], scales, tmp_path / "calm.png")
    # A healthy run whose coupling skips every other step: hatched there, never red.
    assert _pixels(calm, NONFINITE_COLOR) == 0 and _pixels(calm, GAP_EDGE) > 100
    # Without the onset's dashed line, the red left is the onset column's flagged cells (a seventh of
    # the map's width, 6 of 12 layers) and the right-edge marks of those layers.
    # The first crossing, circled: the file's values at step 5, whatever the map's pooling.
    assert layer_heatmap(dead, "r").crossing == (DIVERGE.cross_step, NAMES.index(DIVERGE.cross_layer))
    assert layer_heatmap(healthy[0], "r").crossing is None
    hot = draw_layer_maps([layer_heatmap(dead, "r")._replace(onset_step=-1)], scales, tmp_path / "hot.png")
    assert _pixels(hot, NONFINITE_COLOR) > 2000


# --- one naming of layers -----------------------------------------------------------------------


def test_layer_labels_are_the_recorded_paths_with_the_kind_where_the_path_hides_it() -> None:
    assert layer_label("levels.0.steps.3.coupling", "coupling") == "levels.0.steps.3.coupling"
    assert layer_label("flows.1.0.flows.2", "actnorm") == "flows.1.0.flows.2 [actnorm]"
    assert layer_label("flows.1.2", "other") == "flows.1.2"
    assert layer_label("transform._transforms.0.ActNorm", "actnorm") == "transform._transforms.0.ActNorm"


def test_one_naming_in_every_figure_and_table_of_a_library_flow(tmp_path: Path) -> None:
    """A normflows Glow recorded by the Monitor: its module paths, kinds added, everywhere."""
    import flowdiag
    from tests.library_flows import images, normflows_glow

    model = normflows_glow()
    with flowdiag.Monitor(model, tmp_path / "nf") as monitor:
        for seed in range(2):
            loss = model.forward_kld(images(4, seed=seed))
            loss.backward()
            monitor.step(loss)
    run = digest_run(tmp_path / "nf" / "run.h5")
    labels = head_layer_labels(run.head)
    assert "flows.1.1.flows.0 [coupling]" in labels and "merges.0" in labels
    kinds = run.head.layer_kinds
    assert layer_heatmap(run, "r").layer_names == labels
    coupling_names = coupling_peaks([run], ["r"]).lines[0].layer_names
    assert coupling_names == [n for n, k in zip(labels, kinds, strict=True) if k == "coupling"]
    assert penalty_curves(run, "r").conv_names == [
        n for n, k in zip(labels, kinds, strict=True) if k == "invconv"
    ]


def test_the_inverse_map_and_the_tables_name_layers_as_the_training_maps_do(tmp_path: Path) -> None:
    from flowdiag.settings.config import ModelConfig, RunConfig, TrainConfig
    from flowdiag.train.trainer import train

    config = RunConfig(
        model=ModelConfig(n_levels=2, n_steps=1, hidden=8, conv="plain"),
        train=TrainConfig(batch_size=8, steps=2, eval_every=1, lr=1e-12),
    )
    train(config, tmp_path / "run")
    make_run(tmp_path / "dead", inject=DIVERGE)
    runs = [digest_run(tmp_path / "run" / "run.h5"), digest_run(tmp_path / "dead" / "run.h5")]
    maps = layer_maps(runs, ["glow", "dead"], cap=12, threshold=1e4)
    assert maps.inverse[0].layer_names == layer_heatmap(runs[0], "glow").layer_names
    assert maps.inverse[0].layer_names == list(runs[0].head.layer_names)  # flowdiag's Glow: the paths
    table = runs_table(run_rows(runs, ["glow", "dead"]))
    assert table.rows[1][table.header.index("onset")] == DIVERGE.onset_layer


# --- Fig. 4 -------------------------------------------------------------------------------------


def test_trailing_mean_uses_no_later_step_and_is_exact() -> None:
    steps = np.arange(1, 11)
    values = np.full(10, 8.0)
    values[6] = 1e24  # a climb at step 7, then back
    smoothed = trailing_mean(steps, values, window=3)
    np.testing.assert_array_equal(smoothed[:6], 8.0)  # nothing of step 7 shows before it
    assert smoothed[6] > 1e23 and smoothed[9] == 8.0  # exact once the window has passed it
    gapped = values.copy()
    gapped[3] = np.nan
    out = trailing_mean(steps, gapped, window=3)
    assert np.isnan(out[3]) and out[4] == 8.0  # the curve breaks where the data does
    np.testing.assert_array_equal(trailing_mean(steps, values, window=1), values)


def test_smoothing_never_moves_an_onset(tmp_path: Path) -> None:
    paths = [make_run(tmp_path / "ok"), make_run(tmp_path / "dead", seed=1, inject=DIVERGE)]
    with h5py.File(paths[1], "r+") as f:  # the loss climbs to 1e25 the step before its onset
        f["steps/bpd"][DIVERGE.onset_step - 2] = 1e25
    runs = [digest_run(p) for p in paths]
    data = bpd_curves(runs, _labels(runs))
    assert data.window == 2  # 10 % of 20 steps
    dead = data.curves[1]
    assert dead.onset_step == DIVERGE.onset_step == dead.end.step
    raw_finite = dead.steps[np.isfinite(dead.bpd)]
    assert dead.steps[np.isfinite(dead.smoothed)].tolist() == raw_finite.tolist()
    climb = DIVERGE.onset_step - 1
    before = dead.steps < climb
    np.testing.assert_allclose(dead.smoothed[before], trailing_mean(dead.steps[before], dead.bpd[before], 2))
    assert dead.end_text == "diverged at step 7 in levels.1.steps.0.coupling"


def test_every_run_without_a_result_has_its_own_lane(tmp_path: Path) -> None:
    at1 = Injected(onset_step=1, onset_layer=NAMES[COUPLINGS[0]], cross_step=99, cross_layer=NAMES[0])
    make_run(tmp_path / "runs" / "a", seed=0, inject=at1)
    make_run(tmp_path / "runs" / "b", seed=1, inject=at1)  # the same step: once one X hid the other
    make_run(tmp_path / "runs" / "c", seed=2, steps=10, status="interrupted")
    make_run(tmp_path / "runs" / "d", seed=3)
    with h5py.File(tmp_path / "runs" / "c" / "run.h5", "r+") as f:
        f.attrs["total_steps"] = N_STEPS
    runs = _digests(tmp_path / "runs")
    labels = _labels(runs)
    data = bpd_curves(runs, labels)
    lanes = end_lanes(data.curves, labels)
    assert [(lane.key, lane.kind, lane.steps) for lane in lanes] == [
        (labels[0], "diverged", (1,)),
        (labels[1], "diverged", (1,)),
        (labels[2], "interrupted", (10,)),
    ]
    assert lanes[0].text == f"{labels[0]}: diverged at step 1 in {NAMES[COUPLINGS[0]]}"
    assert lanes[2].text == f"{labels[2]}: interrupted at step 10 of {N_STEPS}"
    # Runs coloured by cell (past ten runs): a lane per cell counts its runs and lists their steps.
    grouped = end_lanes(data.curves, ["cell"] * 4)
    assert [lane.text for lane in grouped] == [
        "cell: 2 of 4 runs diverged (steps 1, 1)",
        "cell: 1 of 4 runs interrupted (step 10)",
    ]
    plain = draw_bpd(bpd_curves(runs[3:], labels[3:]), tmp_path / "plain.png")
    laned = draw_bpd(data, tmp_path / "laned.png")
    assert imread(laned).shape[0] > imread(plain).shape[0]  # three lanes above the axes


# --- no bpd for a run without a result ----------------------------------------------------------


def test_a_run_without_a_result_shows_how_it_ended_never_a_bpd(tmp_path: Path) -> None:
    blown = make_run(tmp_path / "runs" / "blown", steps=1, status="diverged")
    with h5py.File(blown, "r+") as f:  # the main job's M = 1: step 1's loss 3.7e24, its backward inf
        f["steps/bpd"][0] = 3.696e24
        f.attrs["nan_onset_step"], f.attrs["nan_onset_layer"] = 1, "backward"
    make_run(tmp_path / "runs" / "cut", seed=1, steps=10, status="interrupted")
    make_run(tmp_path / "runs" / "done", seed=2)
    runs = _digests(tmp_path / "runs")
    rows = run_rows(runs, _labels(runs))
    assert runs[0].final_bpd == pytest.approx(3.696e24)  # the data keeps it ...
    assert math.isnan(rows[0].final_bpd) and math.isnan(rows[1].best_bpd)  # ... no result does
    table = runs_table(rows)
    final, best = table.header.index("final bpd"), table.header.index("best held-out bpd")
    assert [r[final] for r in table.rows[:2]] == ["diverged at step 1", "interrupted at step 10"]
    assert [r[best] for r in table.rows[:2]] == ["-", "-"]
    assert table.rows[2][final] == f"{read_run(tmp_path / 'runs' / 'done' / 'run.h5').bpd[-1]:.4f}"
    summary = build_report(runs, tmp_path / "report", title="t", max_layer_maps=0)
    md = summary.markdown.read_text(encoding="utf-8")
    assert "e+24" not in md and "3.696" not in md
