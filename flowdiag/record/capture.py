"""The forwards between two steps, reduced per flow layer on the device: the Monitor's capturing half.

Each call of a layer reduces its output to its min and max (max |output| = max(max, -min) is taken on
the host), written in place into one (2, N) tensor, and keeps its log-det as it came: no copy to the
host, no sync, inside the user's forward. Several forwards before one step (gradient accumulation)
fold in: the extremes over all of them (a spike in any microbatch survives, NaN too), and the log-det
averaged over every sample they held, each microbatch weighing its batch size. `calls` counts, on the
host, how often each layer ran; a layer that did not run keeps `fill`: NaN, or under data parallelism
a neutral 0 that the other ranks' values override in the reduction.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from flowdiag.adapters.base import Difference, Logdet, logdet_value


class ForwardsRecord(NamedTuple):
    """Forwards kept out of the training rows (validation, sampling), per flow layer (host copies)."""

    max_abs: np.ndarray  # (N,) max |output| over those forwards; NaN where a layer did not run
    logdet: np.ndarray  # (N,) mean log-det over every sample of them
    ran: np.ndarray  # (N,) bool
    forwards: int


def _batch(output: Tensor) -> int:
    return int(output.shape[0]) if output.dim() > 0 else 1


def _wider(dtype: torch.dtype, than: torch.dtype) -> bool:
    return dtype == torch.float64 and than != torch.float64


def batch_means(logdets: list[Tensor]) -> Tensor:
    """(N,) float64: each layer's log-det averaged over the batch (a scalar log-det is its own mean).
    One stacked mean per shape: one in all where every layer gave the same shape, as flowdiag's Glow
    does. normflows' Glow mixes (B,) and scalar log-dets: there the failed stack and a mean per layer
    cost 0.31 ms for 77 layers against 0.09 ms for a mean per shape put back in order by one stack of
    views (measured alone; the row's `values` in a step: 0.58 -> 0.32 ms). Shapes are compared, not a
    stack tried first: its exception alone cost ~70 µs."""
    shapes = [logdet.shape for logdet in logdets]
    if shapes.count(shapes[0]) == len(shapes):
        return _stacked_means(logdets)
    groups: dict[torch.Size, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(index)
    means: list[Tensor] = [logdets[0]] * len(logdets)
    for indices in groups.values():
        for index, mean in zip(indices, _stacked_means([logdets[i] for i in indices]).unbind(), strict=True):
            means[index] = mean
    return torch.stack(means)


def _stacked_means(logdets: list[Tensor]) -> Tensor:
    """The means of log-dets of one shape, in one stack (one per tensor where they lie on several devices)."""
    try:
        stacked = torch.stack(logdets)
    except RuntimeError:
        return torch.stack([t.mean(dtype=torch.float64) for t in logdets])
    return stacked.reshape(len(logdets), -1).mean(1, dtype=torch.float64)


def _summed(logdet: Tensor, batch: int) -> tuple[Tensor, int]:
    """(Σ over the call's samples in float64, how many): a scalar log-det counts once per sample."""
    if logdet.dim():
        return logdet.sum(dtype=torch.float64), logdet.numel()
    return logdet.double() * batch, batch


class LayerCapture:
    """Per-layer extremes and log-dets of the forwards since the last `reset`, on the outputs' device."""

    def __init__(self, n_layers: int, *, fill: float = math.nan) -> None:
        self.n = n_layers
        self.fill = fill
        self.calls = [0] * n_layers  # host-side: how often each layer ran (a list: cheaper per call)
        self._extrema: Tensor | None = None  # (2, N) min, max; made at the first call, on its device
        self._lows: list[Tensor] = []  # views of _extrema's rows, one per layer
        self._highs: list[Tensor] = []
        self._logdet: list[Tensor | Difference | None] = [None] * n_layers  # each layer's first call
        self._batches = [1] * n_layers
        # A layer's later calls folded as they come (constant memory however many): (Σ, samples).
        self._more: dict[int, tuple[Tensor, int]] = {}
        self._zero: Tensor | None = None

    @property
    def ran(self) -> np.ndarray:
        return np.array(self.calls) > 0

    @property
    def forwards(self) -> int:
        """Forwards folded in: the most calls of any one layer."""
        return max(self.calls, default=0)

    def take(self, index: int, output: Tensor, logdet: Logdet) -> None:
        """One call of layer `index`: device work only (a Difference stays one until the row). The
        common case, a layer's first call of the step on the extrema's device and dtype, is one aminmax."""
        output = output.detach()
        if logdet is None:
            logdet = self._zero_logdet(output)
        elif type(logdet) is not Difference:  # a Difference is subtracted under no_grad at the row
            logdet = logdet.detach()
        if self.calls[index]:
            self._fold(index, output, logdet)
        else:
            extrema = self._extrema
            if extrema is not None and output.dtype is extrema.dtype and output.device == extrema.device:
                # One pass over the output. aminmax, not vector_norm(ord=inf): measured 8 against 170 µs
                # for 49k floats on one CPU thread; both propagate NaN and inf.
                torch.aminmax(output, out=(self._lows[index], self._highs[index]))
            else:
                self._set_extrema(index, output)
            self._logdet[index] = logdet
            self._batches[index] = _batch(output)
        self.calls[index] += 1

    def _fold(self, index: int, output: Tensor, logdet: Tensor | Difference) -> None:
        """A later forward before the step: folded in at once (the slower, rarer path)."""
        self._fold_extrema(index, output)
        value: Tensor = logdet_value(logdet).detach()  # type: ignore[union-attr]
        total, count = _summed(value, _batch(output))
        held = self._more.get(index)
        self._more[index] = (total, count) if held is None else (held[0] + total, held[1] + count)

    def _set_extrema(self, index: int, output: Tensor) -> None:
        """The first layer of a run, a new device, or another dtype than the extrema's."""
        extrema = self._fitting(output)
        if output.dtype is extrema.dtype:
            torch.aminmax(output, out=(self._lows[index], self._highs[index]))
        else:  # float16 or bfloat16 under autocast: reduced in its own dtype, which holds its extremes
            values = torch.aminmax(output)
            self._lows[index].copy_(values.min)
            self._highs[index].copy_(values.max)

    def _fold_extrema(self, index: int, output: Tensor) -> None:
        """A later call of the same layer: the extremes of both (minimum/maximum propagate NaN)."""
        self._fitting(output)
        values = torch.aminmax(output)
        low, high = self._lows[index], self._highs[index]
        torch.minimum(low, values.min.to(low.dtype), out=low)
        torch.maximum(high, values.max.to(high.dtype), out=high)

    def _fitting(self, output: Tensor) -> Tensor:
        """The extrema, made anew where the output is on another device or wider (what they hold is kept)."""
        extrema = self._extrema
        if extrema is None or extrema.device != output.device or _wider(output.dtype, extrema.dtype):
            extrema = self._make_extrema(output)
        return extrema

    def _make_extrema(self, output: Tensor) -> Tensor:
        """(2, N) on the output's device, in float32 (float64 for float64 outputs, whose extremes float32
        would turn into inf)."""
        dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
        extrema = output.new_full((2, self.n), self.fill, dtype=dtype)
        if self._extrema is not None:
            extrema.copy_(self._extrema)
        self._extrema = extrema
        self._lows, self._highs = list(extrema[0].unbind()), list(extrema[1].unbind())
        return extrema

    def _zero_logdet(self, output: Tensor) -> Tensor:
        """A volume-preserving layer's log-det, made once per run."""
        if self._zero is None:
            self._zero = output.new_zeros(())
        return self._zero

    def values(self, like: Tensor) -> list[Tensor]:
        """(3N,) on the device, in parts for the row's one `cat`: every layer's output min, then max,
        then mean log-det (float64); `fill` where a layer did not run."""
        if self._extrema is None:  # no layer ran
            return [like.new_full((3 * self.n,), self.fill, dtype=torch.float64)]
        return [self._extrema.reshape(-1), self._logdet_means(like)]

    @torch.no_grad()
    def _logdet_means(self, like: Tensor) -> Tensor:
        filler = like.new_full((), self.fill, dtype=torch.float64)
        firsts = [filler if v is None else v for v in self._logdet]
        if self._more:  # several forwards
            return self._pooled_means(firsts)
        if not any(isinstance(v, Difference) for v in firsts):  # one forward: every layer at once
            return batch_means(firsts)  # type: ignore[arg-type]
        # Differences of running totals: mean(total) - mean(given), every layer in one go.
        totals = [v.total if isinstance(v, Difference) else v for v in firsts]
        givens = [v.given if isinstance(v, Difference) else filler.new_zeros(()) for v in firsts]
        givens = [g if isinstance(g, Tensor) else filler.new_full((), g) for g in givens]
        means = batch_means(totals + givens)  # one stack where every total and given has one shape
        return means[: self.n] - means[self.n :]

    def _pooled_means(self, firsts: list[Tensor | Difference]) -> Tensor:
        """Each layer's mean over every sample of its calls (several forwards: each weighs its batch)."""
        means = []
        for index, first in enumerate(firsts):
            value: Tensor = logdet_value(first)  # type: ignore[assignment]
            held = self._more.get(index)
            if held is None:
                means.append(value.mean(dtype=torch.float64))
            else:
                total, count = _summed(value, self._batches[index])
                means.append((total + held[0]) / (count + held[1]))
        return torch.stack(means)

    def to_host(self) -> ForwardsRecord:
        """What the forwards left, in one host copy (outside the training step's hot path)."""
        n = self.n
        if self._extrema is None:
            return ForwardsRecord(np.full(n, np.nan), np.full(n, np.nan), self.ran.copy(), self.forwards)
        row = torch.cat([self._extrema.reshape(-1).double(), self._logdet_means(self._extrema)])
        host = row.cpu().numpy()
        max_abs = np.maximum(host[n : 2 * n], -host[:n])
        return ForwardsRecord(max_abs, host[2 * n :].copy(), self.ran.copy(), self.forwards)

    def reset(self) -> None:
        """Ready for the next step's forwards; call after the row's copy (the fill is on the same stream)."""
        self.calls = [0] * self.n
        self._logdet = [None] * self.n
        self._more.clear()
        if self._extrema is not None:
            self._extrema.fill_(self.fill)
