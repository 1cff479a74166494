"""Which hand-written convention a model follows, from its signatures and one forward on a copy."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from flowdiag.adapters.accumulated_convention import threads_logdet
from flowdiag.adapters.walk import kind_by_class_name


def probe_convention(model: nn.Module, example: Tensor) -> str | None:
    """ "accumulated" if layers take a running `logdet`; "tuple" if a named flow layer returns
    (Tensor, logdet) in one forward; None otherwise. The forward runs on a deep copy, so a data-dependent
    init in it leaves the model untouched."""
    if any(threads_logdet(m) for m in list(model.modules())[1:]):
        return "accumulated"
    probe = copy.deepcopy(model)
    named = [m for m in probe.modules() if kind_by_class_name(m) is not None]
    if not named:
        return None
    seen: list[bool] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        seen.append(
            isinstance(output, tuple)
            and len(output) == 2
            and isinstance(output[0], Tensor)
            and (output[1] is None or isinstance(output[1], Tensor | float | int))
        )

    handles = [m.register_forward_hook(hook) for m in named]
    try:
        with torch.no_grad():
            probe(example)
    finally:
        for handle in handles:
            handle.remove()
    return "tuple" if seen and all(seen) else None
