"""The one invertibility test base every layer test and every adapter test uses (as nflows'
`TransformTest` and normflows' `FlowTest`): the round trip where a flow has an inverse, the log-det
against the autograd Jacobian (slogdet of `torch.autograd.functional.jacobian` on a tiny float64
input, as zuko's tests), at batch 1; and, for adapters, that the recorded per-layer log-dets add up to
the model's own total and each equals the Jacobian log-det of its layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from flowdiag.adapters.base import FlowAdapter, Logdet, logdet_value
from flowdiag.adapters.walk import output_tensor
from flowdiag.adapters.wrapping import listen

# forward(x) -> (z, logdet): z a tensor or several (flattened and joined), logdet (B,) or a scalar.
Forward = Callable[[Tensor], tuple[Any, Tensor]]


def _flat(z: Any) -> Tensor:
    return output_tensor(z).flatten(1) if not isinstance(z, Tensor) else z.flatten(1)


def assert_round_trip(
    forward: Forward, inverse: Callable[[Any], Tensor], x: Tensor, atol: float = 1e-6
) -> None:
    """inverse(forward(x)) gives x back, and the flow is not the identity (or the check checks nothing)."""
    z, _ = forward(x)
    assert not torch.allclose(_flat(z), x.flatten(1)), (
        "the flow is the identity: the round trip proves nothing"
    )
    torch.testing.assert_close(inverse(z), x, atol=atol, rtol=0)


def assert_logdet_is_jacobian(forward: Forward, x: Tensor, rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """Each sample's log-det is log|det| of the autograd Jacobian of that sample's map (batch 1 calls)."""
    _, logdet = forward(x)
    logdet = logdet.expand(x.shape[0]) if logdet.dim() == 0 else logdet
    for i in range(x.shape[0]):
        one = x[i : i + 1]
        jacobian = torch.autograd.functional.jacobian(lambda v: _flat(forward(v)[0]).flatten(), one)
        expected = torch.linalg.slogdet(jacobian.reshape(one.numel(), one.numel())).logabsdet
        torch.testing.assert_close(logdet[i], expected.to(logdet.dtype), rtol=rtol, atol=atol)
        _, alone = forward(one)  # batch 1 gives the same log-det as within the batch
        torch.testing.assert_close(alone.reshape(()), logdet[i], rtol=1e-9, atol=1e-9)


def recorded_logdets(adapter: FlowAdapter, run: Callable[[], Any]) -> dict[int, Tensor]:
    """Every layer's log-det as the adapter reports it in one run (None counts as 0)."""
    recorded: dict[int, Tensor] = {}

    def capture(index: int, output: Tensor, logdet: Logdet) -> None:
        assert index not in recorded, f"layer {index} ran twice in one forward"
        value = logdet_value(logdet)
        recorded[index] = output.new_zeros(()) if value is None else value

    detach = adapter.attach(capture)
    try:
        run()
    finally:
        detach.remove()
    return recorded


def assert_logdets_add_up(
    adapter: FlowAdapter, run: Callable[[], Any], total: Tensor, rtol: float = 1e-6
) -> None:
    """Every listed layer reports once, and the reports add up to the model's own total (B,)."""
    recorded = recorded_logdets(adapter, run)
    assert sorted(recorded) == list(range(len(adapter.layers())))
    summed = sum(logdet.expand_as(total) for logdet in recorded.values())
    torch.testing.assert_close(summed.to(total.dtype), total, rtol=rtol, atol=1e-8)  # type: ignore[union-attr]


def _layer_input(
    adapter: FlowAdapter, module: nn.Module, seen: dict[int, Tensor], index: int
) -> Callable[[], None]:
    """Remember the first tensor `module` is given data -> latent (normflows: its `inverse`)."""

    def keep(args: tuple, kwargs: dict | None = None) -> None:
        first = args[0] if args else next(iter((kwargs or {}).values()))
        seen.setdefault(index, first[0] if isinstance(first, tuple | list) else first)

    if adapter.name == "normflows":
        return listen(module, "inverse", before=keep)
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: keep(args, kwargs), with_kwargs=True)
    return handle.remove


def _jacobian_logdet(output: Tensor, given: Tensor) -> Tensor:
    rows = [torch.autograd.grad(value, given, retain_graph=True)[0].flatten() for value in output.flatten()]
    return torch.linalg.slogdet(torch.stack(rows)).logabsdet


def assert_layer_logdets_are_jacobians(adapter: FlowAdapter, run: Callable[[Tensor], Any], x: Tensor) -> None:
    """At batch 1, each layer's recorded log-det (with those of the listed layers inside it: a step's
    ActNorm and conv) equals log|det| of the Jacobian of its output with respect to its input."""
    assert x.shape[0] == 1
    layers, inputs, outputs, logdets = adapter.layers(), {}, {}, {}
    undo = [_layer_input(adapter, layer.module, inputs, i) for i, layer in enumerate(layers)]

    def capture(index: int, output: Tensor, logdet: Logdet) -> None:
        value = logdet_value(logdet)
        outputs[index], logdets[index] = output, output.new_zeros(()) if value is None else value

    detach = adapter.attach(capture)
    try:
        run(x.clone().requires_grad_(True))
    finally:
        detach.remove()
        for remove in undo:
            remove()
    checked = 0
    for i, layer in enumerate(layers):
        if layer.kind == "split" or i not in inputs or inputs[i].numel() != outputs[i].numel():
            continue  # a split's increment is its prior's log-likelihood, not a Jacobian
        inside = {id(m) for m in layer.module.modules()}
        own = sum(logdets[j].reshape(()) for j, other in enumerate(layers) if id(other.module) in inside)
        torch.testing.assert_close(
            own, _jacobian_logdet(outputs[i], inputs[i]).to(own.dtype), rtol=1e-5, atol=1e-7
        )  # type: ignore[union-attr]
        checked += 1
    assert checked, "no layer was checked"
