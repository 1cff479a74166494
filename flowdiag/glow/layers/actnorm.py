"""ActNorm with the cumulative initialization of Algorithm 1 (Tatsunami & Taki, section 4.2).

z = x * sigma + tau per channel, sigma = exp(log_scale). Statistics are accumulated with
`accumulate` over any number of minibatches and turned into sigma and tau by `finalize`:

    sigma = 1 / sqrt(var + eps),   tau = -sigma * mean         (formula "paper", the default)
    sigma = 1 / (sqrt(var) + eps), tau = -sigma * mean         (formula "glow", official Glow's)

A channel that saw one value (var = 0) gets sigma = 1/sqrt(eps) = 1e3 with the first and
1/eps = 1e6 with the second, at eps = 1e-6.

Sums are pooled (sum and sum of squares over batch and space, divided by the total count), which is
Algorithm 1 exactly when the minibatches have equal sizes and the pooled estimate otherwise. An
uninitialized ActNorm called in a forward pass initializes itself from that one batch: the standard
Glow init, the M = 1 case of the same mechanism.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ActNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6, formula: str = "paper") -> None:
        super().__init__()
        if formula not in ("paper", "glow"):
            raise ValueError(f"ActNorm formula must be 'paper' or 'glow', not {formula!r}")
        self.channels = channels
        self.eps = eps
        self.formula = formula
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.tau = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # Buffers, so a loaded checkpoint never initializes itself again.
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("init_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("init_min_var", torch.tensor(float("nan"), dtype=torch.float64))
        # Accumulators in float64: var = E[x²] - E[x]² cancels badly in float32.
        self.register_buffer("_sum", torch.zeros(channels, dtype=torch.float64), persistent=False)
        self.register_buffer("_sum_sq", torch.zeros(channels, dtype=torch.float64), persistent=False)
        self.register_buffer("_count", torch.tensor(0, dtype=torch.int64), persistent=False)
        # A host-side mirror of `initialized`: reading the buffer in every forward would sync with
        # the device once per layer per step.
        self._ready = False

    @torch.no_grad()
    def accumulate(self, x: Tensor) -> None:
        """Add one minibatch (B, C, H, W) to the running per-channel statistics."""
        x64 = x.detach().to(torch.float64)
        self._sum += x64.sum(dim=(0, 2, 3))
        self._sum_sq += (x64 * x64).sum(dim=(0, 2, 3))
        self._count += x.shape[0] * x.shape[2] * x.shape[3]

    def accumulators(self) -> list[Tensor]:
        """The running sums `accumulate` adds to (Σx, Σx² in float64, the count): what ranks pool."""
        return [self._sum, self._sum_sq, self._count]

    @torch.no_grad()
    def finalize(self) -> None:
        """Set sigma and tau from everything accumulated so far (Algorithm 1, lines 8-9)."""
        count = self._count.to(torch.float64)
        mean = self._sum / count
        var = (self._sum_sq / count - mean * mean).clamp_min(0.0)
        sigma = self.scale_for(var)
        self.log_scale.copy_(torch.log(sigma).view_as(self.log_scale))
        self.tau.copy_((-sigma * mean).view_as(self.tau))
        self.init_count.copy_(self._count)
        self.init_min_var.copy_(var.min())
        self.initialized.fill_(True)
        self._ready = True
        self._sum.zero_()
        self._sum_sq.zero_()
        self._count.zero_()

    def scale_for(self, var: Tensor) -> Tensor:
        """sigma for a (biased) per-channel input variance, by this ActNorm's formula."""
        if self.formula == "glow":
            return 1.0 / (torch.sqrt(var) + self.eps)
        return 1.0 / torch.sqrt(var + self.eps)

    @property
    def is_initialized(self) -> bool:
        return self._ready

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self._ready:
            self.accumulate(x)
            self.finalize()
        z = torch.addcmul(self.tau, x, torch.exp(self.log_scale))  # x·σ + τ in one pass, (B, C, H, W)
        pixels = x.shape[2] * x.shape[3]
        logdet = (pixels * self.log_scale.sum()).expand(x.shape[0])
        return z, logdet

    def reverse(self, z: Tensor) -> Tensor:
        return (z - self.tau) * torch.exp(-self.log_scale)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)
