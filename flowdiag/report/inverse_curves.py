"""Data for the inverse views: per run the reconstruction error and each conv's condition number over
evaluations, the inverse's per-layer max |output|, and failure rates against λ. Pure."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowdiag.report.diagnose import inverse_failure
from flowdiag.report.digest import RunDigest
from flowdiag.report.layer_naming import head_layer_labels, named_layer
from flowdiag.report.per_layer import cell_states
from flowdiag.report.runs import is_diverged, recon_threshold, run_settings


class InverseCurves(NamedTuple):
    """One run's inverse checks, evaluation by evaluation."""

    label: str
    lam: float | None  # None: not given
    steps: np.ndarray  # (E,) evaluation steps
    recon_error: np.ndarray  # (E,) NaN/inf kept
    conv_names: list[str]
    conv_cond: np.ndarray  # (E, C)
    layer_names: list[str]  # as the report names them (`layer_naming`), forward order
    log10_max_abs: np.ndarray  # (N, E): the inverse's per-layer max |output| while sampling
    nonfinite: np.ndarray  # (N, E)
    onset: str  # "step 300 in levels.0.steps.1.invconv": where sampling first went non-finite; "-"

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, `cell_states`) of the inverse's map, for the report's shared colour scale."""
        ran = np.ones(self.nonfinite.shape, dtype=bool)  # sampling runs every layer
        return self.log10_max_abs, cell_states(self.log10_max_abs, self.nonfinite, ran)


def has_inverse_records(run: RunDigest) -> bool:
    """Whether the run checked its inverse at some evaluation."""
    return len(run.inverse.step) > 0


def inverse_curves(run: RunDigest, label: str) -> InverseCurves:
    """A run's inverse checks as the report draws them."""
    inv = run.inverse
    with np.errstate(divide="ignore", invalid="ignore"):
        log10 = np.log10(np.asarray(inv.max_abs, dtype=np.float64)).T
    return InverseCurves(
        label=label,
        lam=run_settings(run.head).lam,
        steps=np.asarray(inv.step),
        recon_error=np.asarray(inv.recon_error, dtype=np.float64),
        conv_names=list(inv.conv_names),
        conv_cond=np.asarray(inv.conv_cond, dtype=np.float64),
        layer_names=head_layer_labels(run.head),
        log10_max_abs=log10,
        nonfinite=np.asarray(inv.nonfinite, dtype=bool).T,
        onset=f"step {inv.onset_step} in {named_layer(run.head, inv.onset_layer)}"
        if inv.onset_step >= 0
        else "-",
    )


class FailureRate(NamedTuple):
    """Outcomes at one λ, over the runs (seeds) that share it."""

    lam: float | None  # None: not given
    n_runs: int
    n_diverged: int  # the training forward or backward went non-finite
    n_inverse_failed: int  # completed, but the inverse failed (samples or reconstruction)
    run_outcomes: tuple[str, ...]  # per run: "diverged", "inverse" or "ok"


def failure_rates(runs: list[RunDigest]) -> list[FailureRate]:
    """Divergence and invertibility failures per λ, λ ascending (λ not given last)."""
    by_lam: dict[float | None, list[str]] = {}
    for run in runs:
        if is_diverged(run.head):
            outcome = "diverged"
        elif inverse_failure(run.inverse, recon_threshold(run.head)) is not None:
            outcome = "inverse"
        else:
            outcome = "ok"
        by_lam.setdefault(run_settings(run.head).lam, []).append(outcome)
    ordered = sorted(by_lam.items(), key=lambda item: (item[0] is None, item[0] or 0.0))
    return [FailureRate(lam, len(o), o.count("diverged"), o.count("inverse"), tuple(o)) for lam, o in ordered]
