"""`flowdiag tune-lambda`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flowdiag.ablation.spec import TuneSpec, check_tuning, parse_seeds
from flowdiag.ablation.storage_url import default_storage_url, display_url
from flowdiag.cli.ablate import INTERRUPTED_EXIT, Board, BoardSink, follow_workers
from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.cli.options import with_trainer_options
from flowdiag.cli.panels import help_panels
from flowdiag.runtime.cores import parse_workers, resolve_workers
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig
from flowdiag.settings.options import apply_options, parse_scalars

if TYPE_CHECKING:  # loaded once the flags are checked (see cli/ablate.py)
    import optuna

    from flowdiag.ablation.seed_runs import SeedRun
    from flowdiag.ablation.tune import TuneRow
    from flowdiag.report.statistics import PairedDifference

DEFAULT_OUT = Path("runs/tune-lambda")


def print_tuning(rows: list[TuneRow], verdicts: dict[int, PairedDifference], best: TuneRow | None) -> None:
    """One line per λ: each seed's outcome, the objective, and the comparison with λ = 0."""
    table = Table(title="tune-lambda", header_style="bold")
    for column in ("trial", "λ", "diverged", "best held-out bpd by seed", "objective (mean bpd)"):
        table.add_column(column)
    table.add_column("vs λ = 0: Δ bpd [95 % interval]")
    table.add_column("verdict")
    for row in rows:
        paired = verdicts.get(row.number)
        mark = " ←" if best is not None and row.number == best.number else ""
        table.add_row(
            str(row.number),
            f"{row.lam:.3g}",
            f"{row.diverged}/{len(row.seeds)}",
            "  ".join(f"{run.seed}: {_seed_outcome(run)}" for run in row.seeds),
            (f"{row.value:.4g}" if math.isfinite(row.value) else "-") + mark,
            _difference(paired) if paired is not None else "-",
            paired.verdict if paired is not None else ("baseline" if row.lam == 0 else "-"),
        )
    console.print(table)


def _seed_outcome(run: SeedRun) -> str:
    if run.diverged:
        return f"diverged@{run.nan_onset_step}"
    return f"{run.best_bpd:.4g}" if run.best_bpd is not None else "-"


def _difference(paired: PairedDifference) -> str:
    if paired.difference is None:
        return "no seed to pair"
    interval = (
        f"[{paired.ci95[0]:+.3g}, {paired.ci95[1]:+.3g}]" if paired.ci95 is not None else "[no interval]"
    )
    return f"{paired.difference:+.3g} {interval}"


def compare_with_baseline(rows: list[TuneRow]) -> dict[int, PairedDifference]:
    """Each λ's best held-out bpd against λ = 0's, paired by seed (by trial number): the mean of the
    differences, its bootstrap 95 % interval and the verdict (report.statistics). A seed that diverged
    has no bpd to pair. Empty when no λ = 0 trial finished."""
    from flowdiag.report.statistics import paired_difference

    baseline = next((row for row in rows if row.lam == 0), None)
    if baseline is None:
        return {}
    base = {run.seed: run.result_bpd for run in baseline.seeds}
    verdicts = {}
    for row in rows:
        if row is not baseline:
            own = {run.seed: run.result_bpd for run in row.seeds}
            common = [seed for seed in base if seed in own]
            verdicts[row.number] = paired_difference([base[s] for s in common], [own[s] for s in common])
    return verdicts


def best_lambda(rows: list[TuneRow], verdicts: dict[int, PairedDifference]) -> TuneRow | None:
    """The lowest objective among the λ that diverged on no seed and are "better" than λ = 0; None
    when none clears that bar: a λ that wins by float noise is no winner."""
    better = [
        r for r in rows if r.feasible and r.number in verdicts and verdicts[r.number].verdict == "better"
    ]
    return min(better, key=lambda r: r.value) if better else None


def conclusion(rows: list[TuneRow], verdicts: dict[int, PairedDifference], best: TuneRow | None) -> str:
    """The line under the table, worded from the verdict: a best λ only on "better"."""
    if best is not None:
        paired = verdicts[best.number]
        return (
            f"best λ = [bold]{best.lam:.3g}[/]: better than λ = 0 with {paired.n} seeds (best held-out bpd "
            f"{_difference(paired)}; objective {best.value:.4g}, trial {best.number})"
        )
    others = [row for row in rows if row.number in verdicts]
    if not others:
        missing = any(row.lam != 0 for row in rows)
        return "no λ = 0 trial finished: nothing to compare the λs with; rerun to retry it" if missing else ""
    contender = min(others, key=lambda r: (not r.feasible, r.value))
    paired = verdicts[contender.number]
    against = f"λ = {contender.lam:.3g}, the lowest objective, against λ = 0: {_difference(paired)}"
    if paired.verdict == "cannot tell":
        return f"the λs tie: cannot tell with {paired.n} seed(s) ({against})"
    if paired.verdict == "worse":
        return f"no λ beats λ = 0: every other λ is worse or ties ({against}, worse)"
    diverged = f"{contender.diverged} of {len(contender.seeds)} seeds"
    return f"no best λ: {against} is better on bpd but diverged on {diverged}"


@help_panels(
    Ablation=(
        "lam_min",
        "lam_max",
        "n_trials",
        "timeout",
        "seeds",
        "storage",
        "study",
        "sampler_seed",
        "workers",
    )
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
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Seeds every λ is trained on (comma list); the objective is their mean. Default: --seed.",
            metavar="INTEGER,...",
        ),
    ] = None,
    **options: Any,
) -> None:
    """TPE over λ (λ = 0 included) at fixed M, batch size and the rest, each λ on every seed;
    objective: the seeds' mean held-out bpd, infeasible when a seed diverged."""
    parse_workers(workers)  # every flag, file and setting is checked before torch or optuna loads
    if seeds is not None and options.get("seed") is not None:
        raise UserError("--seed and --seeds: pass one of them (--seeds 0,1,2 trains every λ on each)")
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
        seeds=parse_seeds(seeds) if seeds is not None else (),
    )
    check_tuning(spec, storage_given=storage is not None)
    run_tune(spec, workers)


def run_tune(spec: TuneSpec, workers: str) -> None:
    """Open or resume the study, run trials on the board, print the table and the verdict."""
    from flowdiag.ablation.tune import open_tuning, publish_runs, tuning_rows
    from flowdiag.runtime.environment import configure_launcher

    configure_launcher()  # no thread pool may exist when it forks workers
    optuna_study, data = open_tuning(spec)
    left = max(spec.n_trials - len(tuning_rows(optuna_study)), 1)
    n_workers = min(resolve_workers(workers, left), left)
    console.print(start_line(spec, optuna_study, n_workers), soft_wrap=True, highlight=False)
    stopped = _tune_with_board(spec, optuna_study, data, n_workers)
    publish_runs(spec, optuna_study, stopped=stopped)
    rows = tuning_rows(optuna_study)
    verdicts = compare_with_baseline(rows)
    best = best_lambda(rows, verdicts)
    print_tuning(rows, verdicts, best)
    if rows and not any(row.feasible for row in rows):
        console.print("[red]every λ diverged on some seed[/]: widen --lam-max or lower --lr")
    console.print(conclusion(rows, verdicts, best), soft_wrap=True)
    _exit_when_short(spec, optuna_study, len(rows), stopped)


def _exit_when_short(spec: TuneSpec, study: optuna.Study, done: int, stopped: bool) -> None:
    """Exit 130 when a signal left trials to do, 1 when trials failed or the range is used up."""
    from flowdiag.ablation.lambda_choice import MAX_REPEATS_IN_A_ROW
    from flowdiag.ablation.tune import repeats_at_end

    if done >= spec.n_trials:  # a signal after the last trial changes nothing
        return
    if stopped:
        typer.echo(
            "interrupted: running trials stopped at a checkpoint; rerun the same command to resume", err=True
        )
        raise typer.Exit(code=INTERRUPTED_EXIT)
    if repeats_at_end(study) >= MAX_REPEATS_IN_A_ROW:
        typer.echo(
            f"TPE proposed only λ already trained, {MAX_REPEATS_IN_A_ROW} times in a row: the range "
            f"[{spec.lam_min:g}, {spec.lam_max:g}] is used up; widen --lam-min/--lam-max",
            err=True,
        )
        raise typer.Exit(code=1)
    if spec.timeout is None:
        typer.echo(f"{spec.n_trials - done} trial(s) failed (see above): rerun to retry them", err=True)
        raise typer.Exit(code=1)


def start_line(spec: TuneSpec, study: optuna.Study, n_workers: int) -> str:
    """Trials done, the interrupted ones queued again to resume (the seeds' runs they still train
    named), and the seeds every λ trains on."""
    from flowdiag.ablation.tune import resuming_runs, tuning_rows

    trials, runs = resuming_runs(spec, study)
    more = ", ..." if len(runs) > 5 else ""
    again = f", {trials} interrupted ({', '.join(runs[:5])}{more}) resume" if trials else ""
    seeds = ",".join(str(seed) for seed in spec.trial_seeds)
    return (
        f"study {spec.study_name} ({display_url(spec.storage_url)}): {len(tuning_rows(study))} of "
        f"{spec.n_trials} trials done{again}; each λ on seed(s) {seeds}; running on {n_workers} worker(s)"
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
