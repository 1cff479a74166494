"""The log-Jacobian-determinant penalty of eq. (2): λ · Σ over 1x1 convs of (h · w · log|det W|)².

For the LU form log|det W| = Σ log|u|, so the gradient reaches only the log|u| parameters. It pulls
each W towards |det W| = 1 while the conv keeps shuffling channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiag.glow.model import Glow


def conv_logdets(model: Glow) -> Tensor:
    """h · w · log|det W| of every 1x1 conv at the spatial size it runs at, in forward order."""
    return torch.stack([conv.pixels * conv.log_abs_det() for _, conv in model.inv_convs()])


def logdet_penalty(model: Glow) -> Tensor:
    """Σ (h · w · log|det W|)², without λ."""
    return (conv_logdets(model) ** 2).sum()
