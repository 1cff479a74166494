"""The names of what a run folder holds, defined once: every reader and writer imports them; and
what a folder must hold to start a run in it or to resume one (checked before anything is loaded)."""

from __future__ import annotations

import os
from pathlib import Path

from flowdiag.runtime.errors import UserError

RUN_FILE = "run.h5"  # the per-step, per-layer record (flowdiag.record.store)
CHECKPOINT_FILE = "checkpoint.pt"  # weights, optimizer, batch stream, RNG and run state
REPLAY_FILE = "replay.pt"  # written at a NaN onset: what `flowdiag replay` re-runs
SAMPLES_FILE = "samples.png"  # samples at the end of a completed run
# In an ablation or tune-lambda output folder: each cell's state as the runner last wrote it (JSON,
# replaced atomically), so `watch` follows a study without reading the study's database.
CELLS_FILE = "cells.json"


def check_run_folder(out_dir: Path, resume: bool) -> None:
    """A fresh run needs a folder it can make and no run file there (nothing is ever overwritten); a
    resumed one, the checkpoint of its run file (every run saves one before its run file exists).
    UserError with the fix otherwise."""
    out_dir = Path(out_dir)
    run_file, checkpoint = out_dir / RUN_FILE, out_dir / CHECKPOINT_FILE
    # A resumed run with neither file never got past its set-up: it starts afresh.
    if resume and not checkpoint.exists() and run_file.exists():
        raise UserError(
            f"--resume: {out_dir} holds a run file but no checkpoint to continue it from "
            f"(written by flowdiag 0.2 or older): remove {run_file}, or choose another --out"
        )
    if not resume and run_file.exists():
        raise UserError(f"{run_file} already exists: pass --resume to continue it, or choose another --out")
    _check_creatable(out_dir)


def _check_creatable(folder: Path) -> None:
    """The folder exists, or its nearest existing parent is a folder this process may write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and (existing == folder or os.access(existing, os.W_OK | os.X_OK)):
        return
    why = "not a folder" if not existing.is_dir() else "not writable"
    raise UserError(f"cannot create output folder {folder} ({existing} is {why}): choose another --out")
