"""How a run ended, in words, for every table and figure: only a completed run has a bpd as its result.

A diverged run's last bpd (1e24 bits/dim, or NaN) is the blow-up, not a result, and an interrupted
or still running one is part-trained: the report says "diverged at step N" or "interrupted at step N
of T" in the place of a bpd, never a number a reader could rank beside a finished run's.
"""

from __future__ import annotations

from typing import NamedTuple

from flowdiag.record.store import RunHead
from flowdiag.report.layer_naming import onset_place
from flowdiag.report.runs import is_diverged, onset_step


class RunEnd(NamedTuple):
    """How a run ended, and the words for it."""

    kind: str  # completed | diverged | interrupted | failed | running
    step: int  # where it ended: the onset of a diverged run, else its last recorded step (0: none)
    text: str  # "diverged at step 7", "interrupted at step 197 of 1500", "completed, 200 steps"

    @property
    def is_result(self) -> bool:
        """Whether the run's bpd is a result: it completed every step it was set to make."""
        return self.kind == "completed"


def _of_total(head: RunHead) -> str:
    return f" of {head.total_steps}" if head.total_steps > 0 else ""


def run_end(head: RunHead) -> RunEnd:
    """How the run ended, from its head alone (status, onset, last step)."""
    if is_diverged(head):
        step = onset_step(head)
        return RunEnd("diverged", step, f"diverged at step {step}")
    step = head.last_step
    if head.status == "completed":
        return RunEnd("completed", step, f"completed, {step} steps")
    if head.status in ("interrupted", "failed"):
        return RunEnd(head.status, step, f"{head.status} at step {step}{_of_total(head)}")
    return RunEnd("running", step, f"running, step {step}{_of_total(head)}")


def end_with_place(head: RunHead) -> str:
    """`run_end`'s text, with where a diverged run went non-finite: "diverged at step 7 in the loss"."""
    end = run_end(head)
    place = onset_place(head) if end.kind == "diverged" else ""
    return f"{end.text} {place}" if place else end.text
