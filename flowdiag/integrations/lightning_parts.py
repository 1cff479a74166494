"""What `FlowdiagCallback` reads from a Lightning fit, apart from the hooks: the flow inside the module,
the data-parallel ranks, the run's settings, Algorithm 1's minibatches and the penalty. Lightning
objects are only read here through their public attributes and hooks; nothing imports Lightning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowdiag.adapters.base import FlowAdapter
from flowdiag.runtime.distributed import SINGLE, Ranks
from flowdiag.runtime.errors import UserError
from flowdiag.stabilize.penalty import logdet_penalty, watch_conv_sizes

Inputs = Callable[[Any], Tensor]  # a train-dataloader batch (on the device) -> the flow's input


def flow_of(module: nn.Module, attribute: str | None) -> nn.Module:
    """The flow the Monitor watches: the LightningModule itself, or its (dotted) attribute."""
    if attribute is None:
        return module
    found: Any = module
    for part in attribute.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, nn.Module):
        raise UserError(
            f"FlowdiagCallback(flow={attribute!r}): {type(module).__name__} has no module there; "
            "name the attribute that holds the flow, e.g. flow='model'"
        )
    return found


def ranks_of(trainer: Any) -> Ranks:
    """This process among the fit's data-parallel ranks (Lightning set up the process group)."""
    if trainer.world_size <= 1:
        return SINGLE
    return Ranks(rank=trainer.global_rank, world=trainer.world_size, local_rank=trainer.local_rank)


def total_steps(trainer: Any) -> int:
    """The optimizer steps the fit will make (max_steps, or what its epochs come to); -1 unknown."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else -1


def run_config(trainer: Any, init_batches: int | None, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run file's settings: what `flowdiag report` labels and groups runs by (M, batch size, seed),
    and how Lightning ran the steps; `extra` (the user's own sections) is merged over it."""
    train: dict[str, Any] = {
        # Without Algorithm 1 an ActNorm initializes itself from its first minibatch: M = 1.
        "init_batches": init_batches or 1,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "world_size": trainer.world_size,
    }
    batch_size = getattr(trainer.train_dataloader, "batch_size", None)
    if isinstance(batch_size, int):
        train["batch_size"] = batch_size
    seed = os.environ.get("PL_GLOBAL_SEED", "")  # what lightning.seed_everything set
    if seed.isdigit():
        train["seed"] = int(seed)
    config: dict[str, Any] = {"train": train, "lightning": {"precision": str(trainer.precision)}}
    for section, values in (extra or {}).items():
        merged = config.get(section, {})
        config[section] = {**merged, **values} if isinstance(values, Mapping) else values
    return config


def first_tensor(batch: Any) -> Tensor:
    """The default flow input of a batch: the batch itself, or the first item of a tuple or list."""
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise UserError(
            f"FlowdiagCallback(init_batches=...) cannot tell the flow's input in a {type(batch).__name__} "
            "batch: pass inputs=lambda batch: ... giving the tensor training_step feeds the flow"
        )
    return batch


def init_minibatches(trainer: Any, module: Any, count: int, inputs: Inputs) -> list[Tensor]:
    """The first `count` batches of the fit's train dataloader (this rank's shard under DDP), moved to
    the device through the module's own transfer hooks, as `inputs` makes them flow inputs."""
    loader = trainer.train_dataloader
    if loader is None:
        raise UserError("FlowdiagCallback(init_batches=...) found no train dataloader in this fit")
    batches: list[Tensor] = []
    for batch in loader:
        if len(batches) == count:
            break
        batch = module.on_before_batch_transfer(batch, 0)
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        batches.append(inputs(module.on_after_batch_transfer(batch, 0)))
    if len(batches) < count:
        raise UserError(
            f"FlowdiagCallback(init_batches={count}): the train dataloader gives only {len(batches)} "
            "batches; lower init_batches"
        )
    return batches


def mark_initialized(adapter: FlowAdapter) -> None:
    """A resumed fit's ActNorms come from the checkpoint: keep them from initializing themselves again
    (a plain `inited` attribute, as y0ast's Glow has, is not in a state_dict)."""
    for norm in adapter.actnorms():
        norm.set_initialized(True)


class ConvPenalty:
    """Σ (h·w·log|det W|)² over the flow's 1x1 convs, without λ, as `flowdiag train` records it: on the
    device (no sync), None for a flow without such convs or while a conv's h·w is still unknown. Made
    before the first forward, so that it sees every conv run."""

    def __init__(self, flow: nn.Module, adapter: FlowAdapter) -> None:
        self.flow, self.adapter = flow, adapter
        self.has_convs = bool(adapter.invconvs())
        if self.has_convs:
            watch_conv_sizes(flow, adapter=adapter)

    def __call__(self) -> Tensor | None:
        if not self.has_convs:
            return None
        with torch.no_grad():
            try:
                return logdet_penalty(self.flow, adapter=self.adapter)
            except UserError:
                return None
