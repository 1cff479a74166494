"""The training objective, shared by the trainer and the replay: bpd + λ · penalty."""

from __future__ import annotations

from torch import Tensor

from flowdiag.model import Glow, bpd_from_log_prob, dequantize
from flowdiag.penalty import logdet_penalty


def training_loss(model: Glow, images: Tensor, n_bits: int, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean bpd, penalty) for one uint8 minibatch; dequantization draws from the global RNG."""
    x = dequantize(images, n_bits)
    bpd = bpd_from_log_prob(model.log_prob(x), model.n_dims, n_bits).mean()
    penalty = logdet_penalty(model)
    return bpd + lam * penalty, bpd, penalty
