"""A full disk, or any write error during a flush, loses nothing: the flush is a one-line UserError naming
the file and the fix, the file holds exactly the rows its counts say (watch, report and a resume read a
consistent run), nothing is left behind, and once space is back the same writer writes the rest."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowdiag.record.store import InverseRow, RunWriter, inverse_rows, read_run
from flowdiag.record.store import create as store_create
from flowdiag.record.store import writer as store_writer
from flowdiag.report.digest import digest_run
from flowdiag.report.watch import read_tail
from flowdiag.runtime.errors import UserError

NAMES = [f"l{i}" for i in range(6)]
KINDS = ["actnorm", "invconv", "coupling"] * 2
STEPS = 12


def row(step: int) -> dict[str, Any]:
    values = np.arange(len(NAMES)) + step / 8
    return {
        "loss": float(step), "bpd": step + 0.5, "penalty": 0.0, "grad_norm": 1.0, "lr": 1e-3,
        "max_abs": values.astype(np.float32), "logdet": -values, "nonfinite": np.zeros(len(NAMES), bool),
    }  # fmt: skip


def assert_exact_prefix(path: Path) -> int:
    """The file reads, and every row it holds is the row written, from step 1 on: returns the rows."""
    record = read_run(path)
    steps = np.arange(1, len(record.step) + 1)
    np.testing.assert_array_equal(record.step, steps)
    np.testing.assert_array_equal(record.loss, steps)
    np.testing.assert_array_equal(record.max_abs, np.arange(len(NAMES)) + steps[:, None] / 8)
    np.testing.assert_array_equal(record.eval_step, np.arange(1, len(record.eval_step) + 1) * 5)
    return len(steps)


def scenario(writer: RunWriter) -> Iterator[Callable[[], None]]:
    """What a run writes, one call at a time: init, rows (a flush every 5), evaluations, inverse checks,
    status changes, the end."""
    yield lambda: writer.write_init(["l0", "l3"], [0.0, 0.1], [1.0, 1.1], [0.5, 0.6], [64, 64])
    yield lambda: writer.set_phase("train")
    for step in range(1, STEPS + 1):
        yield lambda step=step: writer.append_step(step, **row(step))
        if step % 5 == 0:
            yield lambda step=step: writer.append_eval(step, 2.0)
            check = InverseRow(
                step, np.ones(6, np.float32), np.zeros(6, bool), 0.1, 0.0, np.ones(2), np.ones(2)
            )
            yield lambda check=check: writer.append_inverse(check, (-1, ""))
    yield lambda: writer.set_status("running")
    yield lambda: writer.close("completed")


class Failing:
    """Stands in for one write point: its `at`-th call raises OSError(ENOSPC), the others pass through."""

    def __init__(self, original: Callable[..., Any], at: int) -> None:
        self.original, self.at, self.calls, self.armed = original, at, 0, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.armed and self.calls == self.at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.original(*args, **kwargs)


# Every place the writer touches the disk: claiming room, opening, each dataset write (rows, evals,
# inverse rows), having HDF5 write out, each attribute change (counts, status, onset, phase).
WRITE_POINTS = [
    (store_writer, "_reserve"),
    (store_writer, "_open_for_append"),
    (store_writer, "_append"),
    (store_writer, "_flush_file"),
    (store_writer, "_update"),
    (inverse_rows, "_append"),
    (inverse_rows, "_update"),
]


@pytest.mark.parametrize(
    ("module", "point"), WRITE_POINTS, ids=[f"{m.__name__.rsplit('.', 1)[1]}.{p}" for m, p in WRITE_POINTS]
)
def test_a_write_error_at_any_point_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: Any, point: str
) -> None:
    original = getattr(module, point)
    at = 1
    # The 1st, 2nd, ... call of this point fails (every call of the first flush, every third after),
    # until the scenario makes no such call.
    while True:
        path = tmp_path / f"{point}-{at}" / "run.h5"
        writer = RunWriter(
            path, config_json="{}", version="t", layer_names=NAMES, layer_kinds=KINDS, flush_every=5
        )
        failing = Failing(original, at)
        monkeypatch.setattr(module, point, failing)
        failed = False
        for call in scenario(writer):
            try:
                call()
            except UserError as error:
                failed = True
                message = str(error)
                assert "\n" not in message and str(path) in message and "No space left on device" in message
                assert "free space" in message
                rows = assert_exact_prefix(path)  # what watch, report and a resume see: consistent
                assert f"the steps up to {rows}," in message if rows else "no step yet" in message
                failing.armed = False  # space is back: the same writer writes what it still holds
                writer.flush()
        monkeypatch.setattr(module, point, original)
        if not failed:
            assert failing.calls < at  # the scenario is done with this point
            break
        assert assert_exact_prefix(path) == STEPS, f"call {at} of {point}"
        record = read_run(path)
        assert record.status == "completed" and record.init is not None
        assert record.inverse.step.tolist() == [5, 10]
        assert sorted(p.name for p in path.parent.iterdir()) == ["run.h5"]  # nothing left behind
        at += 1 if at < 16 else 3
    assert at > 1, f"{point} was never called"


def test_a_full_disk_when_the_file_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_create, "_reserve", Failing(store_create._reserve, 1))
    path = tmp_path / "run" / "run.h5"
    with pytest.raises(UserError, match="No space left on device") as raised:
        RunWriter(path, config_json="{}", version="t", layer_names=NAMES, layer_kinds=KINDS)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert list(path.parent.iterdir()) == []  # no run file, no hidden partial


# Runs in a child: a failure HDF5 itself met could crash the process, which must not take pytest down.
_FILL_THE_DISK = """
import json, sys
from pathlib import Path
import numpy as np
from flowdiag.record.store import RunWriter
from flowdiag.runtime.errors import UserError

folder = Path(sys.argv[1])
ballast = folder / "ballast"
ballast.write_bytes(b"x" * 100_000)  # what the user deletes to free space
names = [f"l{i}" for i in range(20)]
writer = RunWriter(folder / "run.h5", config_json="{}", version="t", layer_names=names,
                   layer_kinds=["actnorm"] * 20, flush_every=50, flush_seconds=3600)
error, step = None, 0
while error is None and step < 100_000:
    step += 1
    try:
        writer.append_step(step, loss=step, bpd=1.0, penalty=0.0, grad_norm=1.0, lr=1e-3,
                           max_abs=np.full(20, step, np.float32), logdet=np.zeros(20),
                           nonfinite=np.zeros(20, bool))
    except UserError as e:
        error = str(e)
print(json.dumps({"error": error, "appended": step}), flush=True)
sys.stdin.readline()  # the test reads the file now, as watch or report would
ballast.unlink()
writer.flush()  # the rows it still holds
writer.close("interrupted")
print("done", flush=True)
"""


@contextmanager
def small_disk(folder: Path) -> Iterator[Path]:
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk_loses_nothing_and_the_run_goes_on_once_space_is_back(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        child = subprocess.Popen(
            [sys.executable, "-c", _FILL_THE_DISK, str(disk)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        told = json.loads(child.stdout.readline() or "{}")
        error = told.get("error")
        assert error is not None, child.stderr.read() if child.stderr else ""
        path = disk / "run.h5"
        assert "\n" not in error and str(path) in error and "No space left on device" in error
        rows = assert_exact_prefix_of_steps(path)
        assert rows % 50 == 0 and f"the steps up to {rows}," in error  # whole flushes, as counted
        assert read_tail(path).head.last_step == rows and digest_run(path).head.n_rows == rows
        assert sorted(p.name for p in disk.iterdir()) == ["ballast", "run.h5"]
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        assert child.wait(timeout=60) == 0  # no segfault, no error on the way out
        record = read_run(path)
        np.testing.assert_array_equal(record.step, np.arange(1, told["appended"] + 1))
        assert record.status == "interrupted"
        resumed = RunWriter.open_existing(path)  # --resume once space is back
        assert resumed.n_steps == told["appended"]
        resumed.close()


def assert_exact_prefix_of_steps(path: Path) -> int:
    record = read_run(path)
    steps = np.arange(1, len(record.step) + 1)
    np.testing.assert_array_equal(record.step, steps)
    np.testing.assert_array_equal(record.max_abs[:, 0], steps.astype(np.float32))
    return len(steps)
