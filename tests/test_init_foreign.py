"""Algorithm 1 on hand-written flows: the result is the flow's own init on the concatenation, the user's
minibatches are never changed, the cost stays within 3x the M forwards, a model that is no sequence of
units falls back to exact per-ActNorm passes, and a failure leaves every ActNorm as it was."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from flowdiag.adapters import resolve_adapter
from flowdiag.stabilize.audit import audit
from flowdiag.stabilize.cumulative_init import cumulative_init
from tests.handwritten_flows import ActNorm, threaded_glow, tuple_glow
from tests.library_flows import images

M, BATCH = 5, 3


def _minibatches(size: int = 8) -> list[Tensor]:
    return [images(BATCH, size=size, seed=seed) for seed in range(M)]


def _assert_same_parameters(model: nn.Module, reference: nn.Module) -> None:
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-9, atol=1e-12, msg=name)


FLOWS: dict[str, Callable[[], nn.Module]] = {
    "accumulated": lambda: threaded_glow(noise=False),
    "tuple": tuple_glow,
}


@pytest.mark.parametrize("flow", FLOWS)
def test_equals_the_flows_own_init_on_the_concatenation(flow: str) -> None:
    model = FLOWS[flow]()
    reference = copy.deepcopy(model).train()
    minibatches = _minibatches()
    reference(torch.cat(minibatches))  # every ActNorm initializes itself: the flow's own init, all at once
    figures = cumulative_init(model, minibatches)
    assert len(figures) == len(resolve_adapter(model).actnorms())
    _assert_same_parameters(model, reference)
    assert all(figure.n_values % (M * BATCH) == 0 for figure in figures)


def _conv_calls(model: nn.Module, run: Callable[[], object]) -> int:
    calls = [0]
    hooks = [
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls[0]


def test_costs_at_most_3x_the_m_forwards_on_24_actnorms_and_leaves_the_minibatches_alone() -> None:
    model = threaded_glow(noise=True, steps=4)  # 2 levels x 4 steps x 3 ActNorms (2 in each network)
    assert len(resolve_adapter(model).actnorms()) == 24
    minibatches = _minibatches()
    originals = [x.clone() for x in minibatches]
    plain = _conv_calls(model, lambda: [model(x.clone()) for x in copy.deepcopy(minibatches)])
    fresh = copy.deepcopy(model)
    walked = _conv_calls(model, lambda: cumulative_init(model, minibatches))
    # The compute is in the convolutions: count their calls against M plain forwards.
    assert walked <= 3 * plain, (walked, plain)
    assert all(torch.equal(x, y) for x, y in zip(minibatches, originals, strict=True))  # noise added in place
    slow = resolve_adapter(fresh)
    slow.units = lambda: []  # type: ignore[method-assign]  # no units: an ActNorm at a time, from the start
    assert _conv_calls(fresh, lambda: cumulative_init(fresh, minibatches, adapter=slow)) > 3 * plain


class _Dense(nn.Module):
    """Three ActNorms, the third fed by the first's output too: no sequence of units."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = ActNorm(2), ActNorm(2), ActNorm(2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1, l1 = self.a(x)
        h2, l2 = self.b(h1 * 2.0)
        h3, l3 = self.c(h2 + h1)
        return h3, l1 + l2 + l3


def test_a_model_that_is_no_sequence_of_units_falls_back_exactly() -> None:
    model = _Dense().double()
    reference = copy.deepcopy(model)
    minibatches = _minibatches(size=4)
    minibatches = [x.repeat(1, 2, 1, 1) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) for x in minibatches]
    reference(torch.cat(minibatches))
    cumulative_init(model, minibatches)
    _assert_same_parameters(model, reference)


def test_a_failing_forward_leaves_every_actnorm_as_it_was() -> None:
    model = threaded_glow(noise=False)
    before = copy.deepcopy(model.state_dict())
    calls = [0]

    def fail_from_the_second_call(module: nn.Module, args: tuple) -> None:
        calls[0] += 1
        if calls[0] >= 2:
            raise RuntimeError("a bug in the user's model")

    model.flow.layers[5].register_forward_pre_hook(fail_from_the_second_call)  # a step of the second level
    with pytest.raises(RuntimeError, match="a bug in the user's model"):
        cumulative_init(model, _minibatches())
    norms = resolve_adapter(model).actnorms()
    assert not any(
        norm.is_initialized() for norm in norms
    )  # none would initialize itself on the next forward
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert model.training


def test_audit_finds_the_one_value_actnorms_of_a_threaded_glow_with_auto() -> None:
    model = threaded_glow(noise=False)  # 4x4 images: the second level runs at 1x1
    result = audit(model, images(1, size=4))
    assert result.adapter == "accumulated"
    at_risk = {norm.name for norm in result.actnorms if norm.at_risk}
    assert at_risk == {
        norm.name
        for norm in resolve_adapter(model).actnorms()
        if ".layers.5" in norm.name or ".layers.6" in norm.name
    }
    assert result.min_safe_init_batches == 2
    assert not any(
        norm.is_initialized() for norm in resolve_adapter(model).actnorms()
    )  # the model is untouched
