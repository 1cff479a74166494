"""On CUDA: does a recorded training step wait for the GPU anywhere but the Monitor's one copy?

`torch.cuda.set_sync_debug_mode("warn")` turns every synchronizing CUDA operation into a warning raised
at the Python line that called it; one recorded step is run under it (after a warm-up step) and the
warnings are counted. "error" mode would stop at the Monitor's own `.cpu()` of the packed row, the one
sync a step is meant to have, and say nothing about the rest. A step with at most one sync cannot
sync per layer: that is the verdict, and the report lists where each sync happened.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from flowdiag.bench.processes import in_fresh_process, sync
from flowdiag.bench.results import SyncCheck
from flowdiag.runtime.environment import resolve_device
from flowdiag.settings.config import RunConfig
from flowdiag.train.data import ImageData
from flowdiag.train.trainer import Trainer

_SYNC_MESSAGE = "synchronizing CUDA operation"


def _where(filename: str, lineno: int) -> str:
    parts = Path(filename).parts
    tail = parts[parts.index("flowdiag") :] if "flowdiag" in parts else parts[-2:]
    return f"{'/'.join(tail)}:{lineno}"


def classify_syncs(caught: Sequence[warnings.WarningMessage]) -> SyncCheck:
    """The sync warnings among `caught`, as a SyncCheck with each one's place."""
    places = tuple(_where(w.filename, w.lineno) for w in caught if _SYNC_MESSAGE in str(w.message))
    if len(places) <= 1:
        where = f" ({places[0]})" if places else ""
        note = f"no per-layer sync: {len(places)} host-device sync in a recorded step{where}"
    else:
        note = f"{len(places)} host-device syncs in a recorded step, more than the Monitor's one copy"
    return SyncCheck(True, note, places)


def _check(config_json: str, data: ImageData, folder: str) -> SyncCheck:
    config = RunConfig.from_json(config_json)
    trainer = Trainer(replace(config, train=replace(config.train, diagnostics=True)), Path(folder), data=data)
    trainer.open()
    trainer.one_step()  # warm-up: the first step's lazy set-up is not what every step does
    sync(trainer.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not one per calling line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.one_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    trainer.monitor.close()
    return classify_syncs(caught)


def check_syncs(config: RunConfig, data: ImageData, workdir: Path) -> SyncCheck:
    """Run the check in a fresh process on CUDA; elsewhere a SyncCheck that says it was skipped."""
    device = resolve_device(config.train.device)
    if device.type != "cuda":
        return SyncCheck(
            False, f"skipped on {device.type}: host-device syncs exist only on CUDA (--device cuda)"
        )
    return in_fresh_process(_check, config.to_json(), data, str(workdir / "sync-check"))
