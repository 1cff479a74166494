"""The `flowdiag` command: a thin typer app over library functions."""

from __future__ import annotations

import gc
from typing import Annotated

import typer

from flowdiag.cli.ablate import ablate_command
from flowdiag.cli.audit import audit_command
from flowdiag.cli.bench import bench_command
from flowdiag.cli.exiting import drop_hdf5_finalizer_errors, exit_code, exit_past_hdf5
from flowdiag.cli.export import export_command
from flowdiag.cli.panels import PanelCommand
from flowdiag.cli.report import report_command
from flowdiag.cli.train import replay_command, train_command
from flowdiag.cli.tune import tune_lambda_command
from flowdiag.cli.usage import OneLineGroup
from flowdiag.cli.watch import watch_command
from flowdiag.runtime.version import __version__

app = typer.Typer(
    name="flowdiag",
    cls=OneLineGroup,  # usage errors in one line (flowdiag.cli.usage)
    help="Glow at small batch sizes: the two stabilizers, per-layer divergence records, ablations, reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: rich's help renderer alone took ~0.3 s per `--help`, more than everything else;
    # the commands write their panels themselves (flowdiag.cli.panels).
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flowdiag {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """flowdiag: why does my Glow diverge, and what stops it."""
    drop_hdf5_finalizer_errors()  # after typer installed its excepthook (flowdiag.cli.exiting)


# Every command's help in panels (flowdiag.cli.panels): plain click sections, no rich renderer.
for name, command in (
    ("train", train_command),
    ("replay", replay_command),
    ("bench", bench_command),
    ("ablate", ablate_command),
    ("tune-lambda", tune_lambda_command),
    ("report", report_command),
    ("watch", watch_command),
    ("audit", audit_command),
    ("export", export_command),
):
    app.command(name, cls=PanelCommand)(command)


def run() -> None:
    """The console script: the app, then a quick exit (a crash-free one after a failed write)."""
    try:
        app(prog_name="flowdiag")
    except SystemExit as end:
        exit_past_hdf5(exit_code(end))
        raise
    finally:
        # The interpreter's last garbage collection walks every object torch and optuna made: 0.5 s of
        # a 0.67 s exit after an ablation (measured). It skips frozen objects; atexit handlers and
        # everything freed by reference counting are finalized as before.
        gc.freeze()
