"""The rich tables `flowdiag bench` prints, one per part, from a BenchResult (no measuring here)."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from flowdiag.bench.results import (
    HOOKS_HDF5,
    MODES,
    NO_HOOKS,
    BenchResult,
    CommandCost,
    CompetitionResult,
    DataParallelResult,
    GridTiming,
    InitCost,
    InverseCost,
    LibraryOverhead,
    ScaleResult,
    StepTiming,
    SyncCheck,
    WorkersResult,
)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.2f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _mib(n: int) -> str:
    # CPU: growth of peak RSS over the process's own start-up peak; 0 means it stayed below that.
    return "< start-up peak" if n <= 0 else f"{n / 2**20:.1f} MiB"


def _table(title: str, *columns: str) -> tuple[str, Table]:
    table = Table(header_style="bold")
    for column in columns:
        table.add_column(column)
    return title, table


def _titled(title: str, table: Table) -> Group:
    # A line of its own above the table: as rich's table title it would wrap to the table's width.
    return Group(Text(title, style="bold"), table)


def header(result: BenchResult) -> str:
    if not result.n_parameters:  # the scale part alone: no model was built
        return "synthetic run files only (no model). Timings on a shared machine are noisy."
    thread = "thread" if result.threads == 1 else "threads"
    return (
        f"device {result.device}, {result.n_parameters:,} parameters, batch {result.batch_size}, "
        f"{result.threads} torch {thread} per process. Timings on a shared machine are noisy."
    )


def steps_table(steps: StepTiming) -> Group:
    n = len(steps.timing(NO_HOOKS).times_s)
    title, table = _table(
        f"trainer step (forward, backward, optimizer): {n} steps per mode; a fresh process per round",
        "mode",
        "median step",
        "overhead: median (range) of rounds",
        "mean step (with flushes)",
        "HDF5 bytes/step",
    )
    for mode in MODES:
        timing = steps.timing(mode)
        overhead = "-" if mode == NO_HOOKS else _overhead(steps, mode)
        hdf5 = f"{steps.hdf5_bytes_per_step:.0f}" if mode == HOOKS_HDF5 else "-"
        table.add_row(mode, _ms(timing.median_s), overhead, _ms(timing.mean_s), hdf5)
    return _titled(title, table)


def _overhead(steps: StepTiming, mode: str) -> str:
    paired = steps.round_overheads(mode)
    spread = f" ({min(paired):+.1f} to {max(paired):+.1f})" if len(paired) > 1 else ""
    return f"{steps.overhead_percent(mode):+.1f} %{spread}"


def sync_line(sync: SyncCheck) -> Text:
    text = f"CUDA sync check: {sync.note}"
    if sync.ran and len(sync.syncs) > 1:
        text += ": " + ", ".join(sync.syncs)
    return Text(text)


def init_table(costs: tuple[InitCost, ...]) -> Group:
    title, table = _table(
        "cumulative ActNorm init vs M plain forward passes",
        "M",
        "init",
        "M forwards",
        "ratio",
        "init peak mem",
        "forwards peak mem",
    )
    for cost in costs:
        table.add_row(
            str(cost.m),
            f"{cost.init_s * 1e3:.1f} ms",
            f"{cost.forward_s * 1e3:.1f} ms",
            f"{cost.init_s / max(cost.forward_s, 1e-12):.2f}x",
            _mib(cost.init_peak_bytes),
            _mib(cost.forward_peak_bytes),
        )
    return _titled(title, table)


def startup_table(workers: WorkersResult) -> Group:
    title, table = _table(
        "worker start-up: process start until ready to train (imports, data, first trainer)",
        "start method",
        "median",
        "runs",
        "flowdiag uses it",
    )
    for startup in workers.startup:
        table.add_row(
            startup.method,
            _s(startup.median_s),
            str(len(startup.times_s)),
            "yes" if startup.flowdiag_uses else "no",
        )
    return _titled(title, table)


def grid_table(grid: GridTiming) -> Group:
    title, table = _table(f"small grid, wall time: {grid.description}", "workers", "wall time", "speed-up")
    for workers, wall in sorted(grid.wall_s.items()):
        table.add_row(str(workers), _s(wall), f"{grid.speedup(workers):.2f}x")
    return _titled(title, table)


def competition_table(competition: CompetitionResult) -> Group:
    title, table = _table(
        "with one competing CPU-bound process, against idle", "work", "idle", "competing", "ratio"
    )
    table.add_row(
        f"train step ({HOOKS_HDF5}, median)",
        _ms(competition.step_idle_s),
        _ms(competition.step_competing_s),
        f"{competition.step_ratio:.2f}x",
    )
    if competition.grid_idle is not None and competition.grid_competing is not None:
        for workers in sorted(competition.grid_competing.wall_s):
            table.add_row(
                f"small grid, {workers} worker{'s' if workers > 1 else ''}",
                _s(competition.grid_idle.wall_s[workers]),
                _s(competition.grid_competing.wall_s[workers]),
                f"{competition.grid_ratio(workers):.2f}x",
            )
    return _titled(title, table)


def library_table(
    library: LibraryOverhead, steps: StepTiming | None, foreign: LibraryOverhead | None = None
) -> Group:
    title, table = _table(
        "Monitor overhead on a training step (median)",
        "model",
        "recorded layers",
        "without Monitor",
        "with Monitor",
        "overhead",
    )
    if library.available:
        table.add_row(
            library.model,
            str(library.n_layers),
            _ms(library.off_s),
            _ms(library.on_s),
            f"{library.overhead_percent:+.1f} %",
        )
    else:
        table.add_row(library.model, "-", "-", "-", Text(library.note))  # Text: [libs] is no markup
    if foreign is not None:
        table.add_row(
            foreign.model,
            str(foreign.n_layers),
            _ms(foreign.off_s),
            _ms(foreign.on_s),
            f"{foreign.overhead_percent:+.1f} %",
        )
    if steps is not None:
        table.add_row(
            f"flowdiag Glow ({NO_HOOKS} vs {HOOKS_HDF5})",
            "-",
            _ms(steps.timing(NO_HOOKS).median_s),
            _ms(steps.timing(HOOKS_HDF5).median_s),
            f"{steps.overhead_percent(HOOKS_HDF5):+.1f} %",
        )
    else:
        table.add_row("flowdiag Glow", "-", "-", "-", "run with --parts steps,library")
    return _titled(title, table)


def inverse_table(cost: InverseCost) -> Group:
    title, table = _table(
        "the inverse check at every evaluation (16 samples, one reconstruction, every conv's SVD)",
        "check",
        "training step",
        "--eval-every",
        "share of the run",
    )
    table.add_row(_ms(cost.check_s), _ms(cost.step_s), str(cost.eval_every), f"{cost.percent_of_run:.2f} %")
    return _titled(title, table)


def data_parallel_table(ddp: DataParallelResult) -> Group:
    where = f"{ddp.gpus} GPU(s)" if ddp.gpus else "CPU cores shared by the ranks"
    title, table = _table(
        f"data parallel at global batch {ddp.global_batch}, {ddp.steps} steps ({where})",
        "processes",
        "wall time",
        "steps/s",
        "speed-up",
    )
    table.add_row("1", _s(ddp.single_s), f"{ddp.steps / ddp.single_s:.2f}", "1.00x")
    table.add_row(str(ddp.nproc), _s(ddp.ranks_s), f"{ddp.steps / ddp.ranks_s:.2f}", f"{ddp.speedup:.2f}x")
    return _titled(title, table)


# Issue 19's goals, for a run of 300,000 steps × 288 layers and a folder of 4 runs of 20,000 steps.
SCALE_GOALS = {
    "report": "≤ 10 s, ≤ 1 GB",
    "watch --once": "≤ 0.5 s over --help, ≤ 300 MB",
    "export": "≤ 60 s, ≤ 200 MB of events",
    "folder": "≤ 15 s, ≤ 400 MB",
    "short": "≤ 3 s",
}


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def _cost_row(table: Table, cost: CommandCost, goal: str, note: str = "") -> None:
    table.add_row(cost.command, _s(cost.wall_s), _s(cost.cpu_s), _mb(cost.peak_rss_bytes), note, goal)


def scale_table(scale: ScaleResult) -> Group:
    w = scale.written
    title, table = _table(
        f"a synthetic run of {w.steps:,} steps × {w.layers} layers ({_mb(w.file_bytes)}, "
        f"{w.bytes_per_step:,.0f} bytes/step); each command a child process",
        "command",
        "wall time",
        "CPU time",
        "peak RSS",
        "note",
        "goal at 300,000 × 288",
    )
    _cost_row(table, scale.startup, "", "start-up of every command")
    _cost_row(table, scale.report, SCALE_GOALS["report"])
    over = scale.watch.wall_s - scale.startup.wall_s
    _cost_row(table, scale.watch, SCALE_GOALS["watch --once"], f"{over:+.2f} s over --help")
    _cost_row(table, scale.export, SCALE_GOALS["export"], f"{_mb(scale.export_bytes)} of events")
    folder = f"{scale.folder_runs} runs of {scale.folder_steps:,} steps"
    _cost_row(table, scale.folder_report, SCALE_GOALS["folder"], folder)
    _cost_row(table, scale.short_report, SCALE_GOALS["short"], f"one run of {scale.folder_steps:,} steps")
    writes = (
        f"writing it: {w.block_s / w.steps * 1e6:.1f} µs a step through append_steps (blocks of rows), "
        f"{w.row_s * 1e6:.1f} µs through append_step (a row a call, a flush every 50)"
    )
    return Group(_titled(title, table), Text(writes))


def bench_tables(result: BenchResult) -> list[RenderableType]:
    """What `flowdiag bench` prints after its header line, in part order: each table after its title."""
    out: list[RenderableType] = []
    if result.steps is not None:
        out.append(steps_table(result.steps))
    if result.sync is not None:
        out.append(sync_line(result.sync))
    if result.init:
        out.append(init_table(result.init))
    if result.workers is not None:
        out.append(startup_table(result.workers))
        if result.workers.grid is not None:
            out.append(grid_table(result.workers.grid))
    if result.competition is not None:
        out.append(competition_table(result.competition))
    if result.library is not None:
        out.append(library_table(result.library, result.steps, result.foreign))
    if result.inverse is not None:
        out.append(inverse_table(result.inverse))
    if result.data_parallel is not None:
        out.append(data_parallel_table(result.data_parallel))
    if result.scale is not None:
        out.append(scale_table(result.scale))
    return out
