"""cumulative_init and logdet_penalty on each library's own layers."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from flowdiag.stabilize.cumulative_init import cumulative_init
from flowdiag.stabilize.penalty import logdet_penalty, watch_conv_sizes
from tests.flows import tiny_glow
from tests.handwritten_flows import threaded_glow, tuple_glow
from tests.library_flows import freia_graph, freia_sequence, images, nflows_glow, normflows_glow, pyro_flow

BATCH, M = 3, 7  # M · BATCH = 21 is no dimension of any of these models
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, Tensor], object]]] = {
    "normflows": (normflows_glow, lambda m, x: m.inverse_and_log_det(x)),
    "nflows": (nflows_glow, lambda m, x: m._transform(x)),
    "freia": (freia_sequence, lambda m, x: m(x)),
    "freia-graph": (freia_graph, lambda m, x: m(x)),
}


@pytest.mark.parametrize("library", MODELS)
def test_cumulative_init_equals_the_library_init_on_the_concatenation(library: str) -> None:
    build, forward = MODELS[library]
    model = build()
    reference = copy.deepcopy(model).train()
    minibatches = [images(BATCH, seed=seed) for seed in range(M)]
    forward(reference, torch.cat(minibatches))  # the library's own init, on all M · BATCH at once
    figures = cumulative_init(model, minibatches)
    assert figures and all(figure.n_values % (M * BATCH) == 0 for figure in figures)
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-6, atol=1e-9, msg=name)
    # It never initializes again: a second forward leaves every parameter as it is.
    before = copy.deepcopy(model.state_dict())
    model.train()
    forward(model, images(1, seed=99))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)


class _LargestBatch(TorchFunctionMode):
    """Sees every torch op; remembers any tensor whose leading dimension is M · BATCH."""

    def __init__(self) -> None:
        super().__init__()
        self.concatenated = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values(), result) if isinstance(a, Tensor)]
        tensors += [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, Tensor)]
        if any(t.dim() > 0 and t.shape[0] >= M * BATCH for t in tensors):
            self.concatenated = True
        return result


@pytest.mark.parametrize("library", MODELS)
def test_no_layer_sees_more_than_one_minibatch_during_the_init(library: str) -> None:
    model = MODELS[library][0]()
    minibatches = [images(BATCH, seed=seed) for seed in range(M)]
    with _LargestBatch() as watch:
        cumulative_init(model, minibatches)
    assert not watch.concatenated
    # The check itself works: the library's own init on the concatenation trips it.
    with _LargestBatch() as watch:
        MODELS[library][1](copy.deepcopy(model), torch.cat(minibatches))
    assert watch.concatenated


def test_cumulative_init_on_flowdiag_glow_delegates_to_algorithm_1() -> None:
    model = tiny_glow(init=False)
    minibatches = [images(2, seed=seed) for seed in range(3)]
    figures = cumulative_init(model, minibatches)
    assert [f.name for f in figures] == [name for name, _ in model.actnorms()]
    assert all(norm.is_initialized for _, norm in model.actnorms())


def _slogdet(weight: Tensor) -> Tensor:
    return torch.linalg.slogdet(weight.reshape(weight.shape[0], -1).to(torch.float64)).logabsdet


def _normflows_case() -> tuple[nn.Module, Callable[[], object], list[tuple[Tensor, int]]]:
    model = normflows_glow()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_S"):
                p.add_(0.1 * torch.randn_like(p))
    x = images(2)
    convs = [m for m in model.modules() if type(m).__name__ == "Invertible1x1Conv"]
    sizes = {id(m): 4 if m.num_channels == 4 else 1 for m in convs}  # 4 channels at 2x2, 8 at 1x1
    return model, lambda: model.inverse_and_log_det(x), [(m._assemble_W(), sizes[id(m)]) for m in convs]


def _nflows_case() -> tuple[nn.Module, Callable[[], object], list[tuple[Tensor, int]]]:
    model = nflows_glow()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("unconstrained_upper_diag"):
                p.add_(0.3 * torch.randn_like(p))
    x = images(2)
    convs = [m for m in model.modules() if type(m).__name__ == "OneByOneConvolution"]
    return model, lambda: model._transform(x), [(m.weight(), 4) for m in convs]


def _pyro_case() -> tuple[nn.Module, Callable[[], object], list[tuple[Tensor, int]]]:
    modules, distribution = pyro_flow()
    y = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    weights = [(m.permutation @ m.L @ m.U, 16) for m in modules]
    return modules, lambda: distribution.log_prob(y), weights


def _flowdiag_case() -> tuple[nn.Module, Callable[[], object], list[tuple[Tensor, int]]]:
    model = tiny_glow(conv="plain")
    return model, lambda: model(images(2)), [(conv.weight(), conv.pixels) for _, conv in model.inv_convs()]


def _tuple_case() -> tuple[nn.Module, Callable[[], object], list[tuple[Tensor, int]]]:
    model = tuple_glow()  # 8x8: the first block's convs run at 4x4 on 4 channels, the second's at 2x2 on 8
    convs = [m for m in model.modules() if type(m).__name__ == "InvConv2dLU"]
    return (
        model,
        lambda: model(images(2, size=8)),
        [(m.weight(), 16 if m.w_s.numel() == 4 else 4) for m in convs],
    )


def _accumulated_case() -> tuple[nn.Module, Callable[[], object], list[tuple[Tensor, int]]]:
    model = threaded_glow(noise=False)
    convs = [m for m in model.modules() if type(m).__name__ == "InvConv1x1"]
    return (
        model,
        lambda: model(images(2, size=8)),
        [(m.weight(), 16 if m.log_s.numel() == 4 else 4) for m in convs],
    )


PENALTY_CASES = {
    "flowdiag": _flowdiag_case,
    "normflows": _normflows_case,
    "nflows": _nflows_case,
    "pyro": _pyro_case,
    "tuple": _tuple_case,
    "accumulated": _accumulated_case,
}


@pytest.mark.parametrize("library", PENALTY_CASES)
def test_logdet_penalty_equals_the_sum_over_each_library_weight_matrix(library: str) -> None:
    model, forward, weights = PENALTY_CASES[library]()
    watch_conv_sizes(model)  # "auto": hand-written flows are recognized too
    forward()
    penalty = logdet_penalty(model)
    expected = sum((pixels * _slogdet(weight)) ** 2 for weight, pixels in weights)
    torch.testing.assert_close(penalty, expected.to(penalty.dtype), rtol=1e-6, atol=1e-12)
    assert penalty > 0
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_logdet_penalty_is_zero_without_learnable_convs() -> None:
    model = freia_sequence()
    model(images(2))
    assert logdet_penalty(model).item() == 0.0
