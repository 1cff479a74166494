"""A seeded, resumable stream of minibatch indices: a fresh permutation each epoch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class BatchStream:
    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        if n_items < 1:
            raise ValueError("no training images")
        self.n_items = n_items
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(n_items, generator=self._generator)
        self._position = 0
        self.epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n_items // self.batch_size)

    def next_indices(self) -> Tensor:
        """The next `batch_size` indices; an epoch boundary starts a new permutation mid-batch."""
        parts = []
        needed = self.batch_size
        while needed > 0:
            if self._position >= self.n_items:
                self._order = torch.randperm(self.n_items, generator=self._generator)
                self._position = 0
                self.epoch += 1
            take = min(needed, self.n_items - self._position)
            parts.append(self._order[self._position : self._position + take])
            self._position += take
            needed -= take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._generator.get_state(),
            "order": self._order,
            "position": self._position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        self._order = state["order"]
        self._position = state["position"]
        self.epoch = state["epoch"]
