"""Reduced-precision training: autocast for the forward and backward, a gradient scaler for fp16.

Glow users meet NaN most often here: float16's largest finite value is 65504, and a deep flow's
activations pass it long before float32's 3.4e38. The model keeps its log-dets and Gaussian priors in
float32 (`flowdiag.glow.layers.numerics`), so what overflows is the activations, which the recorder sees.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import FORMAT_NAMES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def check_supported(device: torch.device, precision: str) -> None:
    """A one-line error, naming the alternative, where this device cannot convolve in the format."""
    if precision == "fp32":
        return
    try:
        with autocast(device, precision):
            torch.nn.functional.conv2d(
                torch.ones(1, 1, 2, 2, device=device), torch.ones(1, 1, 1, 1, device=device)
            )
    except RuntimeError:
        other = "bf16" if precision == "fp16" else "fp32"
        raise UserError(
            f"--precision {precision}: this {device.type} cannot compute in {FORMAT_NAMES[precision]}; "
            f"use --precision {other}"
        ) from None


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 only: bfloat16 has float32's range, so its gradients need no scaling."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
