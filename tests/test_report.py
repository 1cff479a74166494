"""Reports from synthetic run files: the extracted numbers are the files' numbers, the figures draw,
the diagnosis names the injected divergence."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pytest
from matplotlib.image import imread
from rich.console import Console

from flowdiag.record.store import RunWriter, read_run
from flowdiag.report import build_report, collect_runs, diagnose, digest_run, find_runs, render_summary
from flowdiag.report.cells import grid_cells, is_lambda_sweep, lambda_points
from flowdiag.report.curves import bpd_curves, penalty_curves, select_penalty_runs
from flowdiag.report.diagnose import (
    ActNormInit,
    CauseFacts,
    ConvDrift,
    Crossing,
    likely_cause,
    rule_actnorm_init,
    rule_backward_overflow,
    rule_generic,
    rule_logdet_drift,
)
from flowdiag.report.digest import RunDigest
from flowdiag.report.draw_layers import draw_coupling_peaks
from flowdiag.report.draw_steps import draw_bpd
from flowdiag.report.per_layer import coupling_peaks, layer_heatmap, select_heatmap_runs
from flowdiag.report.run_table import run_rows, runs_table
from flowdiag.report.runs import RunSettings, best_eval_bpd, run_labels
from flowdiag.report.wording import diagnosis_lines
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import ModelConfig, RunConfig, TrainConfig

# --- synthetic runs -----------------------------------------------------------------------------

KINDS = ("actnorm", "invconv", "coupling")
NAMES = [f"levels.{lv}.steps.{k}.{kind}" for lv in range(2) for k in range(2) for kind in KINDS]
LAYER_KINDS = [name.rsplit(".", 1)[1] for name in NAMES]
COUPLINGS = [i for i, kind in enumerate(LAYER_KINDS) if kind == "coupling"]
CONVS = [i for i, kind in enumerate(LAYER_KINDS) if kind == "invconv"]
IMAGE_SIZE = 8  # level 0 works at 4x4 (h·w = 16), level 1 at 2x2 (h·w = 4)
PIXELS = [16 if name.startswith("levels.0.") else 4 for name in NAMES]
BAD_NORM = "levels.1.steps.0.actnorm"
INIT_NAMES = [n for n in NAMES if n.endswith("actnorm")] + ["levels.0.steps.1.coupling.net.layers.1"]
EPS = 1e-6
N_STEPS = 20


class Injected(NamedTuple):
    onset_step: int  # the row where `onset_layer` goes non-finite; the run stops there
    onset_layer: str
    cross_step: int  # an earlier step where `cross_layer` exceeds 1e4 while finite
    cross_layer: str


def config_json(m: int, lam: float, batch: int, seed: int) -> str:
    model = ModelConfig(image_size=IMAGE_SIZE, n_levels=2, n_steps=2, actnorm_eps=EPS)
    train = TrainConfig(init_batches=m, lam=lam, batch_size=batch, seed=seed)
    return RunConfig(model=model, train=train).to_json()


def layer_row(step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_abs, logdet) for one step, distinct per layer, step and seed."""
    j = np.arange(len(NAMES))
    max_abs = (1.0 + j) * (1.0 + 0.1 * step) + seed
    logdet = np.where(np.array(LAYER_KINDS) == "coupling", 0.0, 0.5 * (j + 1) * step - 3.0)
    return max_abs.astype(np.float32), logdet.astype(np.float32)


def train_bpd(step: int, seed: int) -> float:
    return 6.0 - 0.1 * step + 0.01 * seed


def write_init(writer: RunWriter, bad: bool) -> None:
    n = len(INIT_NAMES)
    log_max = np.full(n, 0.5)
    n_values = np.full(n, 4096)
    variance = np.full(n, 0.3)
    if bad:  # one value per channel: variance 0, scale 1/sqrt(eps) = 1000
        k = INIT_NAMES.index(BAD_NORM)
        log_max[k], n_values[k], variance[k] = math.log(1000.0), 1, 0.0
    pixels = [16 if name.startswith("levels.0.") else 4 for name in INIT_NAMES]
    writer.write_init(INIT_NAMES, log_max - 1.0, log_max, variance, n_values, pixels)


def make_run(
    run_dir: Path,
    *,
    m: int = 1,
    lam: float = 0.0,
    batch: int = 1,
    seed: int = 0,
    inject: Injected | None = None,
    bad_init: bool = False,
    steps: int = N_STEPS,
    status: str | None = None,
    config: str | None = None,
    skipped: int | None = None,
    forwards: int = 1,
    drift: bool = True,
) -> Path:
    """A run file as the trainer writes it; `skipped`: a layer that does not run in even steps;
    `forwards`: training forwards per row (gradient accumulation); `config`: instead of the settings;
    `drift=False`: every layer's log-det stays at its step-1 value (flat 1x1 convs)."""
    path = run_dir / "run.h5"
    writer = RunWriter(
        path,
        config_json=config_json(m, lam, batch, seed) if config is None else config,
        version="test",
        layer_names=NAMES,
        layer_kinds=LAYER_KINDS,
        layer_pixels=PIXELS,
        flush_every=7,
    )
    write_init(writer, bad_init)
    for step in range(1, steps + 1):
        max_abs, logdet = layer_row(step, seed)
        if not drift:
            logdet = layer_row(1, seed)[1]
        bpd = train_bpd(step, seed)
        if inject and step == inject.cross_step:
            max_abs[NAMES.index(inject.cross_layer)] = 5e4
        if inject and step == inject.onset_step:
            k = NAMES.index(inject.onset_layer)
            max_abs[k], max_abs[k + 1 :], bpd = np.inf, np.nan, math.nan
        penalty = float(np.sum(logdet[CONVS].astype(np.float64) ** 2))
        ran = np.ones(len(NAMES), bool)
        if skipped is not None and step % 2 == 0:  # did not run: no measurement, and no flag
            ran[skipped], max_abs[skipped], logdet[skipped] = False, np.nan, np.nan
        writer.append_step(
            step, loss=bpd, bpd=bpd, penalty=penalty, grad_norm=1.0, lr=1e-3, max_abs=max_abs,
            logdet=logdet, nonfinite=ran & ~np.isfinite(max_abs), ran=ran, forwards=forwards,
        )  # fmt: skip
        if step % 5 == 0:
            writer.append_eval(step, 5.5 - 0.05 * step + 0.01 * seed)
        if inject and step == inject.onset_step:
            writer.set_status("diverged", onset_step=step, onset_layer=inject.onset_layer)
            break
    writer.close(status or ("completed" if writer.status == "running" else None))
    return path


DIVERGE = Injected(onset_step=7, onset_layer="levels.1.steps.0.coupling", cross_step=5, cross_layer=NAMES[4])


@pytest.fixture
def ablation(tmp_path: Path) -> Path:
    """2 cells × 2 seeds; (M=1, λ=0) seed 0 diverges; a stale attempt that the report must skip."""
    out = tmp_path / "ablation"
    make_run(out / "runs" / "m1-s0", m=1, seed=0, inject=DIVERGE, bad_init=True)
    make_run(out / "runs" / "m1-s1", m=1, seed=1)
    make_run(out / "runs" / "m256-s0", m=256, seed=0)
    make_run(out / "runs" / "m256-s1", m=256, seed=1)
    make_run(out / ".stale" / "m1-s0-before-trial3", m=1, seed=0, inject=DIVERGE)
    (out / "study.db").write_bytes(b"")  # present in real output folders; the report does not need it
    return out


def digests(path: Path, fig5_step: int = 2) -> list[RunDigest]:
    """The report's view of the runs under `path`: each read a block at a time."""
    return [digest_run(f, fig5_step=fig5_step) for f in find_runs(path)]


def labels_of(runs: list[RunDigest]) -> list[str]:
    return run_labels([r.head for r in runs])


# --- finding runs -------------------------------------------------------------------------------


def test_collect_runs_finds_nested_runs_and_skips_stale(ablation: Path) -> None:
    runs = collect_runs(ablation)
    assert [r.path.parent.name for r in runs] == ["m1-s0", "m1-s1", "m256-s0", "m256-s1"]
    assert len(collect_runs(ablation / "runs" / "m1-s0")) == 1
    assert collect_runs(ablation / "runs" / "m1-s0" / "run.h5")[0].status == "diverged"


def test_collect_runs_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        collect_runs(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"no run\.h5"):
        collect_runs(tmp_path)


def test_run_labels_are_unique(tmp_path: Path) -> None:
    runs = [read_run(make_run(tmp_path / name)) for name in ("a", "b")] + [
        read_run(make_run(tmp_path / "c", m=4))
    ]
    labels = ["M=1 λ=0 b=1 seed=0 (a)", "M=1 λ=0 b=1 seed=0 (b)", "M=4 λ=0 b=1 seed=0"]
    assert run_labels([r.head for r in runs]) == labels


def test_truncated_or_corrupt_file_is_a_user_error(tmp_path: Path) -> None:
    good = make_run(tmp_path / "good")
    truncated = tmp_path / "bad" / "run.h5"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        collect_runs(tmp_path / "bad")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(UserError):
        collect_runs(garbage)


# --- extraction: the numbers are the files' numbers ---------------------------------------------


def test_bpd_curves_are_the_files_values_with_onset(ablation: Path) -> None:
    runs = digests(ablation)
    data = bpd_curves(runs, labels_of(runs))
    diverged, completed = data.curves[0], data.curves[1]
    np.testing.assert_array_equal(diverged.steps, np.arange(1, DIVERGE.onset_step + 1))
    np.testing.assert_array_equal(completed.bpd, collect_runs(ablation)[1].bpd)  # short: every row kept
    assert diverged.diverged and diverged.onset_step == DIVERGE.onset_step
    assert diverged.onset_bpd == pytest.approx(train_bpd(DIVERGE.onset_step - 1, 0))  # last finite bpd
    assert not completed.diverged and completed.onset_step == -1
    assert data.log_y is False


def test_coupling_peaks_at_step_2_are_log10_of_max_abs_with_inf_kept(tmp_path: Path) -> None:
    at2 = Injected(2, NAMES[COUPLINGS[1]], 1, NAMES[0])
    at1 = Injected(1, NAMES[COUPLINGS[0]], 99, NAMES[0])
    paths = [
        make_run(tmp_path / "ok"),
        make_run(tmp_path / "inf2", inject=at2),
        make_run(tmp_path / "dead1", inject=at1),
    ]
    runs = [read_run(p) for p in paths]
    peaks = coupling_peaks([digest_run(p, fig5_step=2) for p in paths], run_labels([r.head for r in runs]))
    ok, inf2, dead1 = peaks.lines
    expected = np.log10(runs[0].max_abs[1, COUPLINGS].astype(np.float64))
    np.testing.assert_array_equal(ok.log10_max_abs, expected)
    assert ok.layer_names == [NAMES[i] for i in COUPLINGS]
    assert inf2.log10_max_abs[0] == pytest.approx(np.log10(runs[1].max_abs[1, COUPLINGS[0]]))
    assert inf2.log10_max_abs[1] == np.inf  # kept, not dropped
    assert np.isnan(inf2.log10_max_abs[2:]).all() and inf2.nonfinite[1:].all()
    assert not dead1.has_row and dead1.last_step == 1
    png = draw_coupling_peaks(peaks, tmp_path / "fig5.png")
    assert imread(png).shape[0] > 200


def test_layer_heatmap_and_selection(ablation: Path) -> None:
    runs, records = digests(ablation), collect_runs(ablation)
    heat = layer_heatmap(runs[0], "r")  # 7 steps: a column per step
    assert heat.log10_max_abs.shape == (len(NAMES), DIVERGE.onset_step)
    max_abs = records[0].max_abs.astype(np.float64)
    # A column holds the finite values; the onset's inf is in `nonfinite`, drawn black.
    np.testing.assert_array_equal(
        heat.log10_max_abs, np.log10(np.where(np.isfinite(max_abs), max_abs, np.nan)).T
    )
    np.testing.assert_array_equal(heat.nonfinite, records[0].nonfinite.T)
    np.testing.assert_array_equal(heat.first_step, records[0].step)
    ld = records[0].logdet.astype(np.float64)
    np.testing.assert_allclose(heat.logdet_signed_log10, (np.sign(ld) * np.log10(1 + np.abs(ld))).T)
    order = select_heatmap_runs(runs[::-1], cap=3)
    assert order[0] == 3 and len(order) == 3  # the diverged run first, wherever it is


def test_penalty_curves_are_the_conv_columns(ablation: Path) -> None:
    runs, record = digests(ablation), collect_runs(ablation)[1]
    curves = penalty_curves(runs[1], "r")
    assert curves.conv_names == [NAMES[i] for i in CONVS]
    for series, column in zip(curves.conv_logdet, CONVS, strict=True):
        np.testing.assert_array_equal(series.steps, record.step)
        np.testing.assert_array_equal(series.values, record.logdet[:, column])
    np.testing.assert_array_equal(curves.penalty.values, record.penalty)
    assert select_penalty_runs(runs) == ([0, 1, 2, 3], [])  # every run: by λ, then M, then seed


def test_grid_cells_and_lambda_sweep(ablation: Path, tmp_path: Path) -> None:
    runs = digests(ablation)
    best = [best_eval_bpd(r.eval_bpd) for r in runs]
    cells = grid_cells(runs)
    assert [(c.key.init_batches, c.n_runs, c.n_diverged) for c in cells] == [(1, 2, 1), (256, 2, 0)]
    assert cells[0].best_bpd == best[1]  # the diverged run does not count
    assert cells[1].best_bpd == min(best[2], best[3])
    assert cells[1].mean_best_bpd == pytest.approx((best[2] + best[3]) / 2)
    assert not is_lambda_sweep(runs) and lambda_points(runs, labels_of(runs)) == []
    for i, lam in enumerate((1e-3, 0.0, 1e-5)):
        make_run(tmp_path / "sweep" / f"l{i}", lam=lam)
    sweep = digests(tmp_path / "sweep")
    points = lambda_points(sweep, labels_of(sweep))
    assert [p.lam for p in points] == [0.0, 1e-5, 1e-3]
    assert points[0].best_bpd == float(sweep[1].eval_bpd.min())


# --- diagnosis ----------------------------------------------------------------------------------


def test_diagnose_names_the_injected_divergence(ablation: Path) -> None:
    run = collect_runs(ablation)[0]
    d = diagnose(run)
    assert d is not None and d.severity == "diverged"
    assert (d.onset_step, d.onset_layer) == (DIVERGE.onset_step, DIVERGE.onset_layer)
    assert d.crossing == Crossing(DIVERGE.cross_step, DIVERGE.cross_layer, 5e4)
    assert d.facts.largest_scale is not None and d.facts.largest_scale.name == BAD_NORM
    assert d.facts.largest_scale.n_values == 1 and d.facts.largest_scale.scale == pytest.approx(1000.0)
    assert d.facts.smallest_var is not None and d.facts.smallest_var.name == BAD_NORM
    first_conv = d.facts.conv_drifts[0]
    column = run.logdet[:, CONVS[0]].astype(np.float64)
    assert first_conv.drift == pytest.approx(column[-1] - column[0]) and first_conv.positions == 16
    assert d.rule == "actnorm_init"
    assert f"ActNorm {BAD_NORM} was initialized from 1 value per channel (M=1 · batch 1 · 2x2)" in d.cause
    assert "1/sqrt(eps) = 1000" in d.cause and "--init-batches 256" in d.cause


def test_diagnose_warns_on_a_completed_crossing_and_skips_clean_runs(tmp_path: Path) -> None:
    assert diagnose(read_run(make_run(tmp_path / "clean"))) is None
    # Finite but large: never diverged, yet a layer passed the threshold at step 4.
    crossing = Injected(onset_step=99, onset_layer=NAMES[0], cross_step=4, cross_layer=NAMES[2])
    d = diagnose(read_run(make_run(tmp_path / "loud", inject=crossing)))
    assert d is not None and d.severity == "warning" and d.crossing == Crossing(4, NAMES[2], 5e4)
    assert diagnose(read_run(make_run(tmp_path / "loud2", inject=crossing)), threshold=1e5) is None


def _facts(**changes: object) -> CauseFacts:
    calm = ActNormInit("levels.0.steps.0.actnorm", 0.5, math.exp(0.5), 0.3, 4096, 16)
    base = CauseFacts(
        settings=RunSettings(256, 1e-5, 16, 0),
        ceiling=(1 / math.sqrt(EPS), "1/sqrt(eps)"),
        threshold=1e4,
        onset_step=12,
        onset_layer="levels.1.steps.0.coupling",
        onset_kind="coupling",
        crossing=Crossing(10, "levels.1.steps.0.coupling", 2e4),
        largest_scale=calm,
        smallest_var=calm,
        conv_drifts=(ConvDrift("levels.0.steps.0.invconv", 1.0, 3.0, 2.0, 16),),
        updates=11,
        precision="fp32",
        peak_before_onset=2e4,
        recon_threshold=0.25 / 256,
        inverse_failure=None,
    )
    return base._replace(**changes)


def test_rule_actnorm_init() -> None:
    huge = ActNormInit(BAD_NORM, math.log(1000.0), 1000.0, 0.0, 1, 1)
    sentence = rule_actnorm_init(_facts(largest_scale=huge, settings=RunSettings(1, 0.0, 1, 0)))
    assert sentence is not None and "1/sqrt(eps) = 1000" in sentence and "M=1 · batch 1 · 1x1" in sentence
    moderate = ActNormInit(BAD_NORM, math.log(150.0), 150.0, 4e-5, 16 * 4, 16)
    sentence = rule_actnorm_init(_facts(largest_scale=moderate, settings=RunSettings(4, 0.0, 1, 0)))
    assert sentence is not None and "scale was 150" in sentence and "M=4 · batch 1 · 4x4" in sentence
    assert rule_actnorm_init(_facts()) is None
    assert rule_actnorm_init(_facts(largest_scale=None)) is None


def test_rule_backward_overflow() -> None:
    sentence = rule_backward_overflow(_facts(onset_layer="backward", crossing=None))
    assert sentence is not None and "backward pass overflowed" in sentence and "step 12" in sentence
    assert rule_backward_overflow(_facts()) is None


def test_rule_logdet_drift() -> None:
    drifting = (ConvDrift("levels.0.steps.1.invconv", -2.0, 30.0, 32.0, 16),)
    no_penalty = RunSettings(256, 0.0, 16, 0)
    sentence = rule_logdet_drift(_facts(settings=no_penalty, conv_drifts=drifting))
    assert sentence is not None and "levels.0.steps.1.invconv" in sentence and "--lam" in sentence
    assert rule_logdet_drift(_facts(conv_drifts=drifting)) is None  # λ > 0 already
    small = (ConvDrift("levels.0.steps.1.invconv", 0.0, 8.0, 8.0, 16),)  # 0.5 nat per position
    assert rule_logdet_drift(_facts(settings=no_penalty, conv_drifts=small)) is None


def test_rule_generic_and_rule_order() -> None:
    sentence = rule_generic(_facts())
    assert "no single cause" in sentence and "levels.1.steps.0.coupling" in sentence and "step 10" in sentence
    assert "loss went non-finite at step 12" in rule_generic(_facts(onset_layer="loss", crossing=None))
    huge = ActNormInit(BAD_NORM, math.log(1000.0), 1000.0, 0.0, 1, 1)
    assert likely_cause(_facts(largest_scale=huge, onset_layer="backward"))[0] == "actnorm_init"
    assert likely_cause(_facts(onset_layer="backward"))[0] == "backward_overflow"
    assert likely_cause(_facts())[0] == "generic"


# --- the report ---------------------------------------------------------------------------------


def test_build_report_writes_every_file_with_the_files_numbers(ablation: Path, tmp_path: Path) -> None:
    runs = collect_runs(ablation)
    out = tmp_path / "report"
    summary = build_report(runs, out, title="Ablation", command="flowdiag report ablation", max_layer_maps=2)
    assert summary.markdown.exists() and summary.html.exists()
    names = {p.name for p in summary.figures}
    assert names == {
        "bpd.png",
        "coupling_step2.png",
        "penalty.png",
        "grid.png",
        "survival.png",  # two cells and a divergence: time to divergence per cell
        "layers_01.png",  # both maps: one figure holds up to four runs, on one colour scale
    }
    html = summary.html.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == len(summary.figures)
    for png in summary.figures:
        image = imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 300 and float(image.std()) > 0.01, png.name
    md = summary.markdown.read_text(encoding="utf-8")
    diverged = runs[0]
    assert f"| {int(diverged.nan_onset_step)} | {diverged.nan_onset_layer} |" in md
    assert diverged.nan_onset_step == DIVERGE.onset_step
    assert f"step {DIVERGE.cross_step}, layer {DIVERGE.cross_layer}" in md
    for run in runs[1:]:
        assert f"{float(run.eval_bpd.min()):.4f}" in md
    # The diverged run's early evaluation is no result: the table says where it diverged instead.
    assert f"{float(diverged.eval_bpd.min()):.4f}" not in md
    assert f"| diverged at step {DIVERGE.onset_step} | - |" in md
    assert re.search(r"\| 1 \| 0 \| 1 \| 2 \| 1 \| 1/2 \(50%\) \|", md)
    assert re.search(r"\| 256 \| 0 \| 1 \| 2 \| 0 \| 0/2 \(0%\) \|", md)
    assert "![" in md and "(bpd.png)" in md and "ActNorm levels.1.steps.0.actnorm" in md
    assert [label for label, _ in summary.diagnoses] == [run_labels(runs)[0]]
    console = Console(file=io.StringIO(), width=200)
    render_summary(summary, console)
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "likely cause" in printed and "M=256 λ=0 b=1 seed=1" in printed and "report.html" in printed


def test_build_report_for_a_lambda_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "tune"
    for i, lam in enumerate((0.0, 1e-5, 1e-3)):
        inject = DIVERGE if lam == 0.0 else None
        make_run(sweep / "runs" / f"trial{i:04d}", lam=lam, inject=inject, bad_init=lam == 0.0)
    summary = build_report(collect_runs(sweep), tmp_path / "out", title="tune-lambda", max_layer_maps=1)
    assert {p.name for p in summary.figures} >= {"lambda.png", "layers_01.png"}
    assert "layers_02.png" not in {p.name for p in summary.figures}
    assert [(p.lam, p.diverged) for p in summary.lambda_points] == [(0.0, True), (1e-5, False), (1e-3, False)]
    md = summary.markdown.read_text(encoding="utf-8")
    assert "## λ sweep" in md and "| 1e-05 |" in md


def test_build_report_refuses_nothing() -> None:
    with pytest.raises(UserError):
        build_report([], Path("unused"), title="x")


def test_step_1_divergence_reads_right(tmp_path: Path) -> None:
    at1 = Injected(onset_step=1, onset_layer=BAD_NORM, cross_step=99, cross_layer=NAMES[0])
    run = read_run(make_run(tmp_path / "r", inject=at1, bad_init=True))
    d = diagnose(run)
    assert d is not None and d.rule == "actnorm_init" and d.facts.updates == 0
    assert "first forward pass overflowed, before any update" in d.cause
    assert "step after step" not in d.cause
    lines = diagnosis_lines(d)
    assert "no optimizer update was made, so the 1x1 convs have not drifted" in lines
    assert not any("+0, +0" in line for line in lines)
    summary = build_report([run], tmp_path / "report", title="step 1")
    md = summary.markdown.read_text(encoding="utf-8")
    assert "penalty.png" not in md and "Ended at step 1, before any update" in md


def test_backward_onset_points_to_replay(tmp_path: Path) -> None:
    path = make_run(tmp_path / "r", steps=3, status="diverged")
    with h5py.File(path, "r+") as f:
        f.attrs["nan_onset_step"], f.attrs["nan_onset_layer"] = 3, "backward"
    d = diagnose(read_run(path))
    assert d is not None and d.rule == "backward_overflow"
    lines = diagnosis_lines(d)
    assert (
        "NaN onset: step 3, in the backward pass (every layer output finite; the gradient was not)" in lines
    )
    assert any(f"flowdiag replay {path.parent}" in line for line in lines)


def test_header_counts_every_run_past_the_threshold(ablation: Path, tmp_path: Path) -> None:
    loud = Injected(onset_step=99, onset_layer=NAMES[0], cross_step=4, cross_layer=NAMES[2])
    make_run(ablation / "runs" / "loud", m=4, inject=loud)
    summary = build_report(collect_runs(ablation), tmp_path / "report", title="t", max_layer_maps=1)
    md = summary.markdown.read_text(encoding="utf-8")
    assert "5 run(s), 1 diverged. 2 run(s) had a layer's max |output| over 10000 or non-finite: " in md
    assert "1 of them diverged, 1 completed (a warning)." in md


def test_bpd_axis_keeps_to_the_finite_runs(tmp_path: Path) -> None:
    blowup = Injected(onset_step=6, onset_layer=NAMES[3], cross_step=99, cross_layer=NAMES[0])
    paths = [make_run(tmp_path / "ok"), make_run(tmp_path / "bad", inject=blowup)]
    with h5py.File(paths[1], "r+") as f:  # the diverging run's loss climbs to 1e25 before NaN
        f["steps/bpd"][4] = 1e25
    runs = [digest_run(p) for p in paths]
    data = bpd_curves(runs, labels_of(runs))
    ok = read_run(paths[0]).bpd
    assert data.y_range is not None and data.y_range[1] < 10 and data.y_range[0] < ok.min() <= ok.max() < 10
    assert not data.log_y
    draw_bpd(data, tmp_path / "bpd.png")


def test_runs_that_differ_only_in_placement_form_one_sweep(tmp_path: Path) -> None:
    """The two-machine recipe: another data root, device and flush interval are still one λ sweep."""
    runs = []
    for i, (lam, root, device) in enumerate(((0.0, "/data/a", "cpu"), (1e-3, "/mnt/b", "cuda"))):
        path = make_run(tmp_path / f"r{i}", lam=lam)
        with h5py.File(path, "r+") as f:
            config = json.loads(f.attrs["config"])
            config["data"]["root"], config["train"]["device"] = root, device
            config["train"]["flush_every"], config["train"]["diagnostics"] = 10 + i, bool(i)
            f.attrs["config"] = json.dumps(config)
        runs.append(read_run(path))
    assert is_lambda_sweep(runs)
    with h5py.File(runs[1].path, "r+") as f:  # another K is another experiment
        config = json.loads(f.attrs["config"])
        config["model"]["n_steps"] = 3
        f.attrs["config"] = json.dumps(config)
    assert not is_lambda_sweep([runs[0], read_run(runs[1].path)])


# --- issue 18: layers that did not run, runs without a config, gradient accumulation ---------------


@pytest.mark.parametrize("file_format", [3, 2])
def test_a_layer_that_did_not_run_is_a_gap_never_a_divergence(tmp_path: Path, file_format: int) -> None:
    skipped = COUPLINGS[1]
    path = make_run(tmp_path / "r", skipped=skipped)
    if file_format == 2:  # no layers/ran: the reader derives it from the measurements and flags
        with h5py.File(path, "r+") as f:
            del f["layers/ran"], f["steps/forwards"]
            f.attrs["format_version"] = 2
    run = digest_run(path)
    assert diagnose(run) is None and run.crossing is None
    heat = layer_heatmap(run, "r")
    assert not heat.nonfinite.any()
    np.testing.assert_array_equal(heat.ran[skipped], np.arange(1, N_STEPS + 1) % 2 == 1)
    line = coupling_peaks([run], ["r"]).lines[0]  # step 2: the coupling did not run
    assert not line.ran[1] and not line.nonfinite.any()
    summary = build_report([run], tmp_path / "report", title="gaps")
    md = summary.markdown.read_text(encoding="utf-8")
    assert "0 diverged" in md and "No run diverged" in md
    # The Fig. 5 table: no coupling counted inf/NaN, the one that did not run included.
    assert re.search(r"\| M=1 λ=0 b=1 seed=0 \| [0-9.]+ \| 4 \(levels\.1\.steps\.1\.coupling\) \| 0 \|", md)


def test_a_run_without_a_config_says_not_given_and_invents_nothing(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "a", config="{}", inject=DIVERGE, bad_init=True)
    make_run(tmp_path / "runs" / "b", config='{"train": {"lam": 0.001}}')
    runs = digests(tmp_path / "runs")
    assert labels_of(runs) == ["settings not given", "M not given λ=0.001 b not given seed not given"]
    d = diagnose(runs[0])
    assert d is not None and d.rule == "actnorm_init"
    assert "(M not given · batch size not given · 2x2)" in d.cause and "M=1" not in d.cause
    assert d.facts.ceiling[1] == "" and "1/sqrt(eps)" not in d.cause  # the eps is not given either
    summary = build_report(runs, tmp_path / "report", title="no config", max_layer_maps=0)
    md = summary.markdown.read_text(encoding="utf-8")
    assert "settings not given" in md and "M=1" not in md and "b=16" not in md and "seed=0" not in md
    assert "| not given | 0.001 | not given |" in md  # the grid names what it does not know
    console = Console(file=io.StringIO(), width=200)
    render_summary(summary, console)
    assert "not given" in console.file.getvalue()  # type: ignore[attr-defined]


def test_the_run_table_shows_forwards_per_row_only_where_a_run_accumulated(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "a")
    make_run(tmp_path / "runs" / "b", seed=1, forwards=4)
    runs = digests(tmp_path / "runs")
    plain = runs_table(run_rows(runs[:1], ["a"]))
    assert not any("forwards" in column for column in plain.header)
    rows = run_rows(runs, labels_of(runs))
    assert [r.forwards for r in rows] == [1, 4]
    table = runs_table(rows)
    column = table.header.index("forwards per row (most)")
    assert [row[column] for row in table.rows] == ["1", "4"]
