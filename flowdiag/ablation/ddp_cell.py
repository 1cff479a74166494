"""One ablation cell as a data-parallel job: N ranks on this machine (`ablate --nproc-per-cell N`).

The ranks are separate processes, so the trial learns the outcome from the run file rank 0 wrote,
the same file `flowdiag report` reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flowdiag.record.store import RunRecord, read_run
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


def result_from_record(record: RunRecord) -> RunResult:
    """What `train` would have returned, read back from the run file."""
    with np.errstate(invalid="ignore"):
        peaks = (
            np.nanmax(np.asarray(record.max_abs, dtype=np.float64), axis=1) if record.max_abs.size else None
        )
    early = step2 = math.nan
    if peaks is not None:
        early_rows = peaks[record.step <= 2]
        early = float(np.max(early_rows)) if early_rows.size else math.nan
        at2 = peaks[record.step == 2]
        step2 = float(at2[0]) if at2.size else math.nan
    finite = record.eval_bpd[np.isfinite(record.eval_bpd)]
    elapsed = (
        float(record.wall_time[-1]) if len(record.wall_time) and np.isfinite(record.wall_time[-1]) else 0.0
    )
    return RunResult(
        status=record.status,
        out_dir=record.path.parent,
        steps=int(record.step[-1]) if len(record.step) else 0,
        final_bpd=float(record.bpd[-1]) if len(record.bpd) else math.nan,
        best_eval_bpd=float(finite.min()) if finite.size else math.inf,
        nan_onset_step=record.nan_onset_step,
        nan_onset_layer=record.nan_onset_layer,
        step2_peak=step2,
        early_peak=early,
        steps_per_second=len(record.step) / elapsed if elapsed > 0 else math.nan,
    )


def train_data_parallel(config: RunConfig, run_dir: Path, nproc: int, *, resume: bool = False) -> RunResult:
    """Train (or resume, from the checkpoint rank 0 wrote) one cell on `nproc` ranks."""
    distributed.launch(_rank, nproc, config.to_json(), str(run_dir), resume)
    if not (run_dir / RUN_FILE).exists():
        raise UserError(
            f"no rank of the {nproc}-process cell wrote {run_dir / RUN_FILE}: see the errors above"
        )
    return result_from_record(read_run(run_dir / RUN_FILE))
