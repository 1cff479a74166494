"""The run file: round trip, visibility while a run writes, survival of SIGKILL, and clean errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from flowdiag.record import store
from flowdiag.record.store import LAYER_KINDS, RunWriter, is_run_file, read_run
from flowdiag.record.store import layout as store_layout
from flowdiag.record.store import writer as store_writer
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ["level0.step0.actnorm", "level0.step0.invconv", "level0.step0.coupling", "level1.step0.actnorm"]
KINDS = ["actnorm", "invconv", "coupling", "actnorm"]
PIXELS = [16, 16, 16, 4]
N = len(NAMES)


def make_writer(path: Path, **kwargs: object) -> RunWriter:
    # A long flush timer: these tests count rows per flush, and a slow machine must not add flushes.
    options = {
        "config_json": RunConfig().to_json(),
        "version": "9.9.9",
        "flush_every": 5,
        "flush_seconds": 3600.0,
        "layer_pixels": PIXELS,
    } | kwargs
    return RunWriter(path, layer_names=NAMES, layer_kinds=KINDS, **options)  # type: ignore[arg-type]


def row(step: int, flagged: bool = False) -> dict[str, object]:
    """Every value a function of the step, so a read-back row shows which step it came from. A layer in
    three did not run (NaN, never flagged); `flagged`: the last layer's output is inf."""
    columns = np.arange(N)
    ran = (step + columns) % 3 != 0
    max_abs = np.where(ran, step + columns + 0.5, np.nan)
    nonfinite = np.zeros(N, bool)
    if flagged:
        max_abs[-1], nonfinite[-1], ran[-1] = np.inf, True, True
    return {
        "loss": 0.5 * step,
        "bpd": step + 0.25,
        "penalty": 1e-3 * step,
        "grad_norm": 2.0 * step,
        "lr": 1e-4 * step,
        "max_abs": max_abs,
        "logdet": np.where(ran, -(step + columns) - 0.25, np.nan),
        "nonfinite": nonfinite,
        "ran": ran,
    }


def append_steps(writer: RunWriter, steps: range) -> None:
    for step in steps:
        writer.append_step(step, **row(step))  # type: ignore[arg-type]


def assert_rows(record: store.RunRecord, steps: np.ndarray, flagged_from: int = 0) -> None:
    np.testing.assert_array_equal(record.step, steps)
    expected = [row(int(s), flagged_from > 0 and s >= flagged_from) for s in steps]
    for name in ("loss", "bpd", "penalty", "grad_norm", "lr"):
        np.testing.assert_array_equal(getattr(record, name), [r[name] for r in expected])
    for name in ("max_abs", "logdet", "nonfinite", "ran"):
        np.testing.assert_array_equal(
            getattr(record, name), np.array([r[name] for r in expected]).reshape(-1, N)
        )


# --- round trip ----------------------------------------------------------------------------------


def test_round_trip_of_every_field(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    config = RunConfig()
    writer = make_writer(path, flush_every=7)
    writer.write_init(
        ["a", "b.net.actnorm", "c"], [-1.0, -2.0, -3.0], [1.0, 2.0, 3.0], [0.0, 1e-3, 2.5], [256, 256, 1024]
    )
    for step in range(1, 301):
        writer.append_step(step, **row(step, flagged=step >= 290))  # type: ignore[arg-type]
        if step == 290:
            writer.set_status("running", onset_step=290, onset_layer=NAMES[-1])
        if step % 50 == 0:
            writer.append_eval(step, 3.0 - step / 1000)
    assert writer.n_steps == 300
    writer.close("diverged")  # the status given to close wins, the onset stays as set
    record = read_run(path)

    assert record.path == path
    assert record.version == "9.9.9"
    assert record.config == config.to_dict()
    assert RunConfig.from_dict(record.config) == config
    assert (record.status, record.nan_onset_step, record.nan_onset_layer) == ("diverged", 290, NAMES[-1])
    assert_rows(record, np.arange(1, 301), flagged_from=290)
    assert record.step.dtype == np.int64
    assert {getattr(record, n).dtype for n in ("loss", "bpd", "penalty", "grad_norm", "lr")} == {
        np.dtype(np.float64)
    }
    assert record.max_abs.dtype == record.logdet.dtype == np.float32
    assert record.nonfinite.dtype == np.bool_
    assert record.max_abs.shape == record.logdet.shape == record.nonfinite.shape == (300, N)
    assert record.layer_names == NAMES
    assert record.layer_kinds == KINDS
    np.testing.assert_array_equal(record.eval_step, [50, 100, 150, 200, 250, 300])
    np.testing.assert_array_equal(record.eval_bpd, [3.0 - s / 1000 for s in (50, 100, 150, 200, 250, 300)])
    assert record.eval_step.dtype == np.int64
    assert record.init is not None
    assert record.init["name"] == ["a", "b.net.actnorm", "c"]
    np.testing.assert_array_equal(record.init["log_scale_min"], [-1.0, -2.0, -3.0])
    np.testing.assert_array_equal(record.init["log_scale_max"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(record.init["min_input_var"], [0.0, 1e-3, 2.5])
    np.testing.assert_array_equal(record.init["n_values"], [256, 256, 1024])
    assert record.init["n_values"].dtype == np.int64  # type: ignore[union-attr]
    np.testing.assert_array_equal(record.layer_index("actnorm"), [0, 3])
    np.testing.assert_array_equal(record.layer_index("coupling"), [2])


def test_file_layout_matches_the_documented_names(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_writer(path, config_json='{"k": [1, 2]}') as writer:
        append_steps(writer, range(1, 13))
        writer.append_eval(12, 1.5)
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 3
        assert f.attrs["flowdiag_version"] == "9.9.9"
        assert (f.attrs["phase"], f.attrs["total_steps"]) == (b"init", -1)
        assert f["layers/pixels"][()].tolist() == PIXELS
        assert f["steps/wall_time"].shape == (12,)
        assert json.loads(f.attrs["config"]) == {"k": [1, 2]}
        onset = (f.attrs["nan_onset_step"], f.attrs["nan_onset_layer"])
        assert (f.attrs["status"], *onset) == (b"running", -1, b"")
        # What flushes finished: step, eval and inverse rows, init entries (none: no init written).
        assert f.attrs["committed"].tolist() == [12, 1, 0, 0]
        assert "init" in f and len(f["init"]) == 0  # made with the file, so the root's links never change
        # The text a flush may change is fixed-width UTF-8, wide enough for any layer name: written in place.
        for name in ("status", "phase", "nan_onset_layer", "reverse_onset_layer"):
            stored = h5py.check_string_dtype(f.attrs.get_id(name).dtype)
            assert stored is not None and stored.encoding == "utf-8" and stored.length == 64, name
        growing = [f"steps/{n}" for n in ("step", "loss", "bpd", "penalty", "grad_norm", "lr", "wall_time")]
        growing += ["layers/max_abs", "layers/logdet", "layers/nonfinite", "eval/step", "eval/bpd"]
        for name in growing:
            dataset = f[name]
            assert dataset.maxshape[0] is None, name
            assert dataset.chunks is not None and dataset.chunks[0] >= 16, name
            # Uncompressed, so that a flush rewrites the last chunk in place (see layout._CHUNK_ROWS).
            assert dataset.compression is None and dataset.compression_opts is None, name
        assert f["steps/step"].shape == (12,)
        assert f["layers/max_abs"].shape == (12, N)
        assert h5py.check_string_dtype(f["layers/name"].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(f["layers/kind"].dtype).encoding == "utf-8"


# --- visibility and durability -------------------------------------------------------------------


def test_rows_are_readable_after_each_flush_before_close(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=5)
    append_steps(writer, range(1, 13))
    writer.append_eval(12, 2.0)
    assert writer.n_steps == 12
    record = read_run(path)
    assert_rows(record, np.arange(1, 11))  # two automatic flushes; two rows and the eval still buffered
    assert len(record.eval_step) == 0
    writer.flush()
    record = read_run(path)
    assert_rows(record, np.arange(1, 13))
    np.testing.assert_array_equal(record.eval_step, [12])
    assert record.status == "running"


def test_set_status_writes_buffered_rows_and_onset_at_once(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=50)
    append_steps(writer, range(1, 3))
    writer.append_step(3, **row(3, flagged=True))  # type: ignore[arg-type]
    writer.set_status("running", onset_step=3, onset_layer=NAMES[-1])
    record = read_run(path)
    assert_rows(record, np.arange(1, 4), flagged_from=3)
    assert (record.nan_onset_step, record.nan_onset_layer) == (3, NAMES[-1])


_READER = """
import sys, h5py
with h5py.File(sys.argv[1], "r", locking=sys.argv[2] == "lock"):
    print("open", flush=True)
    sys.stdin.read()  # hold the file open until the test closes our stdin
"""


@contextmanager
def reader_holding(path: Path, *, locking: bool) -> Iterator[subprocess.Popen[str]]:
    """Another process with the file open (HDF5 refuses a second, writable open within one process)."""
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), "lock" if locking else "no-lock"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "open"
        yield reader
    finally:
        reader.kill()
        reader.wait()


def test_a_lock_free_reader_does_not_block_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=5)
    with reader_holding(path, locking=False):
        append_steps(writer, range(1, 6))  # flushes while the reader holds the file open
    assert_rows(read_run(path), np.arange(1, 6))


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 locking off")
def test_writer_waits_for_a_locking_reader_and_keeps_rows_it_could_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=100)
    append_steps(writer, range(1, 4))
    with reader_holding(path, locking=True) as reader:
        with monkeypatch.context() as patch:
            patch.setattr(store_layout, "_LOCK_TRIES", 2)
            patch.setattr(store_layout, "_LOCK_WAIT_S", 0.01)
            with pytest.raises(UserError, match="locked by another process") as raised:
                writer.flush()
        assert str(path) in str(raised.value)
        assert reader.stdin is not None
        reader.stdin.close()  # the reader lets go now; the default retries outlast that
        writer.flush()
    assert_rows(read_run(path), np.arange(1, 4))


# The child skips flowdiag/__init__.py, which imports torch (~3 s): a bare package object stands in for
# it, and the writer itself needs only h5py and numpy.
_KILLED_WRITER = """
import sys, time, types
from pathlib import Path
package = types.ModuleType("flowdiag")
package.__path__ = [str(Path(sys.argv[2]) / "flowdiag")]
sys.modules["flowdiag"] = package
import numpy as np
from flowdiag.record.store import RunWriter

writer = RunWriter(Path(sys.argv[1]), config_json="{}", version="test", layer_names=["a", "b"],
                   layer_kinds=["actnorm", "coupling"], flush_every=10)
step = 0
while True:
    step += 1
    writer.append_step(step, loss=float(step), bpd=1.0, penalty=0.0, grad_norm=1.0, lr=1e-3,
                       max_abs=np.array([step, step + 1.0]), logdet=np.zeros(2), nonfinite=np.zeros(2, bool))
    if writer.n_steps % 10 == 0:
        print("flushed", step, flush=True)
    time.sleep(0.02)
"""


def test_sigkill_leaves_a_readable_file_with_every_flushed_row(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path), str(REPO_ROOT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = 0
    try:
        assert child.stdout is not None and child.stderr is not None
        deadline = time.monotonic() + 60
        while seen < 30:
            # Read just after a flush: the next one is 10 sleeps away, so the read and the kill that
            # follows land between flushes, and every row read is still there. (tests/test_crash.py
            # kills inside flushes.)
            line = child.stdout.readline()
            assert line.startswith("flushed"), f"the writer stopped: {child.stderr.read()}"
            assert time.monotonic() < deadline, "the writer is too slow"
            seen = len(read_run(path).step)  # another process reading while the run goes on
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    record = read_run(path)
    rows = len(record.step)
    assert rows >= seen >= 30
    assert rows % 10 == 0
    np.testing.assert_array_equal(record.step, np.arange(1, rows + 1))
    np.testing.assert_array_equal(record.loss, np.arange(1, rows + 1))
    np.testing.assert_array_equal(record.max_abs[:, 1], np.arange(2, rows + 2))
    assert record.status == "running"


def test_reader_takes_the_common_prefix_of_a_half_finished_flush(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_writer(path) as writer:
        append_steps(writer, range(1, 11))
    with h5py.File(path, "r+") as f:  # as if a flush had grown some datasets and not yet the others
        f["steps/loss"].resize(15, axis=0)
        f["layers/max_abs"].resize(13, axis=0)
        f["eval/bpd"].resize(2, axis=0)
    record = read_run(path)
    assert_rows(record, np.arange(1, 11))
    assert len(record.eval_bpd) == len(record.eval_step) == 0


def test_rows_a_killed_flush_wrote_past_the_committed_count_are_not_read(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_writer(path) as writer:
        append_steps(writer, range(1, 11))
        writer.append_eval(10, 2.0)
    with h5py.File(path, "r+") as f:  # a flush killed after its rows but before it raised the counts
        for name in [*(n for n in f["steps"]), *("max_abs", "logdet", "nonfinite")]:
            dataset = f[f"steps/{name}"] if name in f["steps"] else f[f"layers/{name}"]
            dataset.resize(15, axis=0)  # the five rows a killed flush left: zeros, or anything
        for name in ("step", "bpd"):
            f[f"eval/{name}"].resize(3, axis=0)
    assert f"{read_run(path).step.tolist()}" == f"{list(range(1, 11))}"
    assert read_run(path).eval_step.tolist() == [10]
    # A resumed run writes over the uncounted rows, and counts its own.
    resumed = RunWriter.open_existing(path)
    append_steps(resumed, range(11, 13))
    resumed.close()
    assert_rows(read_run(path), np.arange(1, 13))


def test_an_init_counts_once_a_flush_finished_it_and_a_second_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    writer.write_init(["a", "b"], [0.0, 1.0], [2.0, 3.0], [0.5, 0.25], [64, 32])
    writer.write_init(["c"], [4.0], [5.0], [0.125], [16])
    record = read_run(path)
    assert record.init is not None and record.init["name"] == ["c"]
    assert record.init["log_scale_max"].tolist() == [5.0] and record.init["n_values"].tolist() == [16]
    with h5py.File(path, "r+") as f:  # a flush killed while it wrote the init: not counted yet
        f.attrs.modify("committed", [*f.attrs["committed"][:3], 0])
    assert read_run(path).init is None
    writer.close()


def test_a_file_from_before_the_counts_and_fixed_width_text_reads_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_writer(path) as writer:
        append_steps(writer, range(1, 6))
        writer.write_init(["a"], [0.0], [1.0], [0.5], [64])
    with h5py.File(path, "r+") as f:  # what flowdiag wrote before: variable-length text, no counts
        del f.attrs["committed"]
        for name in ("status", "phase", "nan_onset_layer", "reverse_onset_layer"):
            value = f.attrs[name].decode()
            del f.attrs[name]
            f.attrs[name] = value
    assert_rows(read_run(path), np.arange(1, 6))
    assert read_run(path).init is not None
    resumed = RunWriter.open_existing(path)
    append_steps(resumed, range(6, 7))
    resumed.append_step(7, **row(7, flagged=True))  # type: ignore[arg-type]
    resumed.set_status("diverged", onset_step=7, onset_layer=NAMES[-1])
    resumed.close()
    record = read_run(path)
    assert_rows(record, np.arange(1, 8), flagged_from=7)
    assert record.init is not None and record.init["name"] == ["a"]
    assert (record.status, record.nan_onset_step, record.nan_onset_layer) == ("diverged", 7, NAMES[-1])


def test_text_attributes_fit_the_longest_layer_name_and_change_in_place(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    names = ["a" * 100, "ünïcode.layer"]
    writer = RunWriter(
        path, config_json="{}", version="t", layer_names=names, layer_kinds=["actnorm", "coupling"]
    )
    with h5py.File(path, "r") as f:
        assert h5py.check_string_dtype(f.attrs.get_id("nan_onset_layer").dtype).length == 100
    writer.set_status("running", onset_step=1, onset_layer="")
    size = path.stat().st_size
    for onset in names:
        writer.set_status("diverged", onset_step=1, onset_layer=onset)
        assert read_run(path).nan_onset_layer == onset
    assert path.stat().st_size == size  # rewritten in place: nothing new allocated
    with h5py.File(path, "r") as f:
        assert h5py.check_string_dtype(f.attrs.get_id("nan_onset_layer").dtype).length == 100


# --- creating and failing ------------------------------------------------------------------------


def test_refuses_to_overwrite_and_leaves_the_old_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_writer(path) as writer:
        append_steps(writer, range(1, 8))
    before = path.read_bytes()
    with pytest.raises(UserError, match="already exists") as raised:
        make_writer(path)
    assert str(path) in str(raised.value)
    assert path.read_bytes() == before

    make_writer(path, overwrite=True).close()
    assert len(read_run(path).step) == 0


def test_creates_missing_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "run.h5"
    make_writer(path).close()
    assert is_run_file(path)


def test_unwritable_location_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    path = blocker / "runs" / "run.h5"
    with pytest.raises(UserError, match="--out") as raised:
        make_writer(path)
    assert str(path) in str(raised.value)


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "run.h5"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    return path


def _truncated(tmp_path: Path) -> Path:
    path = tmp_path / "run.h5"
    with make_writer(path) as writer:
        append_steps(writer, range(1, 201))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _plain_hdf5(tmp_path: Path) -> Path:
    path = tmp_path / "run.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.h5", "does not exist"),
        (lambda tmp: tmp, "is a folder"),
        (_corrupt, "not a readable HDF5 file"),
        (_truncated, "not a readable HDF5 file"),
        (_plain_hdf5, "not a flowdiag run"),
    ],
    ids=["missing", "folder", "random-bytes", "truncated", "not-a-run"],
)
def test_bad_files_raise_a_one_line_user_error(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(UserError, match=message) as raised:
        read_run(path)
    text = str(raised.value)
    assert str(path) in text
    assert "\n" not in text
    assert not is_run_file(path)


def test_resuming_a_truncated_file_is_a_user_error(tmp_path: Path) -> None:
    path = _truncated(tmp_path)
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        RunWriter.open_existing(path)
    with pytest.raises(UserError, match="does not exist"):
        RunWriter.open_existing(tmp_path / "nothing.h5")


def test_is_run_file(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    make_writer(path).close()
    assert is_run_file(path)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w"):
        pass
    assert not is_run_file(plain)
    assert not is_run_file(tmp_path / "missing.h5")


# --- resuming ------------------------------------------------------------------------------------


def test_truncate_after_drops_later_steps_evals_and_onset(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=8)
    for step in range(1, 101):
        writer.append_step(step, **row(step, flagged=step >= 90))  # type: ignore[arg-type]
        if step % 25 == 0:
            writer.append_eval(step, step / 10)
    writer.set_status("running", onset_step=90, onset_layer=NAMES[-1])
    writer.truncate_after(60)
    assert writer.n_steps == 60
    record = read_run(path)
    assert_rows(record, np.arange(1, 61))
    np.testing.assert_array_equal(record.eval_step, [25, 50])
    assert (record.nan_onset_step, record.nan_onset_layer) == (-1, "")

    append_steps(writer, range(61, 71))
    writer.close("completed")
    assert_rows(read_run(path), np.arange(1, 71))


def test_open_existing_continues_the_run(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=5)
    writer.write_init(["a"], [0.0], [1.0], [0.5], [64])
    append_steps(writer, range(1, 24))
    writer.append_eval(20, 1.25)
    writer.close("interrupted")

    resumed = RunWriter.open_existing(path, flush_every=4)
    assert resumed.n_steps == 23
    assert resumed.layer_names == NAMES
    assert resumed.status == "interrupted"
    resumed.truncate_after(20)  # the checkpoint was at step 20
    resumed.set_status("running")
    append_steps(resumed, range(21, 31))
    resumed.append_eval(30, 1.0)
    resumed.close("completed")

    record = read_run(path)
    assert_rows(record, np.arange(1, 31))
    np.testing.assert_array_equal(record.eval_step, [20, 30])
    assert record.status == "completed"
    assert record.config == RunConfig().to_dict()
    assert record.layer_kinds == KINDS
    assert record.init is not None and record.init["name"] == ["a"]


# --- lifecycle and validation --------------------------------------------------------------------


def test_context_manager_marks_a_crashed_run_failed(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="boom"), make_writer(path, flush_every=100) as writer:
        append_steps(writer, range(1, 4))
        raise RuntimeError("boom")
    record = read_run(path)
    assert record.status == "failed"
    assert_rows(record, np.arange(1, 4))  # the buffered rows were written on the way out


def test_context_manager_keeps_a_status_already_decided(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with pytest.raises(KeyboardInterrupt), make_writer(path) as writer:
        writer.set_status("interrupted")
        raise KeyboardInterrupt
    assert read_run(path).status == "interrupted"
    with make_writer(path, overwrite=True):
        pass
    assert read_run(path).status == "running"


def test_close_twice_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    append_steps(writer, range(1, 3))
    writer.close("completed")
    writer.close()
    assert read_run(path).status == "completed"
    assert len(read_run(path).step) == 2


def test_rejects_rows_and_names_of_the_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    bad = row(1) | {"logdet": np.zeros(N + 1)}
    with pytest.raises(ValueError, match="logdet"):
        writer.append_step(1, **bad)  # type: ignore[arg-type]
    assert writer.n_steps == 0
    with pytest.raises(ValueError, match="status"):
        writer.set_status("exploded")
    with pytest.raises(ValueError, match="n_values"):
        writer.write_init(["a", "b"], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1])
    with pytest.raises(ValueError, match="kinds"):
        RunWriter(tmp_path / "k.h5", config_json="{}", version="x", layer_names=["a"], layer_kinds=["conv"])
    with pytest.raises(ValueError, match="flush_every"):
        make_writer(tmp_path / "f.h5", flush_every=0)
    assert not (tmp_path / "k.h5").exists() and not (tmp_path / "f.h5").exists()
    with pytest.raises(ValueError, match="kind"):
        read_run(path).layer_index("squeeze")
    assert set(LAYER_KINDS) == {"actnorm", "invconv", "coupling", "split", "other"}
    with pytest.raises(ValueError, match="h·w"):
        make_writer(tmp_path / "p.h5", layer_pixels=[1])
    with pytest.raises(ValueError, match="phase"):
        writer.set_phase("warming up")


def test_flush_timer_makes_rows_readable_before_the_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]  # the writer's clock, moved by hand: no sleep
    monkeypatch.setattr(store_writer, "_monotonic", lambda: now[0])
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=1000, flush_seconds=0.2)
    append_steps(writer, range(1, 3))
    assert len(read_run(path).step) == 0  # the first rows came within the timer
    now[0] += 0.25
    append_steps(writer, range(3, 4))  # the timer has run out: this row flushes all three
    record = read_run(path)
    assert_rows(record, np.arange(1, 4))
    np.testing.assert_array_equal(record.wall_time, [0.0, 0.0, 0.25])


def test_phase_total_steps_and_geometry_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, total_steps=40)
    assert read_run(path).phase == "init"
    writer.set_phase("train")
    append_steps(writer, range(1, 3))
    writer.close("completed")
    record = read_run(path)
    assert (record.phase, record.total_steps, record.status) == ("train", 40, "completed")
    assert record.layer_pixels.tolist() == PIXELS
    resumed = RunWriter.open_existing(path, total_steps=60)
    append_steps(resumed, range(3, 4))
    resumed.close()
    record = read_run(path)
    assert record.total_steps == 60 and record.wall_time[2] >= record.wall_time[1]


def test_format_1_file_reads_with_unknown_geometry_and_clock(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    make_writer(path).close()
    append_steps(RunWriter.open_existing(path), range(1, 3))
    with h5py.File(path, "r+") as f:  # what flowdiag 0.1 wrote: no pixels, clock, phase or total
        f.attrs["format_version"] = 1
        for name in ("layers/pixels", "steps/wall_time"):
            del f[name]
        for name in ("phase", "total_steps"):
            del f.attrs[name]
    record = read_run(path)
    assert record.layer_pixels.tolist() == [-1] * N and np.isnan(record.wall_time).all()
    assert (record.phase, record.total_steps) == ("train", -1)
    with pytest.raises(UserError, match="older flowdiag"):
        RunWriter.open_existing(path)


def test_the_file_grows_by_the_row_size_per_step(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=64)
    append_steps(writer, range(1, 65))
    size_after_one_chunk = path.stat().st_size
    append_steps(writer, range(65, 129))
    row = store.bytes_per_step(path)
    # step, wall_time and the five scalars: 8 bytes; forwards: int32; max_abs, logdet: float32;
    # nonfinite and ran: bool
    assert row == 7 * 8 + 4 + N * (4 + 4 + 1 + 1)
    # Uncompressed: 64 more rows take exactly 64 rows' bytes, the chunk index already in place.
    assert path.stat().st_size - size_after_one_chunk == 64 * row


def test_a_huge_flush_every_reserves_a_small_buffer_and_grows_it(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path, flush_every=10**9)  # flushing on the timer alone
    assert writer._rows.step.nbytes <= 8 * 1024  # not 8 GB
    append_steps(writer, range(1, 3001))  # past the first buffer, grown twice
    assert len(writer._rows.step) == 4096 and writer.n_steps == 3000
    writer.close()
    assert_rows(read_run(path), np.arange(1, 3001))


# --- the public writer: blocks, the caller's clock, the onset check ------------------------------


def block_of(steps: range, flagged_from: int = 0) -> dict[str, np.ndarray]:
    """row() for many steps, as the arrays append_steps takes."""
    rows = [row(s, flagged_from > 0 and s >= flagged_from) for s in steps]
    return {name: np.array([r[name] for r in rows]) for name in rows[0]}


def test_a_block_append_writes_what_one_row_at_a_time_does(tmp_path: Path) -> None:
    by_row, by_block = tmp_path / "rows.h5", tmp_path / "block.h5"
    with make_writer(by_row, flush_every=7) as writer:
        append_steps(writer, range(1, 41))
    with make_writer(by_block) as writer:
        append_steps(writer, range(1, 4))  # buffered rows go first
        writer.append_steps(range(4, 41), **block_of(range(4, 41)))  # type: ignore[arg-type]
        assert writer.n_steps == 40
    a, b = read_run(by_row), read_run(by_block)
    assert_rows(b, np.arange(1, 41))
    for name in (
        "step",
        "loss",
        "bpd",
        "penalty",
        "grad_norm",
        "lr",
        "max_abs",
        "logdet",
        "nonfinite",
        "ran",
    ):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert b.forwards.tolist() == [1] * 40
    with pytest.raises(ValueError, match=r"max_abs has shape \(2, 4\); expected \(3, 4\)"):
        make_writer(tmp_path / "bad.h5").append_steps(
            [1, 2, 3],
            **(block_of(range(1, 4)) | {"max_abs": np.zeros((2, N))}),  # type: ignore[arg-type]
        )


def test_an_imported_run_keeps_its_own_clock_and_start(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    hours = np.arange(1, 11) * 7200.0  # a 20-hour run, imported in a moment
    with make_writer(path, start_time=1.6e9) as writer:
        writer.append_steps(range(1, 11), **block_of(range(1, 11)), wall_time=hours, forwards=np.full(10, 4))  # type: ignore[arg-type]
        writer.append_step(11, **row(11), wall_time=80_000.0)  # type: ignore[arg-type]
    record = read_run(path)
    np.testing.assert_array_equal(record.wall_time, [*hours, 80_000.0])
    assert record.start_time == 1.6e9 and record.forwards.tolist() == [4] * 10 + [1]
    before = time.time()
    made = make_writer(tmp_path / "now.h5")  # by default, the run starts when its file is made
    assert before <= read_run(made.path).start_time <= time.time()


@pytest.mark.parametrize(
    ("onset", "message"),
    [
        ((-1, ""), "flagged non-finite at step 5, but the onset says none"),
        ((7, NAMES[-1]), "flagged non-finite at step 5, but the onset says step 7"),
        ((5, NAMES[0]), f"names layer {NAMES[0]} at step 5, but that step's row does not flag it"),
        ((3, NAMES[-1]), f"names layer {NAMES[-1]} at step 3, but that step's row does not flag it"),
    ],
    ids=["flags-without-onset", "onset-after-the-first-flag", "wrong-layer", "unflagged-step"],
)
def test_an_onset_that_disagrees_with_the_flags_is_refused(
    tmp_path: Path, onset: tuple[int, str], message: str
) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    writer.append_steps(range(1, 9), **block_of(range(1, 9), flagged_from=5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message) as raised:
        writer.set_status("diverged", onset_step=onset[0], onset_layer=onset[1])
        writer.close()
    assert "\n" not in str(raised.value)
    assert read_run(path).status == "running"  # nothing written with the refused onset
    writer.set_status("diverged", onset_step=5, onset_layer=NAMES[-1])  # the first flag: accepted
    writer.close()
    assert (read_run(path).nan_onset_step, read_run(path).nan_onset_layer) == (5, NAMES[-1])


def test_a_resumed_run_keeps_the_onset_its_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = make_writer(path)
    writer.append_steps(range(1, 9), **block_of(range(1, 9), flagged_from=5))  # type: ignore[arg-type]
    writer.set_status("interrupted", onset_step=5, onset_layer=NAMES[-1])
    writer.close()
    resumed = RunWriter.open_existing(path)  # its rows before the resume are not this writer's to check
    append_steps(resumed, range(9, 12))
    resumed.set_status("diverged", onset_step=5, onset_layer=NAMES[-1])
    resumed.close()
    record = read_run(path)
    assert (record.status, record.nan_onset_step, len(record.step)) == ("diverged", 5, 11)


def test_an_onset_in_the_loss_needs_no_flag_and_a_dropped_row_is_not_checked(tmp_path: Path) -> None:
    writer = make_writer(tmp_path / "run.h5")
    append_steps(writer, range(1, 4))
    writer.set_status("running", onset_step=3, onset_layer="loss")  # every layer finite: fine
    writer.set_status("diverged", onset_step=3, onset_layer="loss")
    writer.close()
    other = make_writer(tmp_path / "other.h5")
    append_steps(other, range(1, 4))
    other.set_status("diverged", onset_step=9, onset_layer=NAMES[-1])  # its row was never written
    other.close()


def test_the_null_writer_has_the_writers_methods_and_no_others() -> None:
    public = {name for name in dir(RunWriter) if not name.startswith("_") and name != "open_existing"}
    assert public <= set(dir(store.NullWriter))
    null = store.NullWriter()
    null.append_step(1, loss=1.0)
    null.set_status("diverged", onset_step=1, onset_layer="x")
    assert null.n_steps == 0
    with pytest.raises(AttributeError):
        null.apend_step(1)  # type: ignore[attr-defined]  # misspelled: fails, as on the real writer
