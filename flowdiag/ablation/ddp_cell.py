"""One ablation cell as a data-parallel job: N ranks on this machine (`ablate --nproc-per-cell N`).

The ranks are separate processes, so the trial learns the outcome from the run file rank 0 wrote,
the same file `flowdiag report` reads.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from flowdiag.record.store.scan import open_run
from flowdiag.runtime import distributed
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import RunConfig
from flowdiag.train.trainer import RunResult, train


def _rank(config_json: str, run_dir: str, resume: bool) -> None:
    try:
        train(RunConfig.from_json(config_json), Path(run_dir), resume=resume)
    except UserError as error:  # the run file says `failed`; one line, not a traceback per rank
        print(f"error: {error}", flush=True)
        raise SystemExit(2) from None


def result_from_file(path: Path) -> RunResult:
    """What `train` would have returned, read back from the run file: its head, its first two and its
    last row, and its evaluations (never its whole record: a long run's file is hundreds of MB)."""
    with open_run(path) as run:
        head = run.head
        first = run.rows(0, min(2, head.n_rows))
        last = run.tail(1)
        _, eval_bpd = run.evals()
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row of NaN (diagnostics off) has no peak
        peaks = np.nanmax(np.asarray(first.max_abs, dtype=np.float64), axis=1) if first.max_abs.size else None
    early = step2 = math.nan
    if peaks is not None and peaks.size:
        early = float(np.max(peaks))
        at2 = peaks[first.step == 2]
        step2 = float(at2[0]) if at2.size else math.nan
    finite = eval_bpd[np.isfinite(eval_bpd)]
    elapsed = float(last.wall_time[-1]) if len(last.wall_time) and np.isfinite(last.wall_time[-1]) else 0.0
    return RunResult(
        status=head.status,
        out_dir=path.parent,
        steps=head.last_step,
        final_bpd=float(last.bpd[-1]) if len(last.bpd) else math.nan,
        best_eval_bpd=float(finite.min()) if finite.size else math.inf,
        nan_onset_step=head.nan_onset_step,
        nan_onset_layer=head.nan_onset_layer,
        step2_peak=step2,
        early_peak=early,
        steps_per_second=head.n_rows / elapsed if elapsed > 0 else math.nan,
    )


def train_data_parallel(config: RunConfig, run_dir: Path, nproc: int, *, resume: bool = False) -> RunResult:
    """Train (or resume, from the checkpoint rank 0 wrote) one cell on `nproc` ranks."""
    distributed.launch(_rank, nproc, config.to_json(), str(run_dir), resume)
    if not (run_dir / RUN_FILE).exists():
        raise UserError(
            f"no rank of the {nproc}-process cell wrote {run_dir / RUN_FILE}: see the errors above"
        )
    return result_from_file(run_dir / RUN_FILE)
