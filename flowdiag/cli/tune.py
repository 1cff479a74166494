"""`flowdiag tune-lambda`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flowdiag.ablation.spec import TuneSpec, check_tuning
from flowdiag.ablation.storage_url import default_storage_url, display_url
from flowdiag.cli.ablate import INTERRUPTED_EXIT, Board, BoardSink, follow_workers
from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.cli.options import with_trainer_options
from flowdiag.cli.panels import help_panels
from flowdiag.runtime.cores import parse_workers, resolve_workers
from flowdiag.settings.config import RunConfig
from flowdiag.settings.options import apply_options, parse_scalars

if TYPE_CHECKING:  # loaded once the flags are checked (see cli/ablate.py)
    import optuna

    from flowdiag.ablation.tune import TuneRow

DEFAULT_OUT = Path("runs/tune-lambda")


def print_tuning(rows: list[TuneRow], best: TuneRow | None) -> None:
    table = Table(title="tune-lambda", header_style="bold")
    for column in ("trial", "λ", "status", "onset step", "objective (bpd)", "best held-out bpd"):
        table.add_column(column)
    for row in rows:
        mark = " ←" if best is not None and row.number == best.number else ""
        table.add_row(
            str(row.number),
            f"{row.lam:.3g}",
            row.status,
            str(row.onset_step) if row.onset_step >= 0 else "-",
            f"{row.value:.4g}" if math.isfinite(row.value) else "-",
            (f"{row.best_bpd:.4g}" if row.best_bpd is not None else "-") + mark,
        )
    console.print(table)


@help_panels(
    Ablation=("lam_min", "lam_max", "n_trials", "timeout", "storage", "study", "sampler_seed", "workers")
)
@help_panels(Output=("out",))
@with_trainer_options(as_lists=False, exclude=("lam",))
@user_errors_exit_2
def tune_lambda_command(
    lam_min: Annotated[float, typer.Option("--lam-min", help="Smallest non-zero λ (log-uniform).")] = 1e-7,
    lam_max: Annotated[float, typer.Option("--lam-max", help="Largest λ.")] = 1e-1,
    n_trials: Annotated[int, typer.Option("--n-trials", help="Finished trials the study should hold.")] = 12,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Stop starting trials after this many s.")
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Optuna storage URL (default: sqlite in --out).")
    ] = None,
    study: Annotated[str, typer.Option("--study", help="Study name; rerun to resume.")] = "tune-lambda",
    out: Annotated[Path, typer.Option("--out", help="Output folder: study.db and runs/.")] = DEFAULT_OUT,
    sampler_seed: Annotated[int, typer.Option("--sampler-seed", help="TPE's seed.")] = 0,
    workers: Annotated[
        str,
        typer.Option(
            "--workers",
            help="Worker processes, one torch thread each; auto: min(trials left, cores).",
            metavar="auto|INTEGER",
        ),
    ] = "auto",
    **options: Any,
) -> None:
    """TPE over λ (λ = 0 included) at fixed M, batch size and the rest; objective: held-out bpd."""
    parse_workers(workers)  # every flag, file and setting is checked before torch or optuna loads
    spec = TuneSpec(
        config=apply_options(RunConfig(), parse_scalars(options)),
        lam_min=lam_min,
        lam_max=lam_max,
        n_trials=n_trials,
        out=out,
        storage_url=storage or default_storage_url(out),
        study_name=study,
        timeout=timeout,
        sampler_seed=sampler_seed,
    )
    check_tuning(spec, storage_given=storage is not None)
    run_tune(spec, workers)


def run_tune(spec: TuneSpec, workers: str) -> None:
    """Open or resume the study, run trials on the board, print the table and the best λ."""
    from flowdiag.ablation.tune import best_lambda, open_tuning, publish_runs, tuning_rows
    from flowdiag.runtime.environment import configure_launcher

    configure_launcher()  # no thread pool may exist when it forks workers
    optuna_study, data = open_tuning(spec)
    left = max(spec.n_trials - len(tuning_rows(optuna_study)), 1)
    n_workers = min(resolve_workers(workers, left), left)
    console.print(start_line(spec, optuna_study, n_workers), soft_wrap=True, highlight=False)
    stopped = _tune_with_board(spec, optuna_study, data, n_workers)
    publish_runs(spec, optuna_study, stopped=stopped)
    rows = tuning_rows(optuna_study)
    best = best_lambda(rows)
    print_tuning(rows, best)
    if best is None and rows:
        console.print("[red]every trial diverged[/]: widen --lam-max or lower --lr")
    elif best is not None:
        console.print(
            f"best λ = [bold]{best.lam:.3g}[/] (held-out bpd {best.value:.4g}, trial {best.number})"
        )
    if stopped and len(rows) < spec.n_trials:  # a signal after the last trial changes nothing
        typer.echo(
            "interrupted: running trials stopped at a checkpoint; rerun the same command to resume", err=True
        )
        raise typer.Exit(code=INTERRUPTED_EXIT)
    if len(rows) < spec.n_trials and spec.timeout is None:
        typer.echo(f"{spec.n_trials - len(rows)} trial(s) failed (see above): rerun to retry them", err=True)
        raise typer.Exit(code=1)


def start_line(spec: TuneSpec, study: optuna.Study, n_workers: int) -> str:
    """Trials done, and the interrupted ones queued again to resume (their run folder named)."""
    from optuna.trial import TrialState

    from flowdiag.ablation.cell_states import RUN_NAME_ATTR
    from flowdiag.ablation.tune import tuning_rows

    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    resumed = sorted(t.user_attrs[RUN_NAME_ATTR] for t in waiting if RUN_NAME_ATTR in t.user_attrs)
    again = f", {len(resumed)} interrupted ({', '.join(resumed[:5])}) resume" if resumed else ""
    return (
        f"study {spec.study_name} ({display_url(spec.storage_url)}): {len(tuning_rows(study))} of "
        f"{spec.n_trials} trials done{again}; running on {n_workers} worker(s)"
    )


def _tune_with_board(spec: TuneSpec, study: optuna.Study, data: Any, n_workers: int) -> bool:
    """Run the trials, in this process or in workers; True when a signal stopped them."""
    from flowdiag.ablation.stopping import StopRequest
    from flowdiag.ablation.tune import run_tuning, start_tuning_workers, tuning_rows

    board = Board(spec.n_trials)
    board.skip_finished(study)

    def update(study: Any = study) -> None:
        board.set_done(len(tuning_rows(study)))
        board.log_finished(study)

    board.set_done(len(tuning_rows(study)))
    if n_workers == 1:
        with StopRequest() as stop, board.progress:
            sinks = lambda trial: BoardSink(board, trial)  # noqa: E731
            run_tuning(spec, study, data, progress=sinks, after_trial=lambda s, _: update(s), stop=stop)
        update()
        return stop.requested
    processes = start_tuning_workers(spec, data, n_workers)  # before the board's thread starts
    with StopRequest() as stop, board.progress:
        follow_workers(board, study, processes, update=update, stop=stop)
    return stop.requested
