"""Numbers and diagnoses as text, shared by the Markdown/HTML report and the terminal summary."""

from __future__ import annotations

import math
from typing import Any

from flowdiag.report.diagnose import Diagnosis
from flowdiag.report.runs import NOT_GIVEN

MAX_DRIFTS_LISTED = 3


def fmt(value: float, digits: int = 4) -> str:
    """A float for a table: `digits` significant digits; inf and NaN spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def fmt_bpd(value: float) -> str:
    """bpd to four decimals, the precision the paper reports and the tests compare; an exploded
    loss (1e24 bits/dim) in scientific notation rather than 25 digits."""
    if not math.isfinite(value):
        return "NaN"
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.3e}"


def fmt_step(step: int) -> str:
    return str(step) if step >= 0 else "-"


def fmt_rate(n_diverged: int, n_runs: int) -> str:
    return f"{n_diverged}/{n_runs} ({100 * n_diverged / n_runs:.0f}%)" if n_runs else "-"


def headline(diagnosis: Diagnosis) -> str:
    f = diagnosis.facts
    if diagnosis.severity == "diverged":
        where = f"step {fmt_step(f.onset_step)}" + (f" in {f.onset_layer}" if f.onset_layer else "")
        return f"diverged at {where}"
    if diagnosis.severity == "invertibility":
        assert f.inverse_failure is not None
        return f"completed, but the inverse failed at step {f.inverse_failure.step}"
    crossing = f.crossing
    assert crossing is not None  # a warning exists only because of a crossing
    return f"warning: completed, but {crossing.layer} passed {f.threshold:g} at step {crossing.step}"


def diagnosis_lines(diagnosis: Diagnosis) -> list[str]:
    """The figures behind a diagnosis, one line each, the likely cause last."""
    f = diagnosis.facts
    lines = []
    if diagnosis.severity == "diverged":
        lines.append(f"NaN onset: step {fmt_step(f.onset_step)}, {onset_place(f.onset_layer)}")
    if f.crossing is not None:
        c = f.crossing
        lines.append(
            f"first max |output| over {f.threshold:g} or non-finite: step {c.step}, layer {c.layer} "
            f"(max |output| {fmt(c.max_abs)})"
        )
    else:
        lines.append(f"no layer's max |output| passed {f.threshold:g} or went non-finite")
    if f.largest_scale is not None:
        a = f.largest_scale
        lines.append(
            f"largest ActNorm init scale: {a.name}, scale {fmt(a.scale)} (log {fmt(a.log_scale_max)}), "
            f"from {a.n_values} value{'' if a.n_values == 1 else 's'} per channel"
        )
    if f.smallest_var is not None:
        a = f.smallest_var
        lines.append(
            f"smallest ActNorm init variance: {a.name}, variance {fmt(a.min_input_var)}, "
            f"from {a.n_values} value{'' if a.n_values == 1 else 's'} per channel"
        )
    drifts = sorted(
        (d for d in f.conv_drifts if math.isfinite(d.drift)), key=lambda d: abs(d.drift), reverse=True
    )
    if f.updates == 0:
        lines.append("no optimizer update was made, so the 1x1 convs have not drifted")
    elif drifts:
        listed = ", ".join(f"{d.name} {d.drift:+.4g}" for d in drifts[:MAX_DRIFTS_LISTED])
        more = (
            f" (largest {MAX_DRIFTS_LISTED} of {len(drifts)} convs)"
            if len(drifts) > MAX_DRIFTS_LISTED
            else ""
        )
        lines.append(f"1x1 conv log-det drift, last minus first h·w·Σlog|u|: {listed}{more}")
    if f.inverse_failure is not None:
        inv = f.inverse_failure
        lines.append(
            f"inverse at step {inv.step}: reconstruction error {fmt(inv.recon_error)} (threshold "
            f"{fmt(f.recon_threshold, 3)}), non-finite samples {100 * inv.nonfinite_samples:.0f} %"
            + (f", worst-conditioned conv {inv.worst_conv} ({fmt(inv.worst_cond)})" if inv.worst_conv else "")
        )
    if f.precision not in (None, "fp32"):
        lines.append(f"precision: {f.precision}")
    lines.append(f"likely cause: {diagnosis.cause}")
    if diagnosis.severity == "diverged" and f.onset_layer in ("loss", "backward"):
        lines.append(
            f"every layer output was finite: run `flowdiag replay {diagnosis.path.parent}` to name the "
            "first non-finite operation"
        )
    return lines


def onset_place(onset: str) -> str:
    """Where a run went non-finite, in words: a layer, the loss, or the backward pass."""
    if onset == "backward":
        return "in the backward pass (every layer output finite; the gradient was not)"
    if onset == "loss":
        return "in the loss (every layer output finite)"
    return f"layer {onset}" if onset else "(not recorded)"


# --- the ablation's comparisons (`statistics.comparisons`' entries) ---------------------------------

AXIS_NAMES = {"init_batches": "M", "lam": "λ", "batch_size": "batch"}  # as every table heads them


def fmt_setting(value: object) -> str:
    """A setting's value: 0.001 as 0.001, 256 as 256, None as not given."""
    if value is None:
        return NOT_GIVEN
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def fmt_interval(interval: tuple[float, float] | list[float] | None, digits: int = 2) -> str:
    """A 95 % interval as "0.61 to 1.00" (a dash would read as a minus); "-" without one."""
    if interval is None:
        return "-"
    low, high = interval
    return f"{_signed(low, digits)} to {_signed(high, digits)}"


def _signed(value: float, digits: int) -> str:
    return f"{value:.{digits}f}".replace("-", "−")  # a real minus sign: "−0.03", not a hyphen


def comparison_where(entry: dict[str, Any]) -> str:
    """The comparison's other settings, in words: "at λ 0.001, batch 1"; "" when there are none."""
    held = ", ".join(f"{AXIS_NAMES.get(k, k)} {fmt_setting(v)}" for k, v in entry["where"].items())
    return f"at {held}" if held else ""


def comparison_evidence(entry: dict[str, Any]) -> tuple[str, str]:
    """(counts or paired difference, p-value or 95 % interval) of one comparison, for its table row."""
    if entry["metric"] == "diverged":
        (k1, n1), (k2, n2) = entry["from_counts"], entry["to_counts"]
        return f"diverged {k1}/{n1} → {k2}/{n2}", f"Fisher p = {entry['p_value']:.2g}"
    if entry["difference"] is None:
        return "no seed with a bpd in both", "-"
    seeds = f"{entry['n']} paired seed{'s' * (entry['n'] != 1)}"
    interval = "no interval" if entry["ci95"] is None else f"95 % CI {fmt_interval(entry['ci95'])}"
    return f"best held-out bpd {_signed(entry['difference'], 3)}", f"{interval}, {seeds}"


def comparison_sentence(entry: dict[str, Any]) -> str:
    """One comparison with its verdict, e.g. "M 1 → 256 at λ 0.001: diverged 6/6 → 0/6, Fisher p = 0.0022:
    better."; a verdict that cannot be told says with how few runs.

    >>> comparison_sentence({"axis": "init_batches", "from": 1, "to": 256, "where": {"lam": 0.001},
    ...     "metric": "diverged", "verdict": "better", "from_counts": [6, 6], "to_counts": [0, 6],
    ...     "p_value": 0.0021645})
    'M 1 → 256 at λ 0.001: diverged 6/6 → 0/6, Fisher p = 0.0022: better.'
    """
    axis = AXIS_NAMES.get(entry["axis"], entry["axis"])
    where = comparison_where(entry)
    head = f"{axis} {fmt_setting(entry['from'])} → {fmt_setting(entry['to'])}" + (
        f" {where}" if where else ""
    )
    what, evidence = comparison_evidence(entry)
    if entry["metric"] == "best_bpd" and entry["difference"] is None:
        return f"{head}: best held-out bpd: no seed has one in both cells: {entry['verdict']}."
    verdict = entry["verdict"]
    if verdict == "cannot tell":
        if entry["metric"] == "diverged":
            verdict = f"cannot tell with {entry['from_counts'][1]} and {entry['to_counts'][1]} runs"
        else:
            verdict = f"cannot tell with {entry['n']} seed{'s' * (entry['n'] != 1)}"
    if entry["metric"] == "diverged":
        return f"{head}: {what}, {evidence}: {verdict}."
    return f"{head}: {what} ({evidence}): {verdict}."
