"""What each part of `flowdiag bench` measured: plain dataclasses, free of torch, for the tables and
the tests."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

# The three ways of running flowdiag's trainer step (`flowdiag.bench.steps`).
NO_HOOKS = "no hooks"
HOOKS = "hooks"
HOOKS_HDF5 = "hooks + HDF5"
MODES: tuple[str, ...] = (NO_HOOKS, HOOKS, HOOKS_HDF5)


def overhead_percent(base_s: float, other_s: float) -> float:
    return 100.0 * (other_s - base_s) / base_s if base_s > 0 else math.nan


@dataclass(frozen=True)
class ModeTiming:
    mode: str
    times_s: tuple[float, ...]  # every timed step of every block of this mode
    round_medians_s: tuple[float, ...] = ()  # the median step of each round, in round order

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def mean_s(self) -> float:
        """Includes the steps that flushed to HDF5, which the median leaves out."""
        return statistics.fmean(self.times_s)


@dataclass(frozen=True)
class StepTiming:
    modes: tuple[ModeTiming, ...]
    hdf5_bytes_per_step: float  # one step's row in run.h5 (store.bytes_per_step); NaN without HDF5

    def timing(self, mode: str) -> ModeTiming:
        return next(m for m in self.modes if m.mode == mode)

    def round_overheads(self, mode: str) -> list[float]:
        """`mode` against no hooks within each round, in %: one process, one trainer, so what differs
        between processes (±15 % here) cancels out."""
        base, other = self.timing(NO_HOOKS).round_medians_s, self.timing(mode).round_medians_s
        return [overhead_percent(b, o) for b, o in zip(base, other, strict=True)]

    def overhead_percent(self, mode: str) -> float:
        """The median over rounds of `mode` against no hooks in the same round, in %."""
        paired = self.round_overheads(mode)
        if paired:
            return statistics.median(paired)
        return overhead_percent(self.timing(NO_HOOKS).median_s, self.timing(mode).median_s)


@dataclass(frozen=True)
class SyncCheck:
    """Host-device syncs in one recorded training step on CUDA (`torch.cuda.set_sync_debug_mode`)."""

    ran: bool
    note: str  # why it did not run, or what it found
    syncs: tuple[str, ...] = ()  # where each sync happened, "file:line"

    @property
    def no_per_layer_sync(self) -> bool:
        # One sync in the whole step cannot be per layer: it is the Monitor's copy of the packed row.
        return self.ran and len(self.syncs) <= 1


@dataclass(frozen=True)
class InitCost:
    m: int
    init_s: float
    forward_s: float  # M plain no-grad forward passes
    init_peak_bytes: int  # CUDA: max allocated; CPU: growth of the process's peak RSS
    forward_peak_bytes: int


@dataclass(frozen=True)
class WorkerStartup:
    method: str  # multiprocessing start method
    times_s: tuple[float, ...]  # process start -> first trainer constructed, one per repeat
    flowdiag_uses: bool  # the method `flowdiag.environment.process_context()` picks here

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


@dataclass(frozen=True)
class GridTiming:
    """Wall time of the small grid (`flowdiag ablate` as a subprocess) per number of workers."""

    description: str
    wall_s: dict[int, float] = field(default_factory=dict)

    def speedup(self, workers: int) -> float:
        return self.wall_s[1] / self.wall_s[workers]


@dataclass(frozen=True)
class WorkersResult:
    startup: tuple[WorkerStartup, ...]
    grid: GridTiming | None  # None when the grid was not run (--grid-steps 0)


@dataclass(frozen=True)
class CompetitionResult:
    """The same work idle and with one competing CPU-bound process, as ratios competing / idle."""

    step_idle_s: float  # median step, hooks + HDF5
    step_competing_s: float
    grid_idle: GridTiming | None
    grid_competing: GridTiming | None

    @property
    def step_ratio(self) -> float:
        return self.step_competing_s / self.step_idle_s

    def grid_ratio(self, workers: int) -> float:
        assert self.grid_idle is not None and self.grid_competing is not None
        return self.grid_competing.wall_s[workers] / self.grid_idle.wall_s[workers]


@dataclass(frozen=True)
class LibraryOverhead:
    """Median training step of a library's flow without and with `flowdiag.Monitor` attached."""

    model: str
    available: bool
    note: str = ""  # why it did not run (the library is not installed)
    n_layers: int = 0  # flow layers the Monitor records
    off_s: float = math.nan
    on_s: float = math.nan

    @property
    def overhead_percent(self) -> float:
        return overhead_percent(self.off_s, self.on_s)


@dataclass(frozen=True)
class InverseCost:
    """One evaluation's inverse check against the training steps between two evaluations."""

    step_s: float  # median training step (hooks + HDF5)
    check_s: float  # median inverse check
    eval_every: int

    @property
    def percent_of_run(self) -> float:
        return 100.0 * self.check_s / (self.step_s * self.eval_every) if self.eval_every else math.nan


@dataclass(frozen=True)
class DataParallelResult:
    """The same global batch, one process against `nproc` data-parallel ranks."""

    nproc: int
    global_batch: int
    steps: int
    single_s: float  # wall time of the steps in one process
    ranks_s: float  # the same with nproc ranks
    gpus: int  # visible CUDA devices (0: the ranks shared the CPU cores)

    @property
    def speedup(self) -> float:
        return self.single_s / self.ranks_s


@dataclass(frozen=True)
class WriteCost:
    """A synthetic run written through RunWriter (`flowdiag.bench.scale`)."""

    steps: int
    layers: int
    file_bytes: int
    block_s: float  # the whole run through append_steps, a block of rows a call
    row_s: float  # one row through append_step (a flush every 50 rows), per row

    @property
    def bytes_per_step(self) -> float:
        return self.file_bytes / self.steps if self.steps else math.nan


@dataclass(frozen=True)
class CommandCost:
    """One `flowdiag` command in a child process."""

    command: str
    wall_s: float
    cpu_s: float  # user + system: what a busy machine does not inflate
    peak_rss_bytes: int


@dataclass(frozen=True)
class ScaleResult:
    """report, watch --once and export on a long run; report on a folder of shorter runs and on one."""

    written: WriteCost
    startup: CommandCost  # `flowdiag --help`: what every command pays before it starts
    report: CommandCost
    watch: CommandCost
    export: CommandCost
    export_bytes: int  # the event files written
    folder_runs: int
    folder_steps: int
    folder_report: CommandCost
    short_report: CommandCost  # one run of the folder


@dataclass(frozen=True)
class BenchResult:
    device: str
    n_parameters: int
    batch_size: int
    threads: int
    parts: tuple[str, ...]
    steps: StepTiming | None = None
    sync: SyncCheck | None = None
    init: tuple[InitCost, ...] = ()
    workers: WorkersResult | None = None
    competition: CompetitionResult | None = None
    library: LibraryOverhead | None = None
    foreign: LibraryOverhead | None = None  # the same on a hand-written Glow (adapter="auto")
    inverse: InverseCost | None = None
    data_parallel: DataParallelResult | None = None
    scale: ScaleResult | None = None
