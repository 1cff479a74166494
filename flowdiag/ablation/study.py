"""An ablation's Optuna study: created once, labelled with what it holds, and synced with the grid.

Protocol (measured safe on SQLite and PostgreSQL, see storage.py):
- the launching process *syncs* the grid: dead workers' RUNNING trials are failed and queued again;
  every cell with no COMPLETE, WAITING or RUNNING trial is queued as a WAITING trial whose params
  are the cell values (an interrupted cell too: its new trial resumes the checkpoint);
- each worker pops WAITING trials through `study.optimize`, which claims a trial atomically and
  keeps its heartbeat; a worker whose `ask()` found the queue empty got a sampler trial instead and
  discards it (pruned, no cell), so no cell ever runs twice;
- two machines that sync the same grid at once both queue its cells: a popped trial whose cell has
  an earlier live (waiting, running or complete) trial is discarded as a duplicate (pruned), so the
  earliest live trial of a cell is the one that runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from flowdiag.ablation.cell_states import CellState, by_key, cell_state, count
from flowdiag.ablation.grid import cell_key, cell_slug
from flowdiag.ablation.storage import Reaper, make_storage
from flowdiag.runtime.errors import UserError
from flowdiag.settings.options import OPTIONS_BY_NAME

STUDY_KIND = "ablation"
CREATOR_WAIT_SECONDS = 10.0  # for the process that created a study to write what it holds
LIVE = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)


def open_study(
    storage_url: str, study_name: str, kind: str, fixed_json: str, axes: list[str]
) -> optuna.Study:
    """Create or load the study; refuse one made with other fixed settings (never mix them)."""
    storage = make_storage(storage_url)
    try:  # the database decides who creates it: of processes starting it at once, exactly one
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
    else:
        _label(study, kind, fixed_json, axes)
        return study
    attrs = _settled_attrs(study)
    if attrs is None:  # its creator died before it said what the study holds
        _label(study, kind, fixed_json, axes)
        return study
    if attrs["kind"] != kind:
        raise UserError(f"study {study_name!r} is a {attrs['kind']} study, not {kind}: use another --study")
    if attrs["fixed"] != fixed_json or sorted(attrs["axes"]) != sorted(axes):
        old, new = json.loads(attrs["fixed"]), json.loads(fixed_json)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "axis") != new.get(k, "axis"))
        details = (
            ", ".join(f"{k}: {old.get(k, 'axis')} -> {new.get(k, 'axis')}" for k in changed) or "grid axes"
        )
        raise UserError(
            f"study {study_name!r} was made with other fixed settings ({details}); "
            "use another --study or --out to keep both"
        )
    return study


def _label(study: optuna.Study, kind: str, fixed_json: str, axes: list[str]) -> None:
    """What the study holds; "kind" last, so that a process that sees it sees the others."""
    study.set_user_attr("fixed", fixed_json)
    study.set_user_attr("axes", sorted(axes))
    study.set_user_attr("kind", kind)


def _settled_attrs(study: optuna.Study) -> dict[str, Any] | None:
    """The study's attributes once its creator has written "kind" (milliseconds after creating it;
    before the fix two machines starting one study met a KeyError here); None if it never does."""
    deadline = time.monotonic() + CREATOR_WAIT_SECONDS
    while True:
        attrs = study.user_attrs
        if "kind" in attrs:
            return attrs
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _distribution(name: str, value: Any) -> BaseDistribution:
    """Single-point distributions: they stay compatible when the grid grows."""
    option = OPTIONS_BY_NAME[name]
    if option.kind == "choice":
        return CategoricalDistribution(option.choices)
    if value is None:
        raise UserError(f"{option.cli_flag}: 'none' cannot be one value of a grid axis")
    if isinstance(value, int):
        return IntDistribution(value, value)
    return FloatDistribution(value, value)


def cell_states(study: optuna.Study, cells: list[dict[str, Any]]) -> dict[str, CellState]:
    """Each cell's state, by cell key, in grid order."""
    attempts = by_key(study.get_trials(deepcopy=False), "cell")
    return {cell_key(cell): cell_state(attempts.get(cell_key(cell), [])) for cell in cells}


def cells_snapshot(
    study: optuna.Study, cells: list[dict[str, Any]], stopped: bool = False
) -> tuple[dict[str, str], int]:
    """What the cells file holds: run folder name -> state, and the RUNNING trials of the study."""
    states = cell_states(study, cells)
    named = {cell_slug(cell): states[cell_key(cell)].file_state(stopped) for cell in cells}
    return named, len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


@dataclass(frozen=True)
class SyncReport:
    """What a (re)run found before it queued anything: cells by state, and what it queued."""

    states: dict[str, CellState]  # by cell key
    counts: dict[str, int]  # done, running, interrupted, failed, pending
    queued: int  # cells queued by this sync (new, interrupted, failed)
    to_run: int  # cells a worker will take: queued now or still waiting from before


def sync_grid(study: optuna.Study, cells: list[dict[str, Any]]) -> SyncReport:
    """Fail dead workers' trials, then queue every cell that has no live trial."""
    Reaper().sweep(study)
    states = cell_states(study, cells)
    live = {t.user_attrs.get("cell") for t in study.get_trials(deepcopy=False, states=LIVE)}
    queued = 0
    for cell in cells:
        key = cell_key(cell)
        if key in live:
            continue
        study.add_trial(
            create_trial(
                state=TrialState.WAITING,
                params=cell,
                distributions={name: _distribution(name, value) for name, value in cell.items()},
                user_attrs={"cell": key},
            )
        )
        queued += 1
    waiting = sum(1 for s in states.values() if s.queued and s.state not in ("done", "running"))
    return SyncReport(states, count(states.values()), queued, queued + waiting)
