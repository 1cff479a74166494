"""`flowdiag tune-lambda`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flowdiag.cli.ablate import Board, BoardSink, follow_workers
from flowdiag.cli.common import console, fail, user_errors_exit_2
from flowdiag.cli.options import with_trainer_options
from flowdiag.cli.panels import help_panels
from flowdiag.settings.config import RunConfig
from flowdiag.settings.options import apply_options, parse_scalars

DEFAULT_OUT = Path("runs/tune-lambda")


def print_tuning(rows: list, best: Any) -> None:
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
    from flowdiag.ablation.storage import default_storage_url
    from flowdiag.ablation.tune import (
        TuneSpec,
        best_lambda,
        open_tuning,
        run_tuning,
        start_tuning_workers,
        tuning_rows,
    )
    from flowdiag.runtime.environment import configure_launcher, resolve_workers

    resolve_workers(workers, 1)  # a bad value fails before anything is created
    configure_launcher()  # no thread pool may exist when it forks workers
    values = parse_scalars(options)
    config = apply_options(RunConfig(), values)
    spec = TuneSpec(
        config=config,
        lam_min=lam_min,
        lam_max=lam_max,
        n_trials=n_trials,
        out=out,
        storage_url=storage or default_storage_url(out),
        study_name=study,
        timeout=timeout,
        sampler_seed=sampler_seed,
    )
    optuna_study, data = open_tuning(spec)
    left = max(n_trials - len(tuning_rows(optuna_study)), 1)
    n_workers = min(resolve_workers(workers, left), left)
    board = Board(n_trials)

    def update(study: Any = optuna_study) -> None:
        board.set_done(len(tuning_rows(study)))
        board.log_finished(study)

    board.set_done(len(tuning_rows(optuna_study)))
    try:
        if n_workers == 1:
            with board.progress:
                run_tuning(
                    spec,
                    optuna_study,
                    data,
                    progress=lambda trial: BoardSink(board, trial),
                    after_trial=lambda s, _: update(s),
                )
        else:
            processes = start_tuning_workers(spec, data, n_workers)  # before the board's thread starts
            with board.progress:
                follow_workers(board, optuna_study, processes, update=update)
    except KeyboardInterrupt:
        raise fail("interrupted: rerun the same command to resume") from None
    rows = tuning_rows(optuna_study)
    best = best_lambda(rows)
    print_tuning(rows, best)
    if best is None and rows:
        console.print("[red]every trial diverged[/]: widen --lam-max or lower --lr")
    elif best is not None:
        console.print(
            f"best λ = [bold]{best.lam:.3g}[/] (held-out bpd {best.value:.4g}, trial {best.number})"
        )
    if len(rows) < n_trials and timeout is None:
        typer.echo(f"{n_trials - len(rows)} trial(s) failed (see above): rerun to retry them", err=True)
        raise typer.Exit(code=1)
