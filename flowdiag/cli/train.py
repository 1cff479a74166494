"""`flowdiag train` and `flowdiag replay`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flowdiag.cli.common import console, training_progress, user_errors_exit_2
from flowdiag.cli.options import with_trainer_options
from flowdiag.runtime.files import REPLAY_FILE, RUN_FILE, SAMPLES_FILE
from flowdiag.settings.config import RunConfig
from flowdiag.settings.options import apply_options, parse_scalars

if TYPE_CHECKING:
    from flowdiag.train.trainer import RunResult

DEFAULT_OUT = Path("runs/train")


def print_result(result: RunResult) -> None:
    style = {"completed": "green", "diverged": "red", "interrupted": "yellow"}.get(result.status, "white")
    best = f"{result.best_eval_bpd:.4g}" if math.isfinite(result.best_eval_bpd) else "-"
    line = (
        f"[{style}]{result.status}[/] after {result.steps} steps, bpd {result.final_bpd:.4g}, "
        f"best held-out bpd {best}, peak max|output| over steps 1-2 {result.early_peak:.3g}, "
        f"{result.steps_per_second:.1f} steps/s"
    )
    console.print(line)
    if result.nan_onset_step >= 0:
        console.print(f"[red]diverged at step {result.nan_onset_step} in {result.nan_onset_layer}[/]")
        console.print(f"replay it: flowdiag replay {result.out_dir}")
    console.print(f"records: {result.h5_path}")
    if (result.out_dir / SAMPLES_FILE).exists():
        console.print(f"samples: {result.out_dir / SAMPLES_FILE}")


@with_trainer_options(as_lists=False)
@user_errors_exit_2
def train_command(
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (run.h5, checkpoint.pt, samples.png).")
    ] = DEFAULT_OUT,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run folder's checkpoint.")
    ] = False,
    **options: Any,
) -> None:
    """Train one Glow with per-layer diagnostics recorded to OUT/run.h5."""
    from flowdiag.train.trainer import train  # torch: imported when the command runs

    config = apply_options(RunConfig(), parse_scalars(options))
    result = train(config, out, resume=resume, progress=training_progress())
    print_result(result)
    if result.status == "interrupted":
        raise typer.Exit(code=130)  # the run was saved; the conventional code for Ctrl-C


@user_errors_exit_2
def replay_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run folder holding replay.pt (written at the NaN onset).")
    ],
) -> None:
    """Re-run the onset step under anomaly detection and name the first non-finite operation."""
    from flowdiag.train.replay import replay

    if not (run_dir / REPLAY_FILE).exists() and (run_dir / RUN_FILE).exists():
        console.print(f"{run_dir} did not diverge: there is no replay bundle")
        raise typer.Exit(code=0)
    report = replay(run_dir)
    same = "reproduced exactly" if report.loss_reproduced else "NOT reproduced (non-deterministic device?)"
    console.print(f"step {report.step}, onset layer {report.onset_layer}")
    console.print(f"loss: recorded {report.recorded_loss!r}, replayed {report.replayed_loss!r} ({same})")
    if report.first_op:
        source = "from finite inputs" if report.first_op_inputs_finite else "propagating non-finite inputs"
        console.print(
            f"first non-finite forward op: aten.{report.first_op} in {report.first_op_module} ({source})"
        )
    else:
        console.print("the forward pass stayed finite")
    if report.backward_error:
        console.print(f"backward: {report.backward_error}")
