"""`flowdiag bench --parts scale`: what reading a long run costs. A synthetic run of a given size (the
paper's Glow: 3 levels, K = 32, 288 recorded layers, 300,000 steps by default) is written through the
public writer's block append; then `report`, `watch --once` and `export --tensorboard` run on it as
commands, each in a child process whose wall time and peak RSS (`os.wait4`'s rusage) are measured; then
`report` on a folder of shorter runs, and on one of them alone. Nothing here is asserted: the numbers
are for the README's table and for anyone checking them on their own machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flowdiag.bench.results import CommandCost, ScaleResult, WriteCost
from flowdiag.record.store import RunWriter
from flowdiag.runtime.files import RUN_FILE
from flowdiag.runtime.version import __version__

LEVELS = 3
KINDS = ("actnorm", "invconv", "coupling")
BLOCK_ROWS = 10_000  # rows per append_steps call: 29 MB of 288 layers
EVAL_EVERY = 1000
ROW_SAMPLE = 5_000  # rows timed through append_step, one call a row (the Monitor's path)


def layer_layout(n_layers: int) -> tuple[list[str], list[str], list[int]]:
    """Glow-like names, kinds and h·w: three levels (16x16, 8x8, 4x4), each a run of steps of
    actnorm, invconv, coupling."""
    per_level = math.ceil(n_layers / LEVELS)
    names, kinds, pixels = [], [], []
    for i in range(n_layers):
        level, j = divmod(i, per_level)
        kind = KINDS[j % len(KINDS)]
        names.append(f"levels.{level}.steps.{j // len(KINDS)}.{kind}")
        kinds.append(kind)
        pixels.append((16 >> level) ** 2)
    return names, kinds, pixels


def onset_of(n_steps: int) -> tuple[int, int]:
    """(spike step, onset step) of a synthetic run: 150,001 and 287,123 of 300,000 steps (the same
    fractions of a shorter run), so neither falls on a bucket's edge."""
    return n_steps // 2 + 1, max(2, n_steps * 287_123 // 300_000)


def _block(first: int, rows: int, names: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows `first`.. of a slowly improving run: bpd falls, outputs wander in log space."""
    n = len(names)
    steps = np.arange(first, first + rows, dtype=np.int64)
    level = np.array([int(name.split(".")[1]) for name in names])
    log_peak = 0.5 + 0.3 * level + 0.2 * rng.standard_normal((rows, n))
    logdet = np.where(
        np.array([name.endswith("invconv") for name in names]), 0.05 * rng.standard_normal((rows, n)), 0.0
    )
    bpd = 1.2 + 2.0 / np.sqrt(steps) + 0.01 * rng.standard_normal(rows)
    return {
        "step": steps,
        "loss": bpd * 0.69,
        "bpd": bpd,
        "penalty": (logdet**2).sum(axis=1),
        "grad_norm": 1.0 + 0.1 * rng.standard_normal(rows),
        "lr": np.full(rows, 1e-3),
        "max_abs": np.exp(log_peak).astype(np.float32),
        "logdet": logdet.astype(np.float32),
        "nonfinite": np.zeros((rows, n), bool),
        "wall_time": steps * 0.25,  # a 4 steps/s run: 300,000 steps are 20.8 hours
    }


def write_synthetic_run(path: Path, n_steps: int, n_layers: int, *, seed: int = 0) -> WriteCost:
    """A run of `n_steps` × `n_layers` through RunWriter.append_steps, with a one-step spike in the
    last coupling and a NaN onset in the first coupling of the last level (see `onset_of`)."""
    names, kinds, pixels = layer_layout(n_layers)
    spike, onset = onset_of(n_steps)
    onset_layer = next(i for i, name in enumerate(names) if name.startswith(f"levels.{LEVELS - 1}.") and
                       name.endswith("coupling"))  # fmt: skip
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    writer = RunWriter(
        path, config_json="{}", version=__version__, layer_names=names, layer_kinds=kinds,
        layer_pixels=pixels, total_steps=n_steps, start_time=1.7e9,
    )  # fmt: skip
    writer.set_phase("train")
    for first in range(1, n_steps + 1, BLOCK_ROWS):
        rows = _block(first, min(BLOCK_ROWS, n_steps + 1 - first), names, rng)
        for step, layer, value in ((spike, len(names) - 1, 1e6), (onset, onset_layer, np.nan)):
            if first <= step < first + len(rows["step"]):
                rows["max_abs"][step - first, layer] = value
                rows["nonfinite"][step - first, layer] = not np.isfinite(value)
                rows["bpd"][step - first] = 50.0 if np.isfinite(value) else np.nan
        writer.append_steps(**rows)
        for step in range(first + (-first % EVAL_EVERY), first + len(rows["step"]), EVAL_EVERY):
            writer.append_eval(step, 1.3 + 1.0 / math.sqrt(step))
        if first <= onset < first + len(rows["step"]):
            writer.set_status("running", onset_step=onset, onset_layer=names[onset_layer])
    writer.close("diverged")
    seconds = time.perf_counter() - started
    row_s = _row_seconds(path, names, kinds, min(ROW_SAMPLE, n_steps))
    return WriteCost(n_steps, n_layers, path.stat().st_size, seconds, row_s)


def _row_seconds(path: Path, names: list[str], kinds: list[str], n_rows: int) -> float:
    """Seconds per row through append_step (one call a row, a flush every 50), in a file beside `path`."""
    rng = np.random.default_rng(1)
    rows = _block(1, n_rows, names, rng)
    sample = path.with_name("row-sample.h5")
    writer = RunWriter(sample, config_json="{}", version=__version__, layer_names=names, layer_kinds=kinds)
    started = time.perf_counter()
    for i in range(n_rows):
        writer.append_step(
            int(rows["step"][i]), loss=float(rows["loss"][i]), bpd=float(rows["bpd"][i]),
            penalty=float(rows["penalty"][i]), grad_norm=float(rows["grad_norm"][i]), lr=1e-3,
            max_abs=rows["max_abs"][i], logdet=rows["logdet"][i], nonfinite=rows["nonfinite"][i],
        )  # fmt: skip
    writer.close()
    seconds = (time.perf_counter() - started) / n_rows
    sample.unlink()
    return seconds


# Linux carries a process's peak RSS across fork and exec: a command started from this process (torch
# loaded, 570 MB) would report at least that. A small Python in between starts the command and reads
# its rusage (`os.wait4`), so the peak is the command's own.
_TIMER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=sys.stderr)
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - started
cpu = usage.ru_utime + usage.ru_stime
print(json.dumps([os.waitstatus_to_exitcode(status), wall, cpu, usage.ru_maxrss * 1024]))
"""


def time_command(name: str, args: list[str], cwd: Path) -> CommandCost:
    """`python -m flowdiag ARGS` in a child: its wall time, CPU time (what a shared machine's load does
    not inflate) and peak RSS (ru_maxrss is kB on Linux)."""
    command = [sys.executable, "-c", _TIMER, sys.executable, "-m", "flowdiag", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    try:
        code, wall, cpu, peak = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        code, wall, cpu, peak = done.returncode or 1, math.nan, math.nan, 0
    if code != 0:
        raise RuntimeError(f"flowdiag {' '.join(args)} failed ({code}): {done.stderr.strip()[-500:]}")
    return CommandCost(name, float(wall), float(cpu), int(peak))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure_scale(steps: int, layers: int, folder_runs: int, folder_steps: int, work: Path) -> ScaleResult:
    """Write the runs, time the commands, and delete the runs (the long one is 880 MB at full size)."""
    run_dir = work / "scale-run"
    written = write_synthetic_run(run_dir / RUN_FILE, steps, layers)
    startup = time_command("flowdiag --help", ["--help"], work)
    report = time_command("report", ["report", str(run_dir), "--out", str(work / "report")], work)
    watch = time_command("watch --once", ["watch", "--once", str(run_dir)], work)
    export = time_command("export", ["export", str(run_dir), "--tensorboard", str(work / "tb")], work)
    events = _folder_bytes(work / "tb")
    (run_dir / RUN_FILE).unlink()
    folder = work / "folder"
    for i in range(folder_runs):
        write_synthetic_run(folder / "runs" / f"run{i}" / RUN_FILE, folder_steps, layers, seed=i)
    many = time_command(
        f"report, {folder_runs} runs", ["report", str(folder), "--out", str(work / "r2")], work
    )
    one = time_command(
        "report, 1 run", ["report", str(folder / "runs" / "run0"), "--out", str(work / "r3")], work
    )
    return ScaleResult(written, startup, report, watch, export, events, folder_runs, folder_steps, many, one)
