"""`flowdiag ablate`: the main job."""

from __future__ import annotations

import multiprocessing.connection
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from flowdiag.ablation.grid import ABLATION_DEFAULTS, CORE_AXES, build_grid, cell_key, cell_slug
from flowdiag.cli.common import console, fail, user_errors_exit_2
from flowdiag.cli.options import with_default, with_trainer_options
from flowdiag.cli.panels import help_panels
from flowdiag.runtime.errors import UserError
from flowdiag.train.progress import ProgressSink

# optuna, torch and the runner are imported when a command runs: `flowdiag --help` stays fast.
if TYPE_CHECKING:
    import optuna

    from flowdiag.ablation.runner import AblationSpec
    from flowdiag.ablation.summary import CellRow

DEFAULT_OUT = Path("runs/ablation")
PEAKS_EXPLAINED = (
    "step-2 peak: the largest max |output| over every flow layer at step 2, after one update (the "
    "paper's Fig. 5). peak steps 1-2: the same over steps 1 and 2, for runs that never reached step 2. "
    "onset: the first non-finite layer, or loss / backward when every layer output was finite."
)


class Board:
    """Rich progress on a terminal (trials done / total, the steps of each running trial), and a
    line per finished trial everywhere: output sent to a file still says what happened."""

    def __init__(self, total_cells: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,  # a bar redrawn into a file is noise
        )
        self.overall = self.progress.add_task("[bold]cells", total=total_cells, note="")
        self.trials: dict[int, TaskID] = {}
        self._logged: set[int] = set()

    def set_done(self, done: int) -> None:
        self.progress.update(self.overall, completed=done)

    def log_finished(self, study: optuna.Study) -> None:
        """One line for every trial that finished since the last call."""
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if trial.number in self._logged or not (
                "cell" in trial.user_attrs or "lam_value" in trial.user_attrs
            ):
                continue
            self._logged.add(trial.number)
            console.print(finished_line(trial), highlight=False, soft_wrap=True)

    def trial_step(self, number: int, name: str, step: int, total: int, note: str = "") -> None:
        if number not in self.trials:
            self.trials[number] = self.progress.add_task(f"  {name}", total=total, note=note)
        self.progress.update(self.trials[number], completed=step, total=total, note=note)

    def trial_done(self, number: int) -> None:
        if number in self.trials:
            self.progress.remove_task(self.trials.pop(number))


def finished_line(trial: optuna.trial.FrozenTrial) -> str:
    """`cell M1-lam0.001-b1-seed0: diverged at step 1 in levels.2.steps.0.actnorm, best held-out bpd -`."""
    attrs = trial.user_attrs
    status = attrs.get("status", trial.state.name.lower())
    onset = attrs.get("nan_onset_step", -1)
    where = (
        f" at step {onset} in {attrs.get('nan_onset_layer') or '?'}"
        if onset is not None and onset >= 0
        else ""
    )
    best = attrs.get("best_bpd")
    return f"{trial_name(trial)}: {status}{where}, best held-out bpd {_fmt(best)}"


def trial_name(trial: optuna.Trial | optuna.trial.FrozenTrial) -> str:
    """A grid cell's folder name; a tuning trial's number and λ."""
    if all(name in trial.params for name in CORE_AXES):
        return cell_slug(trial.params)
    if "lam_value" in trial.user_attrs:
        return f"trial {trial.number} λ={trial.user_attrs['lam_value']:.3g}"
    return f"trial {trial.number}"


class BoardSink(ProgressSink):
    """The trainer's ProgressSink for an in-process trial: drawn on the board, evaluations reported
    to the study as intermediate values."""

    def __init__(self, board: Board, trial: optuna.Trial) -> None:
        self.board, self.trial, self.total = board, trial, 0
        self.name = trial_name(trial)

    def start(self, total_steps: int, description: str) -> None:
        self.total = total_steps
        self.board.trial_step(self.trial.number, self.name, 0, total_steps)

    def phase(self, name: str) -> None:
        note = "ActNorm init" if name == "init" else ""
        self.board.trial_step(self.trial.number, self.name, 0, self.total, note)

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        self.board.trial_step(self.trial.number, self.name, step, self.total, f"bpd {bpd:.3f}")

    def evaluated(self, step: int, bpd: float) -> None:
        self.trial.report(bpd, step)

    def stop(self) -> None:
        self.board.trial_done(self.trial.number)


def _count_done(study: optuna.Study, keys: set[str]) -> int:
    from optuna.trial import TrialState

    done = {t.user_attrs.get("cell") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    return len(done & keys)


def _update(board: Board, study: optuna.Study, keys: set[str]) -> None:
    board.set_done(_count_done(study, keys))
    board.log_finished(study)


def _run_with_board(spec: AblationSpec, study: optuna.Study, data: dict[Any, Any]) -> None:
    from flowdiag.ablation.runner import CellObjective, start_workers, work

    keys = {cell_key(cell) for cell in spec.grid.cells}
    board = Board(len(keys))
    board.set_done(_count_done(study, keys))
    if spec.workers == 1:
        with board.progress:
            objective = CellObjective(spec, progress=lambda trial: BoardSink(board, trial), data=data)
            work(spec, objective, after_trial=lambda s, _: _update(board, s, keys))
        _update(board, study, keys)
        return
    # Started before the board's refresh thread exists: a forked child must not inherit its locks.
    processes = start_workers(spec, data)
    with board.progress:
        follow_workers(board, study, processes, update=lambda: _update(board, study, keys))


def follow_workers(
    board: Board, study: optuna.Study, processes: list[Any], update: Callable[[], None]
) -> None:
    """Show worker processes' trials on the board (from the study) until every worker has ended."""
    from optuna.trial import TrialState

    try:
        while any(p.is_alive() for p in processes):
            update()
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for trial in running:
                if "progress_total" in trial.user_attrs:
                    board.trial_step(
                        trial.number,
                        trial_name(trial),
                        trial.user_attrs.get("progress_step", 0),
                        trial.user_attrs["progress_total"],
                        "ActNorm init" if trial.user_attrs.get("progress_phase") == "init" else "",
                    )
            for number in set(board.trials) - {t.number for t in running}:
                board.trial_done(number)
            multiprocessing.connection.wait([p.sentinel for p in processes], timeout=1.0)
    finally:
        for process in processes:
            process.join()
    update()


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(rows: list[CellRow]) -> None:
    from flowdiag.ablation.summary import extra_axes

    extra = extra_axes(rows)
    table = Table(title="ablation", header_style="bold")
    for column in [
        "M",
        "λ",
        "batch",
        "seed",
        *extra,
        "status",
        "onset step",
        "onset",
        "step-2 peak",
        "peak steps 1-2",
        "best held-out bpd",
    ]:
        table.add_column(column)
    colour = {"completed": "green", "diverged": "red", "pending": "yellow", "interrupted": "yellow"}
    for row in rows:
        c = row.cell
        table.add_row(
            str(c["init_batches"]),
            f"{c['lam']:g}",
            str(c["batch_size"]),
            str(c["seed"]),
            *[str(c[k]) for k in extra],
            f"[{colour.get(row.status, 'white')}]{row.status}[/]",
            str(row.onset_step) if row.onset_step >= 0 else "-",
            row.onset_layer or "-",
            _fmt(row.step2_peak, ".3g"),
            _fmt(row.early_peak, ".3g"),
            _fmt(row.best_bpd),
        )
    console.print(table)
    console.print(PEAKS_EXPLAINED)


@help_panels(Ablation=("seeds", "workers", "storage", "study", "nproc_per_cell", "config"), Output=("out",))
@with_trainer_options(as_lists=True, exclude=("seed",), defaults=ABLATION_DEFAULTS)
@user_errors_exit_2
def ablate_command(
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help=with_default("Seeds, a comma list: one grid axis.", ABLATION_DEFAULTS["seed"]),
            show_default=False,
            metavar="INTEGER,...",
        ),
    ] = None,
    workers: Annotated[
        str,
        typer.Option(
            "--workers",
            help="Worker processes on this machine, one torch thread each; auto: min(cells left, cores).",
            metavar="auto|INTEGER",
        ),
    ] = "auto",
    storage: Annotated[
        str | None, typer.Option("--storage", help="Optuna storage URL (default: sqlite in --out).")
    ] = None,
    study: Annotated[
        str, typer.Option("--study", help="Study name; rerun the same command to resume.")
    ] = "ablation",
    nproc_per_cell: Annotated[
        int,
        typer.Option(
            "--nproc-per-cell",
            help="Ranks per cell: each cell a data-parallel job (torch.distributed) of this many processes.",
        ),
    ] = 1,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: study.db and runs/<cell>/.")
    ] = DEFAULT_OUT,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with the same settings; the command line wins.")
    ] = None,
    **options: Any,
) -> None:
    """Cross M, λ, batch size and seeds (and any comma-listed trainer option) in one Optuna study."""
    from flowdiag.ablation.runner import AblationSpec, prepare
    from flowdiag.ablation.storage import default_storage_url, display_url
    from flowdiag.ablation.summary import summarize
    from flowdiag.runtime.environment import configure_launcher, resolve_workers

    resolve_workers(workers, 1)  # a bad value fails before anything is created
    if nproc_per_cell < 1:
        raise UserError(f"--nproc-per-cell {nproc_per_cell}: pass a positive integer, e.g. 2")
    configure_launcher()  # no thread pool may exist when it forks workers
    grid = build_grid({**options, "seed": seeds}, config)
    spec = AblationSpec(grid, out, storage or default_storage_url(out), study, nproc_per_cell=nproc_per_cell)
    optuna_study, queued, data = prepare(spec)
    # Each cell of N ranks takes N cores: `auto` counts cells that fit side by side.
    spec = replace(spec, workers=resolve_workers(workers, queued, per_worker=nproc_per_cell))
    total = len(grid.cells)
    console.print(
        f"study [bold]{study}[/] ({display_url(spec.storage_url)}): {total} cells, "
        f"{total - queued} already done or running, {queued} to run on {spec.workers} worker(s)",
        soft_wrap=True,
    )
    try:
        _run_with_board(spec, optuna_study, data)
    except KeyboardInterrupt:
        print_summary(summarize(optuna_study, grid.cells))
        raise fail("interrupted: rerun the same command to resume") from None
    rows = summarize(optuna_study, grid.cells)
    print_summary(rows)
    console.print(f"report: flowdiag report {out}")
    pending = [cell_slug(row.cell) for row in rows if row.status == "pending"]
    if pending:
        typer.echo(
            f"{len(pending)} cell(s) have no result ({', '.join(pending[:5])}): rerun to resume", err=True
        )
        raise typer.Exit(code=1)
