"""NullWriter: RunWriter's interface writing nothing, for data-parallel ranks other than 0 (rank 0 writes
the run file) and for `flowdiag bench`'s A/B of the hooks without the writes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from numpy.typing import ArrayLike

from flowdiag.record.store import inverse_rows


class NullWriter:
    """A RunWriter that writes nothing: what a data-parallel rank other than 0 records into (rank 0
    writes the run file), and what `flowdiag bench` times the hooks against. It has RunWriter's
    methods and no others, so a misspelled name fails here as it would on the real writer."""

    n_steps = 0
    status = "running"

    def append_step(self, step: int, **values: Any) -> None:
        """Nothing: the row is dropped."""

    def append_steps(self, step: ArrayLike, **values: Any) -> None:
        """Nothing: the rows are dropped."""

    def append_eval(self, step: int, bpd: float) -> None:
        """Nothing."""

    def append_inverse(self, row: inverse_rows.InverseRow, onset: tuple[int, str]) -> None:
        """Nothing."""

    def write_init(self, names: Sequence[str], *values: ArrayLike, **named: ArrayLike | None) -> None:
        """Nothing."""

    def set_status(self, status: str, *, onset_step: int = -1, onset_layer: str = "") -> None:
        """Nothing."""

    def set_phase(self, phase: str) -> None:
        """Nothing."""

    def set_onset_rank(self, rank: int) -> None:
        """Nothing."""

    def flush(self) -> None:
        """Nothing."""

    def truncate_after(self, step: int) -> None:
        """Nothing."""

    def close(self, status: str | None = None) -> None:
        """Nothing."""

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None
