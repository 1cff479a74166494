"""The onset a writer is told must agree with the rows' non-finite flags: it is the first step that flags
a layer (or, when the loss or the gradient went first, a step at or before it), and a layer it names is
flagged in that step's row. A run imported from elsewhere or made up for a test that says otherwise
would read as another run: the report, watch and export take the onset from the attributes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class FlagWatch:
    """Remembers the first row that flagged a layer, which is all the check needs."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.columns = {name: i for i, name in enumerate(names)}
        self.first: tuple[int, np.ndarray] | None = None  # (step, the flags of that row)

    def see(self, steps: np.ndarray, nonfinite: np.ndarray) -> None:
        """Rows as written: steps (n,) and flags (n, N)."""
        if self.first is not None:
            return
        flagged = np.flatnonzero(nonfinite.any(axis=1))
        if flagged.size:
            row = int(flagged[0])
            self.first = (int(steps[row]), np.array(nonfinite[row], dtype=bool))

    def see_row(self, step: int, nonfinite: np.ndarray) -> None:
        """One row: the per-step path, a microsecond when nothing is flagged."""
        if self.first is None and nonfinite.any():
            self.first = (int(step), np.array(nonfinite, dtype=bool))

    def forget_after(self, step: int) -> None:
        """Rows past `step` were dropped (a resumed run)."""
        if self.first is not None and self.first[0] > step:
            self.first = None

    def check(self, onset_step: int, onset_layer: str, has_row: Callable[[int], bool]) -> None:
        """Raise ValueError (one line, with the fix) when a new onset disagrees with the rows seen."""
        self.check_first(onset_step)
        self.check_row(onset_step, onset_layer, has_row)

    def check_first(self, onset_step: int) -> None:
        """No row flags a layer before the onset, nor without one (what a run's end checks)."""
        first = self.first
        if first is not None and (onset_step < 0 or first[0] < onset_step):
            layer = self.names[int(np.flatnonzero(first[1])[0])]
            raise ValueError(
                f"layer {layer} is flagged non-finite at step {first[0]}, but the onset says "
                f"{'none' if onset_step < 0 else f'step {onset_step}'}: the onset is the first non-finite "
                f"step, so pass onset_step={first[0]} (and that step's first flagged layer)"
            )

    def check_row(self, onset_step: int, onset_layer: str, has_row: Callable[[int], bool]) -> None:
        """A layer the onset names is flagged in the onset step's row, where that row was written."""
        first = self.first
        column = self.columns.get(onset_layer)
        if onset_step < 0 or column is None:
            return  # no onset, or the loss / the backward pass: no layer flag to agree with
        # No row before it flags anything (check_first): its row is the first flagged one, or flags nothing.
        at_onset = first is not None and first[0] == onset_step
        flagged = at_onset and bool(first[1][column])  # type: ignore[index]
        if not flagged and (at_onset or has_row(onset_step)):
            raise ValueError(
                f"the onset names layer {onset_layer} at step {onset_step}, but that step's row does not "
                "flag it non-finite: set its nonfinite entry in that row, or name the layer it flags"
            )
