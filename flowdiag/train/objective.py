"""The training objective, shared by the trainer and the replay: bpd + λ · penalty."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowdiag.glow.model import Glow, bpd_from_log_prob, dequantize
from flowdiag.stabilize.penalty import logdet_penalty


def training_loss(
    model: Glow,
    images: Tensor,
    n_bits: int,
    lam: float,
    log_prob: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean bpd, penalty) for one uint8 minibatch; dequantization draws from the global RNG.

    `log_prob`: the model's log-density as the trainer runs it (compiled, say); default the model's own.
    """
    x = dequantize(images, n_bits)
    bpd = bpd_from_log_prob((log_prob or model.log_prob)(x), model.n_dims, n_bits).mean()
    if lam == 0:  # recorded, not trained on: no graph for the backward to walk
        with torch.no_grad():
            return bpd, bpd, logdet_penalty(model)
    penalty = logdet_penalty(model)
    return bpd + lam * penalty, bpd, penalty
