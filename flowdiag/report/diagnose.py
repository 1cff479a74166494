"""Why did a run diverge? The figures from its file, and one sentence of likely cause.

`diagnose` gathers the facts (onset, first threshold crossing, the extreme ActNorm inits, each 1x1
conv's log-det drift) from the run's digest, which read every row; the cause is the first of a short
ordered list of rules that applies, each a pure function of those facts so that each can be tested alone.
A setting the run's config does not give is None here, and the sentences say so rather than guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from flowdiag.record.store import RunRecord
from flowdiag.record.store.inverse_rows import InverseRecord
from flowdiag.report.digest import DEFAULT_THRESHOLD, Crossing, RunDigest, digest_of
from flowdiag.report.runs import (
    NOT_GIVEN,
    RunSettings,
    actnorm_ceiling,
    is_diverged,
    layer_pixels,
    onset_step,
    precision,
    recon_threshold,
    run_settings,
)
from flowdiag.settings.config import FORMAT_NAMES, LARGEST_FINITE

__all__ = ["DEFAULT_THRESHOLD", "Crossing", "Diagnosis", "diagnose"]
# An ActNorm scale of 100 multiplies a unit-variance input a hundredfold; a few such layers in a row
# reach the paper's 1e8 within one forward pass.
LARGE_INIT_SCALE = 100.0
# 1 nat per position: a drift of Σlog|u| (a 1x1 conv's log-det over h·w) of one nat means |det W| grew
# or shrank by a factor e at every position, which is what the penalty exists to stop. This is the
# evidence the report needs before it recommends the penalty: only `rule_logdet_drift` (a drift this
# large with λ = 0) and `rule_inverse_failure` (the inverse failed) ever name --lam.
LARGE_DRIFT_PER_POSITION = 1.0
RECOMMENDED_INIT_BATCHES = 256  # the paper's M


class ActNormInit(NamedTuple):
    name: str
    log_scale_max: float
    scale: float  # exp(log_scale_max)
    min_input_var: float
    n_values: int  # values per channel the statistics came from: M · batch · h · w
    pixels: int  # h·w of its input; -1 where the file does not say


class ConvDrift(NamedTuple):
    name: str
    first: float  # first finite h·w·Σlog|u| recorded
    last: float  # last finite one
    drift: float  # last - first
    positions: int | None  # h·w at the layer as the run file stores it; None where it does not say

    @property
    def per_position(self) -> float:
        """Drift of Σlog|u| itself; NaN when h·w is unknown."""
        return self.drift / self.positions if self.positions else math.nan


class InverseFailure(NamedTuple):
    """The first evaluation at which the inverse failed, and the conv most likely to blame."""

    step: int
    onset_layer: str  # first non-finite layer while sampling; "" when sampling stayed finite
    recon_error: float  # max |x - f^-1(f(x))| at that evaluation
    nonfinite_samples: float
    worst_conv: str  # the conv with the largest condition number then
    worst_cond: float
    worst_logabsdet_drift: float  # its log|det W| then, minus at the first evaluation


class CauseFacts(NamedTuple):
    """Everything the cause rules look at."""

    settings: RunSettings
    ceiling: tuple[float, str]  # the init scale of a channel that saw one value, and its formula
    threshold: float
    onset_step: int
    onset_layer: str
    onset_kind: str  # actnorm | invconv | coupling | other; "" for `loss`, `backward` or none
    crossing: Crossing | None
    largest_scale: ActNormInit | None
    smallest_var: ActNormInit | None
    conv_drifts: tuple[ConvDrift, ...]
    updates: int  # optimizer updates the run made: its last recorded step - 1 (0: it never updated)
    precision: str | None  # fp32 | bf16 | fp16; None: not given
    peak_before_onset: float  # the largest finite max |output| over the rows before the onset; NaN: none
    recon_threshold: float  # a quarter of a quantization bin: 0.25 / 2^n_bits; NaN: n_bits not given
    inverse_failure: InverseFailure | None


@dataclass(frozen=True)
class Diagnosis:
    path: Path
    # warning: completed, but some layer crossed the threshold; invertibility: the forward stayed
    # finite, the inverse did not (non-finite samples, or reconstruction error past a quarter bin)
    severity: Literal["diverged", "warning", "invertibility"]
    facts: CauseFacts
    rule: str  # name of the rule that produced `cause`
    cause: str

    @property
    def onset_step(self) -> int:
        return self.facts.onset_step

    @property
    def onset_layer(self) -> str:
        return self.facts.onset_layer

    @property
    def crossing(self) -> Crossing | None:
        return self.facts.crossing


# --- the facts ----------------------------------------------------------------------------------


def _actnorm_init(init: dict[str, np.ndarray | list[str]], index: int) -> ActNormInit:
    log_scale_max = float(init["log_scale_max"][index])
    return ActNormInit(
        name=str(init["name"][index]),
        log_scale_max=log_scale_max,
        scale=math.exp(log_scale_max) if log_scale_max < 700 else math.inf,
        min_input_var=float(init["min_input_var"][index]),
        n_values=int(init["n_values"][index]),
        pixels=int(init["pixels"][index]),
    )


def extreme_actnorms(
    init: dict[str, np.ndarray | list[str]] | None,
) -> tuple[ActNormInit | None, ActNormInit | None]:
    """(largest initial scale, smallest initial input variance) over every ActNorm; Nones without init."""
    if init is None or not len(init["name"]):
        return None, None
    log_scale = np.asarray(init["log_scale_max"], dtype=np.float64)
    variance = np.asarray(init["min_input_var"], dtype=np.float64)
    largest = int(np.nanargmax(log_scale)) if np.isfinite(log_scale).any() else 0
    smallest = int(np.nanargmin(variance)) if np.isfinite(variance).any() else 0
    return _actnorm_init(init, largest), _actnorm_init(init, smallest)


def conv_drifts(digest: RunDigest) -> tuple[ConvDrift, ...]:
    """Each 1x1 conv's log-det, last finite minus first finite, over every row of the run."""
    head = digest.head
    return tuple(
        ConvDrift(
            head.layer_names[column],
            float(first),
            float(last),
            float(last - first),
            layer_pixels(head, int(column)),
        )
        for column, first, last in zip(
            head.layer_index("invconv"), digest.conv_first, digest.conv_last, strict=True
        )
    )


def inverse_failure(inv: InverseRecord, recon_threshold: float) -> InverseFailure | None:
    """The first evaluation whose inverse failed: non-finite samples or layers, or a reconstruction
    error past `recon_threshold` (NaN: only a non-finite error counts)."""
    with np.errstate(invalid="ignore"):
        recon_failed = ~np.isfinite(inv.recon_error) | (inv.recon_error > recon_threshold)
        failed = recon_failed | (inv.nonfinite_samples > 0) | inv.nonfinite.any(axis=1)
    rows = np.flatnonzero(failed)
    if not rows.size:
        return None
    row = int(rows[0])
    worst, cond, drift = "", math.nan, math.nan
    if inv.conv_names:
        conds = np.where(np.isnan(inv.conv_cond[row]), np.inf, inv.conv_cond[row])
        column = int(np.argmax(conds))
        worst, cond = inv.conv_names[column], float(inv.conv_cond[row, column])
        drift = float(inv.conv_logabsdet[row, column] - inv.conv_logabsdet[0, column])
    onset = inv.onset_layer if inv.onset_step == int(inv.step[row]) else ""
    return InverseFailure(
        int(inv.step[row]), onset, float(inv.recon_error[row]), float(inv.nonfinite_samples[row]),
        worst, cond, drift,
    )  # fmt: skip


def gather_facts(digest: RunDigest) -> CauseFacts:
    head = digest.head
    largest, smallest = extreme_actnorms(digest.init)
    threshold_recon = recon_threshold(head)
    return CauseFacts(
        settings=run_settings(head),
        ceiling=actnorm_ceiling(head),
        threshold=digest.threshold,
        onset_step=onset_step(head),
        onset_layer=head.nan_onset_layer,
        onset_kind=dict(zip(head.layer_names, head.layer_kinds, strict=True)).get(head.nan_onset_layer, ""),
        crossing=digest.crossing,
        largest_scale=largest,
        smallest_var=smallest,
        conv_drifts=conv_drifts(digest),
        updates=max(head.last_step - 1, 0) if head.n_rows else 0,
        precision=precision(head),
        peak_before_onset=digest.peak_before_onset,
        recon_threshold=threshold_recon,
        inverse_failure=inverse_failure(digest.inverse, threshold_recon),
    )


# --- the cause rules, in order ------------------------------------------------------------------


def _spatial(pixels: int) -> str:
    side = math.isqrt(pixels) if pixels > 0 else 0
    return f"{side}x{side}" if side * side == pixels > 0 else f"{pixels} positions" if pixels > 0 else "h·w"


def _batch(s: RunSettings) -> str:
    return f"batch {s.batch_size}" if s.batch_size is not None else f"batch size {NOT_GIVEN}"


def rule_actnorm_init(facts: CauseFacts) -> str | None:
    """An ActNorm whose init scale is huge: too few values per channel (the paper's Method 2)."""
    norm = facts.largest_scale
    if norm is None or not norm.scale >= LARGE_INIT_SCALE:
        return None
    s = facts.settings
    ceiling, formula = facts.ceiling
    if math.isfinite(ceiling) and abs(norm.scale - ceiling) <= 0.01 * ceiling:
        how_big = f"{formula} = {ceiling:.4g}"
    else:
        how_big = f"{norm.scale:.4g}"
    plural = "value" if norm.n_values == 1 else "values"
    if facts.onset_step == 1:
        growth = "the first forward pass overflowed, before any update"
    else:
        growth = "outputs compounded layer after layer and step after step"
    if s.init_batches is None or s.init_batches < RECOMMENDED_INIT_BATCHES:
        fix = f"initialize from more minibatches (--init-batches {RECOMMENDED_INIT_BATCHES})"
    else:
        fix = "even M minibatches leave that channel near-constant: raise --actnorm-eps or --batch-size"
    m = f"M={s.init_batches}" if s.init_batches is not None else f"M {NOT_GIVEN}"
    return (
        f"ActNorm {norm.name} was initialized from {norm.n_values} {plural} per channel "
        f"({m} · {_batch(s)} · {_spatial(norm.pixels)}), so its scale was "
        f"{how_big} and {growth}: {fix}"
    )


def rule_actnorm_self_init(facts: CauseFacts) -> str | None:
    """A library ActNorm that initialized itself from its first minibatch went non-finite at once."""
    if facts.onset_kind != "actnorm" or not 1 <= facts.onset_step <= 2 or facts.largest_scale is not None:
        return None
    when = "in the first forward pass" if facts.onset_step == 1 else "right after the first update"
    return (
        f"ActNorm {facts.onset_layer} went non-finite {when} (step {facts.onset_step}): a data-dependent "
        f"ActNorm initializes itself from its first minibatch, and at {_batch(facts.settings)} a "
        "deep level sees too few values per channel (the std of one value is NaN, or the scale becomes "
        "1/sqrt(eps)): initialize every ActNorm from many minibatches before training with "
        "flowdiag.cumulative_init(model, minibatches) over 256 of them (flowdiag audit shows which "
        "ActNorms are at risk)"
    )


def rule_format_overflow(facts: CauseFacts) -> str | None:
    """A layer's output passed the reduced-precision format's largest finite value."""
    if facts.precision in (None, "fp32") or facts.onset_step < 0:
        return None
    largest, name = LARGEST_FINITE[facts.precision], FORMAT_NAMES[facts.precision]
    where = (
        facts.onset_layer
        if facts.onset_kind
        else "the backward pass"
        if facts.onset_layer == "backward"
        else ""
    )
    if not where:
        return None
    before = (
        f"max |output| had reached {facts.peak_before_onset:.3g} before the onset, "
        if math.isfinite(facts.peak_before_onset)
        else ""
    )
    fix = (
        "train in bfloat16 (--precision bf16, float32's range)"
        if facts.precision == "fp16"
        else "train in float32"
    )
    return (
        f"{where} overflowed {name} at step {facts.onset_step}: {before}and {name}'s largest finite value is "
        f"{largest:.6g}: {fix} (--precision fp32 to confirm), or lower --lr / add --grad-clip"
    )


def rule_inverse_failure(facts: CauseFacts) -> str | None:
    """The forward stayed finite; sampling or reconstruction did not (Behrmann et al.'s exploding inverse)."""
    f = facts.inverse_failure
    if f is None or facts.onset_step >= 0:
        return None
    if f.onset_layer:
        what = f"sampling went non-finite in {f.onset_layer}"
    elif f.nonfinite_samples > 0:
        what = f"{100 * f.nonfinite_samples:.0f} % of samples were non-finite"
    else:
        what = (
            f"reconstruction error max |x - f^-1(f(x))| was {f.recon_error:.3g}, past a quarter of a "
            f"quantization bin ({facts.recon_threshold:.3g})"
        )
    conv = (
        f"; {f.worst_conv} had the largest condition number, {f.worst_cond:.3g} (its log|det W| moved "
        f"{f.worst_logabsdet_drift:+.3g} since the first evaluation)"
        if f.worst_conv
        else ""
    )
    lam = facts.settings.lam
    fix = {0.0: "add the log-det penalty (--lam 1e-4)", None: "add or raise the log-det penalty (--lam)"}.get(
        lam, "raise --lam"
    )
    return (
        f"the inverse failed at the evaluation of step {f.step} while every forward pass stayed finite: "
        f"{what}{conv}: {fix}, or lower --lr"
    )


def rule_backward_overflow(facts: CauseFacts) -> str | None:
    """The gradient went non-finite while every layer output was still finite."""
    if facts.onset_layer != "backward":
        return None
    return (
        f"the backward pass overflowed: at step {facts.onset_step} the gradient norm was not finite while "
        "every layer output was: clip the gradient norm (--grad-clip 1) or lower the learning rate (--lr)"
    )


def rule_logdet_drift(facts: CauseFacts) -> str | None:
    """A 1x1 conv's log-det wandered far with no penalty on it (the paper's Method 1)."""
    if facts.settings.lam != 0:
        return None
    drifting = [d for d in facts.conv_drifts if abs(d.per_position) >= LARGE_DRIFT_PER_POSITION]
    if not drifting:
        return None
    worst = max(drifting, key=lambda d: abs(d.per_position))
    return (
        f"1x1 conv {worst.name} drifted in log-det by {worst.drift:+.4g} ({worst.per_position:+.3g} per "
        f"position over h·w = {worst.positions}, |det W| scaled by e^{worst.per_position:+.2g}) with λ = 0, "
        "moving the flow towards a singular W: add the log-det penalty (--lam 1e-5)"
    )


def rule_generic(facts: CauseFacts) -> str:
    """No rule above applies: say what was seen and how to look closer, without guessing."""
    if facts.onset_layer == "loss" and facts.crossing is None:
        where = f"the loss went non-finite at step {facts.onset_step} while every layer output stayed finite"
    elif facts.crossing:
        c = facts.crossing
        where = f"{c.layer} was the first layer past {facts.threshold:g} (step {c.step})"
    else:
        where = f"no layer output passed {facts.threshold:g} before the onset"
    scale = f"{facts.largest_scale.scale:.3g}" if facts.largest_scale else "unknown"
    drifts = [abs(d.drift) for d in facts.conv_drifts if math.isfinite(d.drift)]
    drift = f"{max(drifts):.3g}" if drifts else "unknown"
    return (
        f"no single cause stands out: {where}, the largest ActNorm init scale was {scale} and the largest "
        f"1x1-conv log-det drift {drift}; replay the onset step (flowdiag replay RUN_DIR) to name the first "
        "non-finite operation"
    )


CAUSE_RULES: tuple[tuple[str, Callable[[CauseFacts], str | None]], ...] = (
    ("actnorm_init", rule_actnorm_init),
    ("actnorm_self_init", rule_actnorm_self_init),
    ("format_overflow", rule_format_overflow),
    ("backward_overflow", rule_backward_overflow),
    ("logdet_drift", rule_logdet_drift),
    ("inverse_failure", rule_inverse_failure),
    ("generic", rule_generic),
)


def likely_cause(facts: CauseFacts) -> tuple[str, str]:
    """(rule name, sentence) of the first rule that applies; `generic` always does."""
    for name, rule in CAUSE_RULES:
        sentence = rule(facts)
        if sentence is not None:
            return name, sentence
    raise AssertionError("rule_generic always applies")


def diagnose(run: RunDigest | RunRecord | Path, threshold: float | None = None) -> Diagnosis | None:
    """A diagnosis for a diverged run; for a completed one whose inverse failed (invertibility) or that
    crossed `threshold` (warning); else None. A digest was measured against its own threshold."""
    digest = digest_of(run, DEFAULT_THRESHOLD if threshold is None else threshold)
    if threshold is not None and threshold != digest.threshold:
        raise ValueError(f"the digest was made with threshold {digest.threshold:g}, not {threshold:g}")
    facts = gather_facts(digest)
    if is_diverged(digest.head):
        severity = "diverged"
    elif facts.inverse_failure is not None:
        severity = "invertibility"
    elif facts.crossing is not None:
        severity = "warning"
    else:
        return None
    if severity == "invertibility":
        rule, cause = "inverse_failure", rule_inverse_failure(facts) or ""
    else:
        rule, cause = likely_cause(facts)
    return Diagnosis(digest.head.path, severity, facts, rule, cause)
