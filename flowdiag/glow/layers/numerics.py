"""The one numerical rule the layers share under reduced precision (`--precision bf16|fp16`)."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """float32 for a reduced-precision tensor (autocast's float16 or bfloat16), unchanged for float32 and
    float64 (no copy): log-dets and Gaussian log-densities are summed from it, never in 16 bits."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
