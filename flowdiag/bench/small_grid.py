"""The small grid: the main job, `flowdiag ablate --batch-size 1 --init-batches 1,16,256` at a reduced
step budget, run as a subprocess into a folder of its own, timed from start to exit."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from flowdiag.bench.results import GridTiming
from flowdiag.settings.config import DataConfig, ModelConfig, RunConfig, flag

MAIN_JOB_ARGS: tuple[str, ...] = ("--batch-size", "1", "--init-batches", "1,16,256")


@dataclass(frozen=True)
class GridJob:
    steps: int = 50
    args: tuple[str, ...] = MAIN_JOB_ARGS
    # The program to time; tests put a trivial one here.
    program: tuple[str, ...] = (sys.executable, "-m", "flowdiag", "ablate")

    def describe(self) -> str:
        return f"flowdiag ablate {' '.join(self.args)} --steps {self.steps}"

    def command(self, workers: int, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
        budget = ("--steps", str(self.steps), "--workers", str(workers), "--out", str(out))
        return [*self.program, *self.args, *extra, *budget]


def passthrough_args(config: RunConfig) -> tuple[str, ...]:
    """The bench's model, data and placement choices as `ablate` options: every model or data option
    set away from its default, and the device and thread count. The main job keeps its own batch
    size, M, steps and training settings."""
    args: list[str] = []
    for section, defaults in (("model", ModelConfig()), ("data", DataConfig())):
        for f in fields(defaults):
            value = getattr(getattr(config, section), f.name)
            if "help" not in f.metadata or value == getattr(defaults, f.name) or value is None:
                continue
            if isinstance(value, bool):
                args.append(flag(f) if value else f"--no-{flag(f)[2:]}")
            else:
                args += [flag(f), str(value)]
    return (*args, "--device", config.train.device, "--threads", str(config.train.threads))


def time_grid(
    job: GridJob, worker_counts: tuple[int, ...], workdir: Path, label: str, extra: tuple[str, ...] = ()
) -> GridTiming:
    """Wall time of the grid once per worker count, each run into a fresh folder."""
    wall: dict[int, float] = {}
    for workers in worker_counts:
        command = job.command(workers, workdir / f"grid-{label}-{workers}", extra)
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall[workers] = time.perf_counter() - began
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-2000:]
            raise RuntimeError(
                f"the bench's grid failed (exit {done.returncode}): {' '.join(command)}\n{tail}"
            )
    return GridTiming(job.describe(), wall)


def worker_counts(cores: int) -> tuple[int, ...]:
    """1 against N = cores workers (just 1 on one core)."""
    return tuple(sorted({1, max(1, cores)}))


def main_job(steps: int) -> GridJob:
    """The grid the bench times: the main job at `steps` steps per cell."""
    return GridJob(steps=steps)
