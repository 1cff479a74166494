"""What each cell of a study is, from its trials: the one reading behind the first line of a rerun,
the result table and the cells file, so that they never disagree.

A cell is `done` only when a trial of it COMPLETEd (a finished run: completed or diverged). A trial
that started a run (it names its run folder) and ended unfinished, by a signal or a killed worker,
makes the cell `interrupted`; the next run of the command continues it from its checkpoint. A
trial that ended on an error makes it `failed`. Duplicates (pruned) and trials of other cells are
ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

RUN_DIR_ATTR = "run_dir"  # set when a trial has chosen its run folder, before it trains
RUN_NAME_ATTR = "run_name"  # a tuning trial's run folder under OUT/runs/, kept when it is queued again
STATES = ("done", "running", "interrupted", "failed", "pending")


@dataclass(frozen=True)
class CellState:
    state: str  # one of STATES; `pending`: no trial has started it (queued or not)
    result: FrozenTrial | None  # the COMPLETE trial of a done cell
    last: FrozenTrial | None  # the latest attempt that started a run, else the latest that left the queue
    queued: bool  # a WAITING trial of the cell exists: a worker will take it

    def file_state(self, stopped: bool = False) -> str:
        """The state as the cells file says it: a queued cell is `waiting`; once the command that
        would have run it has stopped, anything unfinished is `interrupted` (its rerun runs it)."""
        if self.state in ("done", "running") or (self.state == "failed" and not self.queued):
            return self.state
        if stopped:
            return "interrupted"
        return "waiting" if self.queued or self.state == "pending" else self.state


def attempt_state(trial: FrozenTrial) -> str:
    """What one finished or running attempt says of its cell."""
    if trial.state == TrialState.COMPLETE:
        return "done"
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.user_attrs.get("status") == "failed":
        return "failed"
    return "interrupted" if RUN_DIR_ATTR in trial.user_attrs else "pending"


def cell_state(attempts: list[FrozenTrial]) -> CellState:
    """The state of one cell from its trials, oldest first."""
    queued = any(t.state == TrialState.WAITING for t in attempts)
    done = [t for t in attempts if t.state == TrialState.COMPLETE]
    if done:
        return CellState("done", done[0], done[0], queued)
    running = [t for t in attempts if t.state == TrialState.RUNNING]
    if running:
        return CellState("running", None, running[-1], queued)
    left = [t for t in attempts if t.state == TrialState.FAIL]
    # A started attempt makes the cell interrupted even when a later claim never started it.
    started = [t for t in left if attempt_state(t) != "pending"]
    last = started[-1] if started else (left[-1] if left else None)
    return CellState(attempt_state(last) if last is not None else "pending", None, last, queued)


def by_key(trials: Iterable[FrozenTrial], attr: str) -> dict[str, list[FrozenTrial]]:
    """The trials that carry `attr` (a cell key, a run name), grouped by its value, oldest first."""
    groups: dict[str, list[FrozenTrial]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        key = trial.user_attrs.get(attr)
        if key is not None and trial.state != TrialState.PRUNED:
            groups.setdefault(key, []).append(trial)
    return groups


def count(states: Iterable[CellState]) -> dict[str, int]:
    """How many cells are in each state (every state present, zeros included)."""
    counts = dict.fromkeys(STATES, 0)
    for state in states:
        counts[state.state] += 1
    return counts
