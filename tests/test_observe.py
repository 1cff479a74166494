"""Wrapped forwards (flowdiag.adapters.observe) see what hooks see, and the Monitor's in-place
extrema record each layer's true max |output| in every dtype."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flowdiag import Monitor
from flowdiag.adapters.observe import observe_call, observe_output
from flowdiag.glow.model import dequantize
from flowdiag.record.store import read_run
from flowdiag.runtime.files import RUN_FILE

from .flows import tiny_glow, tiny_images


def test_the_wrapper_reports_every_output_and_unwraps() -> None:
    layer, seen = nn.Linear(3, 2), []
    remove = observe_output(layer, seen.append)
    assert "forward" in layer.__dict__  # the fast path: an instance forward, no hook
    assert not layer._forward_hooks
    y = layer(torch.ones(1, 3))
    assert len(seen) == 1 and seen[0] is y
    remove()
    assert "forward" not in layer.__dict__
    layer(torch.ones(1, 3))
    assert len(seen) == 1


def test_a_deep_copy_runs_its_own_weights() -> None:
    layer, seen = nn.Linear(3, 2), []
    remove = observe_output(layer, seen.append)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.fill_(2.0)
        twin.bias.zero_()
    assert torch.equal(twin(torch.ones(1, 3)), torch.full((1, 2), 6.0))
    assert len(seen) == 1  # and reports to the same observer, as a copied hook would
    remove()


def test_another_wrapper_is_chained_and_given_back() -> None:
    layer, calls = nn.Linear(3, 2), []
    original = layer.forward

    def theirs(x: torch.Tensor) -> torch.Tensor:
        calls.append("theirs")
        return original(x)

    layer.forward = theirs
    remove = observe_output(layer, lambda output: calls.append("ours"))
    layer(torch.ones(1, 3))
    assert calls == ["theirs", "ours"]
    remove()
    assert layer.forward is theirs


def test_an_output_changed_by_a_hook_is_what_is_seen() -> None:
    layer, seen = nn.Linear(3, 2), []
    layer.register_forward_hook(lambda module, args, output: output * 0 + 7)
    remove = observe_output(layer, seen.append)
    layer(torch.ones(1, 3))
    assert torch.equal(seen[0], torch.full((1, 2), 7.0))
    remove()


def _record_one_step(model: nn.Module, x: torch.Tensor, out: Path) -> tuple[np.ndarray, list[float]]:
    """The Monitor's max |output| per layer, and the same from plain forward hooks."""
    expected: dict[str, float] = {}
    handles = [
        module.register_forward_hook(
            lambda m, a, output, name=name: expected.__setitem__(name, float(output[0].detach().abs().max()))
        )
        for name, module in model.flow_layers()
    ]
    with Monitor(model, out) as monitor:
        loss = -model.log_prob(x).mean()
        loss.backward()
        monitor.step(loss)
        recorded = monitor.last.max_abs
    for handle in handles:
        handle.remove()
    return recorded, [expected[name] for name, _ in model.flow_layers()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_record_is_each_layers_max_abs(dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny_glow().to(dtype)
    x = dequantize(tiny_images(4), 8).to(dtype)
    recorded, expected = _record_one_step(model, x, tmp_path / "run")
    np.testing.assert_array_equal(recorded, expected)


def test_float64_extremes_beyond_float32_stay_finite(tmp_path: Path) -> None:
    model = tiny_glow()  # float64
    x = dequantize(tiny_images(4), 8).double() * 1e300  # far past float32's 3.4e38
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "overflow encountered in cast"
        recorded, expected = _record_one_step(model, x, tmp_path / "run")
    assert np.isfinite(recorded[0]) and recorded[0] > 1e299
    np.testing.assert_array_equal(recorded, expected)
    # The file stores float32: a finite value past its range is saved as float32's largest, not inf.
    stored = read_run(tmp_path / "run" / RUN_FILE).max_abs[0]
    assert np.isfinite(stored).all()
    assert stored[0] == np.finfo(np.float32).max


def test_bfloat16_outputs_are_recorded(tmp_path: Path) -> None:
    model = tiny_glow().float()
    x = dequantize(tiny_images(4), 8).float()
    expected: list[float] = []
    handles = [
        module.register_forward_hook(
            lambda m, a, output: expected.append(float(output[0].detach().abs().max()))
        )
        for _, module in model.flow_layers()
    ]
    with Monitor(model, tmp_path / "run") as monitor, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = -model.log_prob(x).float().mean()
        loss.backward()
        monitor.step(loss)
    for handle in handles:
        handle.remove()
    assert np.isfinite(monitor.last.max_abs).all()
    np.testing.assert_array_equal(monitor.last.max_abs, expected)


def test_a_call_observer_sees_arguments_and_output_and_stays_on_the_fast_path() -> None:
    layer, seen = nn.Linear(3, 2), []
    remove = observe_call(
        layer,
        lambda args, kwargs: seen.append(("before", args[0])),
        lambda args, kwargs, out: seen.append(("after", out)),
    )
    assert "forward" in layer.__dict__ and not layer._forward_hooks
    x = torch.ones(1, 3)
    y = layer(x)
    assert [tag for tag, _ in seen] == ["before", "after"] and seen[0][1] is x and seen[1][1] is y
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.fill_(1.0)
    assert torch.equal(twin(x), torch.ones(1, 2))  # the copy runs its own weights
    remove()
    layer(x)
    assert len(seen) == 4  # two calls: the original's and the copy's, nothing after removal


def test_wrappers_removed_out_of_order_leave_the_others_working() -> None:
    layer, seen = nn.Linear(3, 2), []
    first = observe_call(layer, lambda args, kwargs: seen.append("first"), lambda args, kwargs, out: None)
    second = observe_output(layer, lambda output: seen.append("second"))
    first()  # the one underneath goes first: taken out of the chain
    layer(torch.ones(1, 3))
    assert seen == ["second"]
    second()
    assert "forward" not in layer.__dict__  # nothing of flowdiag's is left
    layer(torch.ones(1, 3))
    assert seen == ["second"]
