"""Long runs: a report, watch and export of 300,000 steps read a block at a time, decimate without
losing an event, and say exactly where a run diverged. The runs are written cheaply through the public
block append, with few layers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from flowdiag.record.store import RunFile, RunWriter, read_run
from flowdiag.report import build_report, digest_run
from flowdiag.report.build import digest_runs
from flowdiag.report.decimate import MAX_BUCKETS
from flowdiag.report.digest import digest_record
from flowdiag.report.per_layer import layer_heatmap
from flowdiag.report.watch import read_tail
from flowdiag.report.watch_data import TAIL_ROWS
from flowdiag.settings.config import RunConfig

NAMES = ["levels.0.steps.0.actnorm", "levels.0.steps.0.invconv", "levels.0.steps.0.coupling"]
KINDS = ["actnorm", "invconv", "coupling"]
SPIKE_STEP, SPIKE_LAYER = 150_001, NAMES[2]
ONSET_STEP, ONSET_LAYER = 287_123, NAMES[1]


def long_run(path: Path, steps: int = 300_000, block: int = 100_000) -> Path:
    """`steps` rows of three layers: calm, but for a one-step spike in the coupling at SPIKE_STEP and one
    NaN step in the invconv at ONSET_STEP (the run's onset), the bpd spiking and NaN with them."""
    writer = RunWriter(
        path, config_json=RunConfig().to_json(), version="test", layer_names=NAMES, layer_kinds=KINDS,
        layer_pixels=[16, 16, 16], total_steps=steps,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for first in range(1, steps + 1, block):
        step = np.arange(first, min(first + block, steps + 1))
        n = len(step)
        max_abs = (1.0 + 0.1 * rng.random((n, 3))).astype(np.float32)
        logdet = np.zeros((n, 3), np.float32)
        bpd = 2.0 + 0.01 * rng.random(n)
        for at, column, value in ((SPIKE_STEP, 2, 1e6), (ONSET_STEP, 1, np.nan)):
            if first <= at < first + n:
                max_abs[at - first, column], bpd[at - first] = value, 50.0 if value > 0 else np.nan
        writer.append_steps(
            step, loss=bpd, bpd=bpd, penalty=np.zeros(n), grad_norm=np.ones(n), lr=np.full(n, 1e-3),
            max_abs=max_abs, logdet=logdet, nonfinite=~np.isfinite(max_abs), wall_time=step * 0.5,
        )  # fmt: skip
        if first <= ONSET_STEP < first + n:
            writer.set_status("running", onset_step=ONSET_STEP, onset_layer=ONSET_LAYER)
    writer.close("diverged" if steps >= ONSET_STEP else "completed")
    return path


@pytest.fixture(scope="module")
def run_300k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return long_run(tmp_path_factory.mktemp("long") / "run" / "run.h5")


def test_a_one_step_spike_and_a_late_nan_survive_decimation_and_reach_the_report(
    run_300k: Path, tmp_path: Path
) -> None:
    digest = digest_run(run_300k)
    bpd = dict(zip(digest.bpd.steps.tolist(), digest.bpd.values.tolist(), strict=True))
    assert len(bpd) <= 3 * MAX_BUCKETS  # drawn: at most 1,500 of 300,000 points
    assert bpd[SPIKE_STEP] == 50.0 and math.isnan(bpd[ONSET_STEP])  # each at its own step
    assert max(v for v in bpd.values() if math.isfinite(v)) == 50.0
    heat = layer_heatmap(digest, "r")
    spike_column = int(np.searchsorted(heat.last_step, SPIKE_STEP))
    onset_column = int(np.searchsorted(heat.last_step, ONSET_STEP))
    assert heat.first_step[spike_column] <= SPIKE_STEP <= heat.last_step[spike_column]
    assert heat.log10_max_abs[2, spike_column] == pytest.approx(6.0)  # max-pooled: the spike stays
    assert heat.nonfinite[1, onset_column] and heat.nonfinite.sum() == 1  # one column, one layer
    # The events come from every row, never from what is drawn.
    assert digest.crossing is not None and (digest.crossing.step, digest.crossing.layer) == (
        SPIKE_STEP, SPIKE_LAYER,
    )  # fmt: skip
    summary = build_report([digest], tmp_path / "report", title="long", max_layer_maps=0)
    md = summary.markdown.read_text(encoding="utf-8")
    assert f"NaN onset: step {ONSET_STEP}, layer {ONSET_LAYER}" in md
    assert f"| {ONSET_STEP} | {ONSET_LAYER} |" in md  # the runs table
    assert f"step {SPIKE_STEP}, layer {SPIKE_LAYER} (max |output| 1e+06)" in md


def test_a_run_read_in_small_blocks_digests_as_it_does_whole(tmp_path: Path) -> None:
    path = long_run(tmp_path / "run.h5", steps=9_000, block=2_500)
    whole = digest_record(read_run(path))
    chunked = digest_run(path, block_bytes=40_000)  # blocks of a few hundred rows
    for name in ("final_bpd", "most_forwards", "recorded", "crossing", "peak_before_onset", "fig5_row"):
        assert repr(getattr(chunked, name)) == repr(getattr(whole, name)), name
    np.testing.assert_array_equal(chunked.conv_first, whole.conv_first)
    np.testing.assert_array_equal(chunked.conv_last, whole.conv_last)
    for a, b in [
        (chunked.bpd, whole.bpd),
        (chunked.penalty, whole.penalty),
        *zip(chunked.conv_logdet, whole.conv_logdet, strict=True),
    ]:
        np.testing.assert_array_equal(a.steps, b.steps)
        np.testing.assert_array_equal(a.values, b.values)
    assert chunked.layers is not None and whole.layers is not None
    for a, b in zip(chunked.layers, whole.layers, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_folder_keeps_layer_maps_only_for_the_runs_that_get_one(tmp_path: Path) -> None:
    paths = [
        long_run(tmp_path / f"r{i}" / "run.h5", steps=steps, block=5_000)
        for i, steps in enumerate((900, 300, 600))
    ]
    digests = digest_runs(paths, threshold=1e4, fig5_step=2, max_layer_maps=1)
    assert [d.layers is not None for d in digests] == [True, False, False]  # the first run, in order
    assert all(d.bpd.steps.size for d in digests)  # every run keeps its curves


def test_watch_reads_the_tail_of_a_long_run_only(run_300k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[int, int]] = []
    rows = RunFile.rows

    def recording(self: RunFile, start: int, stop: int) -> object:
        asked.append((start, stop))
        return rows(self, start, stop)

    monkeypatch.setattr(RunFile, "rows", recording)
    tail = read_tail(run_300k)
    assert asked == [(300_000 - TAIL_ROWS, 300_000)]
    assert tail.head.last_step == 300_000 and tail.rows.step[-1] == 300_000
    assert (tail.head.nan_onset_step, tail.head.nan_onset_layer) == (ONSET_STEP, ONSET_LAYER)
