"""The training minibatches: a seeded, resumable stream of indices (a fresh permutation each epoch),
and each rank's share of it on its device."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowdiag.runtime.distributed import SINGLE, Ranks


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


class Batches:
    """One rank's training minibatches, on its device: its slice of each global batch (batch size x
    ranks) of one seeded stream, so ranks draw disjoint minibatches and one checkpointed stream
    resumes them all."""

    def __init__(
        self, images: Tensor, batch_size: int, seed: int, device: torch.device, ranks: Ranks = SINGLE
    ) -> None:
        self.images = images
        self.device = device
        self.stream = BatchStream(len(images), batch_size * ranks.world, seed)
        self._mine = slice(ranks.rank * batch_size, (ranks.rank + 1) * batch_size)

    def next(self) -> Tensor:
        """The next uint8 minibatch, on the device."""
        indices = self.stream.next_indices()[self._mine]
        return self.images[indices].to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
