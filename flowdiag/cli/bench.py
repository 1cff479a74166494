"""`flowdiag bench`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from flowdiag.bench.parts import PARTS, BenchSettings, parse_parts
from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.cli.options import with_trainer_options
from flowdiag.cli.panels import help_panels
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig
from flowdiag.settings.options import apply_options, parse_scalars


def _positive_ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(m) for m in text.split(","))
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma list of integers, e.g. 1,16,256") from None
    if any(v < 1 for v in values):
        raise UserError(f"{flag}: every value must be a positive integer, e.g. 1,16,256")
    return values


@help_panels(
    Bench=("parts", "timed_steps", "blocks", "init_ms", "grid_steps", "startup_repeats", "nproc", "ddp_steps")
)
@with_trainer_options(as_lists=False)
@user_errors_exit_2
def bench_command(
    parts: Annotated[
        str, typer.Option("--parts", help=f"Parts to run, a comma list of {','.join(PARTS)}.")
    ] = "all",
    timed_steps: Annotated[int, typer.Option("--timed-steps", help="Steps per timing block.")] = 20,
    blocks: Annotated[
        int, typer.Option("--blocks", help="Rounds of timing blocks, each block in a fresh process.")
    ] = 4,
    init_ms: Annotated[
        str, typer.Option("--init-ms", help="M values for the init cost, a comma list.")
    ] = "1,16,256",
    grid_steps: Annotated[
        int,
        typer.Option("--grid-steps", help="--steps of the small grid (workers, competition); 0: no grid."),
    ] = 50,
    startup_repeats: Annotated[
        int, typer.Option("--startup-repeats", help="Worker start-ups timed per start method.")
    ] = 2,
    nproc: Annotated[
        int, typer.Option("--nproc", help="Ranks of the data-parallel part, against one process.")
    ] = 2,
    ddp_steps: Annotated[int, typer.Option("--ddp-steps", help="Steps of the data-parallel part.")] = 40,
    scale_steps: Annotated[
        int,
        typer.Option("--scale-steps", help="Steps of the scale part's synthetic run (880 MB at 288 layers)."),
    ] = 300_000,
    scale_layers: Annotated[
        int,
        typer.Option("--scale-layers", help="Recorded layers of the synthetic runs (Glow K=32, L=3: 288)."),
    ] = 288,
    scale_folder_runs: Annotated[
        int, typer.Option("--scale-folder-runs", help="Runs in the folder the scale part reports on.")
    ] = 4,
    scale_folder_steps: Annotated[
        int, typer.Option("--scale-folder-steps", help="Steps of each run of that folder.")
    ] = 20_000,
    **options: Any,
) -> None:
    """Step time without hooks, with hooks, with hooks + HDF5; init cost; worker start-up and 1 vs N
    workers; the same with a competing process; the Monitor on a normflows Glow; the inverse check's
    share of a run; N data-parallel ranks against one process at the same global batch; report, watch
    and export on a long synthetic run (scale: wall time and peak memory of each command)."""
    chosen = parse_parts(parts)
    ms = _positive_ints("--init-ms", init_ms)
    config = apply_options(RunConfig(), parse_scalars(options))
    scale = (scale_steps, scale_layers, scale_folder_runs, scale_folder_steps)
    settings = BenchSettings(
        chosen, timed_steps, blocks, ms, grid_steps, startup_repeats, nproc, ddp_steps, *scale
    )
    settings.check()
    # torch and the bench: imported once the arguments are known to be good.
    from flowdiag.bench.suite import run_bench
    from flowdiag.bench.tables import bench_tables, header

    result = run_bench(config, settings)
    console.print(header(result), highlight=False)
    for table in bench_tables(result):
        console.print(table)
