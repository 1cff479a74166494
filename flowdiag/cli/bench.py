"""`flowdiag bench`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.cli.options import with_trainer_options
from flowdiag.config import RunConfig
from flowdiag.errors import UserError
from flowdiag.options import apply_options, parse_scalars


def _mib(n: int) -> str:
    # CPU: growth of peak RSS over the process's own start-up peak; 0 means it stayed below that.
    return "< start-up peak" if n <= 0 else f"{n / 2**20:.1f} MiB"


@with_trainer_options(as_lists=False)
@user_errors_exit_2
def bench_command(
    timed_steps: Annotated[int, typer.Option("--timed-steps", help="Steps per timing block.")] = 20,
    blocks: Annotated[int, typer.Option("--blocks", help="Off/on blocks, each in a fresh process.")] = 4,
    init_ms: Annotated[
        str, typer.Option("--init-ms", help="M values for the init cost, a comma list.")
    ] = "1,16,256",
    **options: Any,
) -> None:
    """Step time with diagnostics off/on, cumulative-init cost against M forward passes, HDF5 bytes/step."""
    from flowdiag.bench import run_bench  # torch: imported when the command runs

    if timed_steps < 1 or blocks < 1:
        raise UserError("--timed-steps and --blocks must be positive integers")
    try:
        ms = tuple(int(m) for m in init_ms.split(","))
    except ValueError:
        raise UserError(f"--init-ms: {init_ms!r} is not a comma list of integers") from None
    if any(m < 1 for m in ms):
        raise UserError("--init-ms: every M must be a positive integer")
    config = apply_options(RunConfig(), parse_scalars(options))
    result = run_bench(config, steps=timed_steps, blocks=blocks, init_ms=ms)
    t = result.steps
    console.print(
        f"device {result.device}, {result.n_parameters:,} parameters, batch {config.train.batch_size}"
    )
    steps_table = Table(title="step time (median)", header_style="bold")
    for column in ("diagnostics off", "diagnostics on", "overhead", "HDF5 bytes/step"):
        steps_table.add_column(column)
    steps_table.add_row(
        f"{t.median_off_s * 1e3:.2f} ms",
        f"{t.median_on_s * 1e3:.2f} ms",
        f"{t.overhead_percent:+.1f} %",
        f"{result.hdf5_bytes_per_step:.0f}",
    )
    console.print(steps_table)
    init_table = Table(title="cumulative ActNorm init vs M plain forward passes", header_style="bold")
    for column in ("M", "init", "M forwards", "ratio", "init peak mem", "forwards peak mem"):
        init_table.add_column(column)
    for cost in result.init:
        init_table.add_row(
            str(cost.m),
            f"{cost.init_s * 1e3:.1f} ms",
            f"{cost.forward_s * 1e3:.1f} ms",
            f"{cost.init_s / max(cost.forward_s, 1e-12):.2f}x",
            _mib(cost.init_peak_bytes),
            _mib(cost.forward_peak_bytes),
        )
    console.print(init_table)
