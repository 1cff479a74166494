"""Bad input fails at once: one line, exit 2, and torch not yet imported when the line is printed.

Each case runs the console script's entry in a fresh process; an exit handler reports whether torch
had been imported by then. Importing torch is what made a typo cost seconds, so its absence is the
property (no wall time is asserted: timings belong in `flowdiag bench`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# The console script's entry, with a report of torch at exit (after the error line was printed).
LAUNCHER = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
sys.argv[0] = "flowdiag"
from flowdiag.cli import run
run()
"""


def _run(args: list[str], cwd: Path) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """A run folder that holds a run file, one that holds a run file but no checkpoint, a plain file."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "run.h5").write_bytes(b"not read: its existence is the point")
    (tmp_path / "a_file").write_text("not a folder")
    return {"taken": taken, "file": tmp_path / "a_file", "tmp": tmp_path}


CASES = [
    (["train", "--batch-size", "-1"], "--batch-size -1: must be at least 1"),
    (["train", "--batch-size", "abc"], "--batch-size: 'abc' is not a valid int"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lam", "-1"], "--lam -1.0: must be at least 0"),
    (["train", "--coupling", "spline"], "--coupling: 'spline' is not one of additive, affine"),
    (["train", "--dataset", "imagenet"], "--dataset"),
    (
        ["train", "--dataset", "mnist", "--data-root", "/nonexistent/mnist"],
        "/nonexistent/mnist does not exist",
    ),
    (["train", "--dataset", "cifar10"], "no data root given; pass --data-root"),
    (["train", "--levels", "4"], "not divisible by 2^L = 16"),
    (["train", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["train", "--held-out", "1.5"], "[0, 1)"),
    (["train", "--out", "{taken}"], "already exists: pass --resume"),
    (["train", "--out", "{file}/run"], "cannot create output folder"),
    (["train", "--nope"], "No such option: --nope"),
    (["audit", "--model", "nodots"], "is not package.module:factory"),
    (["audit", "--model", "no_such_module_here:build"], "cannot import 'no_such_module_here'"),
    (["audit", "--model", "x:y", "--batch-size", "0"], "--batch-size and --init-batches"),
    (["audit", "--model", "x:y", "--adapter", "nope"], "unknown adapter 'nope'"),
    (["audit", "--model", "x:y", "--dataset", "npz"], "no data root given"),
    (["bench", "--init-ms", "1,x"], "--init-ms"),
    (["bench", "--parts", "steps,speed"], "unknown part 'speed'"),
    (["bench", "--steps", "0"], "--steps 0: must be at least 1"),
    (["bench", "--timed-steps", "0"], "--timed-steps"),
    (["bench", "--parts", "scale", "--scale-layers", "2"], "--scale-layers at least 3"),
    (["replay", "{tmp}/nothing-here"], "no replay bundle in"),
    (["nope"], "No such command 'nope'"),
    (["--nope"], "No such option: --nope"),
]


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[" ".join(args) for args, _ in CASES])
def test_bad_input_is_one_line_before_torch(folders: dict[str, Path], args: list[str], needle: str) -> None:
    args = [arg.format(**folders) for arg in args]
    code, lines = _run(args, cwd=folders["tmp"])
    assert code == 2, lines
    assert len(lines) == 2 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert lines[1] == "torch imported: False", lines


def test_a_good_command_does_import_torch(tmp_path: Path) -> None:
    """The probe is real: the same launcher sees torch once a command gets as far as training."""
    code, lines = _run(
        ["train", "--steps", "1", "--eval-every", "0", "--out", str(tmp_path / "run")], tmp_path
    )
    assert code == 0 and lines[-1] == "torch imported: True", lines
