"""A step's row: the scalars and the captured layers packed on the device, copied to the host once, and
read there as per-layer arrays and an onset: the Monitor's recording half.

Under data parallelism the packed row is reduced across ranks first (`reduce_layer_row`), so every rank
takes the same decisions; a layer that did not run on a rank enters the reduction as a neutral 0
(`LayerCapture(fill=0)`), so only a value that ran can be non-finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowdiag.record.run_state import StepRecord
from flowdiag.runtime.distributed import Ranks, reduce_layer_row

# Scalars that lead every packed row; their order is the StepRecord's.
SCALARS = ("loss", "bpd", "penalty", "grad_norm", "lr")
# The scalars whose non-finite value is the loss's onset (the gradient norm has its own).
_OBJECTIVE = ("loss", "bpd", "penalty")
Number = float | int | Tensor


@dataclass(frozen=True)
class HostRow:
    """One step on the host: the scalars, and per layer max |output|, log-det, non-finite and ran."""

    scalars: dict[str, float]
    max_abs: np.ndarray
    logdet: np.ndarray
    nonfinite: np.ndarray
    ran: np.ndarray
    onset_ranks: np.ndarray  # data-parallel: ranks that saw a non-finite value of their own


def host_row(
    values: dict[str, Number | None], layers: list[Tensor] | None, ran: np.ndarray, ranks: Ranks
) -> HostRow:
    """Pack `values` (tensors only: plain numbers never go to the device and back) and the layers' (3N,)
    parts in one row, reduce it across ranks, and copy it to the host: the step's one device sync."""
    n = len(ran)
    on_device = [name for name in SCALARS if isinstance(values[name], Tensor)]
    k = len(on_device)
    row = torch.stack([values[name].detach().reshape(()) for name in on_device])  # type: ignore[union-attr]
    if layers is not None:  # one cat, promoted to the log-dets' float64
        row = torch.cat([row, *layers])
    row = row.to(torch.float64)  # already so when recording: no copy
    if ranks.enabled:  # the same row on every rank: every rank takes the same decisions
        layer = row[k:] if layers is not None else row.new_zeros(3 * n)
        local = sum(name in on_device for name in _OBJECTIVE)  # they lead SCALARS
        row = torch.cat(reduce_layer_row(ranks, row[:k], *layer.split(n), local))
    host = row.cpu().numpy()
    scalars = {name: float(host[i]) for i, name in enumerate(on_device)}
    for name in SCALARS:
        if name not in scalars:
            value = values[name]
            scalars[name] = math.nan if value is None else float(value)  # type: ignore[arg-type]
    onset_ranks = np.flatnonzero(host[k + 3 * n :] > 0) if ranks.enabled else np.zeros(0, int)
    if layers is None:
        nothing = np.full(n, np.nan)
        return HostRow(scalars, nothing, nothing.copy(), np.zeros(n, bool), np.zeros(n, bool), onset_ranks)
    low, high, logdet = host[k : k + n], host[k + n : k + 2 * n], host[k + 2 * n : k + 3 * n]
    return _layer_arrays(scalars, np.maximum(high, -low), logdet.copy(), ran, ranks.enabled, onset_ranks)


def _layer_arrays(
    scalars: dict[str, float],
    max_abs: np.ndarray,
    logdet: np.ndarray,
    ran: np.ndarray,
    reduced: bool,
    onset_ranks: np.ndarray,
) -> HostRow:
    """Only a layer that ran can be non-finite; one that did not is NaN and not non-finite."""
    finite = np.isfinite(max_abs) & np.isfinite(logdet)  # NaN stays NaN in both (and neither warns)
    if reduced:  # neutral zeros where this rank did not run a layer: non-finite ran somewhere
        nonfinite = ~finite
        ran = ran | nonfinite
        max_abs[~ran], logdet[~ran] = np.nan, np.nan
    else:
        nonfinite = ran & ~finite
    return HostRow(scalars, max_abs, logdet, nonfinite, ran.copy(), onset_ranks)


def onset_of(record: StepRecord, names: list[str], given: set[str], loss_scaled: bool) -> str | None:
    """The first non-finite flow layer in data -> latent order; `loss` when every layer was finite but
    a given objective scalar was not; `backward` when only the gradient norm was (no divergence under an
    fp16 loss scaler, which skips that update); None when all is finite."""
    bad = np.flatnonzero(record.nonfinite)
    if bad.size:
        return names[int(bad[0])]
    if not all(math.isfinite(getattr(record, name)) for name in given):
        return "loss"
    if not math.isfinite(record.grad_norm) and not loss_scaled:
        return "backward"
    return None
