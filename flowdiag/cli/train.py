"""`flowdiag train` and `flowdiag replay`.

Both check their arguments and files before they import torch: a bad value, a missing data root or an
existing run folder is one line within a fraction of a second, not after seconds of imports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flowdiag.cli.common import console, training_progress, user_errors_exit_2
from flowdiag.cli.options import with_trainer_options
from flowdiag.cli.panels import help_panels
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CHECKPOINT_FILE, REPLAY_FILE, RUN_FILE, SAMPLES_FILE, check_run_folder
from flowdiag.settings.config import RunConfig, geometry_error
from flowdiag.settings.options import apply_options, parse_scalars
from flowdiag.train.data_files import check_source, image_size

if TYPE_CHECKING:
    from flowdiag.train.trainer import RunResult

DEFAULT_OUT = Path("runs/train")
EXIT_DIVERGED = 3  # a script can tell a diverged run from a completed one (`ablate` keeps 0: a result)
EXIT_INTERRUPTED = 130  # the conventional code for Ctrl-C; the run was saved


def checked_config(options: dict[str, Any], out: Path, resume: bool) -> RunConfig:
    """The run's settings, and everything about them that can be checked without torch: ranges, the
    data's files, the levels against a known image size, the run folder. UserError otherwise."""
    config = apply_options(RunConfig(), parse_scalars(options))  # ranges: checked as it is made
    check_run_folder(out, resume)
    if resume and (out / CHECKPOINT_FILE).exists():  # it keeps its checkpoint's settings (read with torch)
        return config
    check_source(config.data)
    size = image_size(config.data)
    error = geometry_error(config.model.n_levels, size) if size is not None else None
    if error:
        raise UserError(error)
    return config


def print_result(result: RunResult) -> None:
    """The run's outcome in a few lines; a diverged run says where, never a bpd it no longer has."""
    style = {"completed": "green", "diverged": "red", "interrupted": "yellow"}.get(result.status, "white")
    best = f"{result.best_eval_bpd:.4g}" if math.isfinite(result.best_eval_bpd) else "-"
    if result.nan_onset_step >= 0:
        outcome = f"diverged at step {result.nan_onset_step} in {result.nan_onset_layer}"
        if result.status != "diverged":  # kept going past the onset, or interrupted after it
            outcome = f"{result.status} after {result.steps} steps, {outcome}"
    else:
        outcome = f"{result.status} after {result.steps} steps, bpd {result.final_bpd:.4g}"
    console.print(
        f"[{style}]{outcome}[/], best held-out bpd {best}, "
        f"peak max|output| over steps 1-2 {result.early_peak:.3g}, {result.steps_per_second:.1f} steps/s"
    )
    if result.nan_onset_step >= 0:
        console.print(f"replay it: flowdiag replay {result.out_dir}")
    console.print(f"records: {result.h5_path}")
    if (result.out_dir / SAMPLES_FILE).exists():
        console.print(f"samples: {result.out_dir / SAMPLES_FILE}")


@help_panels(Output=("out", "resume"))
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
    """Train one Glow with per-layer diagnostics recorded to OUT/run.h5.

    \b
    Exit codes:
      0    completed (the budget or the early stop)
      2    bad input, or a file that cannot be written (one line names it and the fix)
      3    diverged (the onset is in OUT/run.h5; `flowdiag replay OUT` re-runs it)
      130  interrupted (saved: rerun the same command with --resume)
    """
    config = checked_config(options, out, resume)
    from flowdiag.train.trainer import train  # torch: imported once the arguments are known good

    result = train(config, out, resume=resume, progress=training_progress())
    print_result(result)
    if result.status == "interrupted":
        raise typer.Exit(code=EXIT_INTERRUPTED)
    if result.status == "diverged":
        raise typer.Exit(code=EXIT_DIVERGED)


@user_errors_exit_2
def replay_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run folder holding replay.pt (written at the NaN onset).")
    ],
) -> None:
    """Re-run the onset step under anomaly detection and name the first non-finite operation."""
    if not (run_dir / REPLAY_FILE).exists():
        if (run_dir / RUN_FILE).exists():
            console.print(f"{run_dir} did not diverge: there is no replay bundle")
            raise typer.Exit(code=0)
        raise UserError(f"no replay bundle in {run_dir}: pass the --out folder of a run that diverged")
    from flowdiag.train.replay import replay  # torch: imported once the bundle is known to be there

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
