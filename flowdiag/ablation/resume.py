"""Where a trial trains: its run folder, continued from the checkpoint an earlier attempt left there
when that attempt ran the same experiment, else made afresh (a stale folder moved out of the way)."""

from __future__ import annotations

import shutil
from pathlib import Path

from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CHECKPOINT_FILE, RUN_FILE
from flowdiag.settings.config import RunConfig
from flowdiag.settings.options import TRAINER_OPTIONS
from flowdiag.train.checkpoint import load_payload


def same_experiment(a: RunConfig, b: RunConfig) -> bool:
    """Every setting but those that say where or how a run is done (device, flush interval...)."""
    return all(
        getattr(getattr(a, option.section), option.field.name)
        == getattr(getattr(b, option.section), option.field.name)
        for option in TRAINER_OPTIONS
        if not option.placement
    )


def can_resume(run_dir: Path, config: RunConfig) -> bool:
    """The folder holds a run file and a readable checkpoint of this very experiment."""
    if not (run_dir / CHECKPOINT_FILE).is_file() or not (run_dir / RUN_FILE).is_file():
        return False
    try:
        stored = RunConfig.from_json(load_payload(run_dir / CHECKPOINT_FILE, "checkpoint")["config"])
    except (UserError, KeyError, TypeError, ValueError):
        return False  # damaged, or written by something else: start afresh
    return same_experiment(stored, config)


def run_folder(out: Path, name: str, trial_number: int, config: RunConfig) -> tuple[Path, bool]:
    """The run folder OUT/runs/<name>, and whether the trial resumes what it holds.

    A folder that cannot be resumed (killed before its first checkpoint, another experiment) moves
    to OUT/.stale/, out of the report, rather than being overwritten.
    """
    run_dir = out / "runs" / name
    if can_resume(run_dir, config):
        return run_dir, True
    if run_dir.exists():
        stale = out / ".stale" / f"{name}-before-trial{trial_number}"
        stale.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), str(stale))
    return run_dir, False
