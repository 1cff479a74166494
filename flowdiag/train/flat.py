"""A model's trainable parameters as views into one tensor, and their gradients into another.

A Glow has hundreds of small parameter tensors (each ActNorm two, each LU conv three, each coupling
net nine); the optimizer, the gradient norm and zero_grad each loop over them in Python, which on
the small models of this project cost more than the arithmetic (measured: RAdam's step took a fifth
of a digits training step). Over one flat tensor each is one operation. Element-wise optimizers
(Adam, RAdam) give the same numbers either way.

Autograd accumulates into an existing `.grad` in place, so a parameter whose `.grad` is a view into
the flat gradient keeps writing there; zero that flat gradient instead of setting grads to None.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatParameters:
    def __init__(self, parameters: list[nn.Parameter]) -> None:
        if not parameters:
            raise ValueError("no trainable parameters to flatten")
        with torch.no_grad():
            self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in parameters]))
            self.flat.grad = torch.zeros_like(self.flat)
            offset = 0
            for p in parameters:
                n = p.numel()
                p.data = self.flat.data[offset : offset + n].view_as(p)  # shares the flat storage
                p.grad = self.flat.grad[offset : offset + n].view_as(p)
                offset += n

    def zero_grad(self) -> None:
        assert self.flat.grad is not None
        self.flat.grad.zero_()
