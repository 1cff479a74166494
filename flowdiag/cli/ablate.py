"""`flowdiag ablate`: the main job."""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from flowdiag.ablation.grid import ABLATION_DEFAULTS, CORE_AXES, build_grid, cell_key, cell_slug
from flowdiag.ablation.spec import AblationSpec, check_ablation
from flowdiag.ablation.storage_url import default_storage_url, display_url
from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.cli.options import with_default, with_trainer_options
from flowdiag.cli.panels import help_panels
from flowdiag.runtime.cores import parse_workers, resolve_workers
from flowdiag.train.progress import ProgressSink

# optuna, torch and the runner are imported only once every flag, file and setting has been checked:
# `flowdiag --help` stays fast, and bad input is refused in a fraction of a second.
if TYPE_CHECKING:
    import optuna

    from flowdiag.ablation.stopping import StopRequest
    from flowdiag.ablation.study import SyncReport
    from flowdiag.ablation.summary import CellRow

DEFAULT_OUT = Path("runs/ablation")
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a program Ctrl-C ended
LISTED_INTERRUPTED = 10  # interrupted cells named one per line at start-up, at most
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

    def skip_finished(self, study: optuna.Study) -> None:
        """Trials that ended before this command started are not news: no line for them."""
        self._logged.update(t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished())

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
    from optuna.trial import TrialState

    from flowdiag.ablation.attempt import describe

    attrs = trial.user_attrs
    if trial.state == TrialState.FAIL:
        return f"{trial_name(trial)}: {describe(attrs)}"
    status = attrs.get("status", trial.state.name.lower())
    onset = attrs.get("nan_onset_step", -1)
    where = (
        f" at step {onset} in {attrs.get('nan_onset_layer') or '?'}"
        if onset is not None and onset >= 0
        else ""
    )
    return (
        f"{trial_name(trial)}: {status}{where}, best held-out bpd {best_text(status, attrs.get('best_bpd'))}"
    )


def best_text(status: str, best: float | None) -> str:
    """A best held-out bpd as a result only for a completed run: a diverged run's evaluations before
    its onset, or a part-trained run's, are labelled as such (the report leaves both out of its cells).

    >>> best_text("completed", 8.2551), best_text("diverged", 4.578), best_text("interrupted", 7.7)
    ('8.255', '4.578 (before the onset)', '7.7 (part-trained)')
    """
    if best is None or status == "completed":
        return _fmt(best)
    return f"{_fmt(best)} ({'before the onset' if status == 'diverged' else 'part-trained'})"


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


def _run_with_board(spec: AblationSpec, study: optuna.Study, data: dict[Any, Any]) -> bool:
    """Run the queued cells on the board; True when a signal stopped them."""
    from flowdiag.ablation.cell_objective import CellObjective
    from flowdiag.ablation.runner import start_workers, work
    from flowdiag.ablation.stopping import StopRequest

    keys = {cell_key(cell) for cell in spec.grid.cells}
    board = Board(len(keys))
    board.skip_finished(study)
    board.set_done(_count_done(study, keys))
    if spec.workers == 1:
        with StopRequest() as stop, board.progress:
            sinks = lambda trial: BoardSink(board, trial)  # noqa: E731
            objective = CellObjective(spec, progress=sinks, data=data, stop=stop)
            work(spec, objective, after_trial=lambda s, _: _update(board, s, keys))
        _update(board, study, keys)
        return stop.requested
    # Started before the board's refresh thread and the stop request exist: a forked child must not
    # inherit the thread's locks or the request's wakeup socket.
    processes = start_workers(spec, data)
    with StopRequest() as stop, board.progress:
        follow_workers(board, study, processes, update=lambda: _update(board, study, keys), stop=stop)
    return stop.requested


def _show_running(board: Board, study: optuna.Study) -> None:
    """The steps of every RUNNING trial that says how far it got; the bars of ended ones removed."""
    from optuna.trial import TrialState

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


def follow_workers(
    board: Board,
    study: optuna.Study,
    processes: list[Any],
    update: Callable[[], None],
    stop: StopRequest | None = None,
) -> None:
    """Show worker processes' trials on the board (from the study) until every worker has ended.

    A stop asked of the launcher (Ctrl-C reaches the whole process group, but `kill PID` only the
    launcher) is passed on to every worker as SIGINT: each ends its cell at a checkpoint.
    """
    forwarded = False
    try:
        while any(p.is_alive() for p in processes):
            update()
            _show_running(board, study)
            if stop is not None and not forwarded and stop.requested:
                for process in processes:
                    if process.is_alive() and process.pid is not None:
                        os.kill(process.pid, signal.SIGINT)
                forwarded = True
            waiting_on: list[Any] = [p.sentinel for p in processes]
            if stop is not None and not forwarded:
                waiting_on.append(stop)  # wakes at once when a signal arrives
            multiprocessing.connection.wait(waiting_on, timeout=1.0)
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
            best_text(row.status, row.best_bpd),
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
    parse_workers(workers)  # every flag, file and setting is checked before torch or optuna loads
    grid = build_grid({**options, "seed": seeds}, config)
    spec = AblationSpec(grid, out, storage or default_storage_url(out), study, nproc_per_cell=nproc_per_cell)
    check_ablation(spec, storage_given=storage is not None)
    run_ablation(spec, workers)


def run_ablation(spec: AblationSpec, workers: str) -> None:
    """Queue, run and summarize; exit 1 when cells are left without a result, 130 when stopped."""
    from flowdiag.ablation.runner import prepare, publish_cells
    from flowdiag.ablation.summary import summarize
    from flowdiag.runtime.environment import configure_launcher

    configure_launcher()  # no thread pool may exist when it forks workers
    optuna_study, report, data = prepare(spec)
    # Each cell of N ranks takes N cores: `auto` counts cells that fit side by side.
    spec = replace(spec, workers=resolve_workers(workers, report.to_run, per_worker=spec.nproc_per_cell))
    print_start(spec, report)
    stopped = _run_with_board(spec, optuna_study, data)
    publish_cells(spec, optuna_study, stopped=stopped)
    rows = summarize(optuna_study, spec.grid.cells)
    print_summary(rows)
    unfinished = [row for row in rows if not row.is_result]
    if stopped and unfinished:  # a signal after the last cell had finished changes nothing
        typer.echo(
            f"interrupted: {len(unfinished)} cell(s) without a result; running cells stopped at a "
            "checkpoint. Rerun the same command to resume",
            err=True,
        )
        raise typer.Exit(code=INTERRUPTED_EXIT)
    console.print(f"report: flowdiag report {spec.out}")
    if unfinished:
        names = ", ".join(cell_slug(row.cell) for row in unfinished[:5])
        typer.echo(f"{len(unfinished)} cell(s) have no result ({names}): rerun to resume", err=True)
        raise typer.Exit(code=1)


def start_line(spec: AblationSpec, report: SyncReport) -> str:
    """The first line: the cells by state, counted before anything was queued, and what runs now."""
    counts = report.counts
    parts = [f"{counts['done']} done", f"{counts['interrupted']} interrupted", f"{counts['pending']} pending"]
    if counts["failed"]:
        parts.append(f"{counts['failed']} failed (run again)")
    if counts["running"]:
        parts.append(f"{counts['running']} running elsewhere")
    return (
        f"study {spec.study_name} ({display_url(spec.storage_url)}): {len(spec.grid.cells)} cells: "
        f"{', '.join(parts)}; {report.to_run} to run on {spec.workers} worker(s)"
    )


def print_start(spec: AblationSpec, report: SyncReport) -> None:
    """The first line, then the interrupted cells and the step each continues from."""
    console.print(start_line(spec, report), soft_wrap=True, highlight=False)
    interrupted = [(key, s) for key, s in report.states.items() if s.state == "interrupted"]
    for key, state in interrupted[:LISTED_INTERRUPTED]:
        attrs = state.last.user_attrs if state.last is not None else {}
        step = attrs.get("steps") if attrs.get("status") == "interrupted" else None  # else: a killed worker
        where = f"its checkpoint at step {step}" if step is not None else "its last checkpoint"
        console.print(f"  {cell_slug(json.loads(key))}: interrupted, resumes from {where}", highlight=False)
    if len(interrupted) > LISTED_INTERRUPTED:
        console.print(f"  ... and {len(interrupted) - LISTED_INTERRUPTED} more", highlight=False)
