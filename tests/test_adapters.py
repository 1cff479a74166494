"""Every adapter against its real library: the recorded per-layer log-dets add up to the library's own
total log-det of the same forward, and the errors name what was looked for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from flowdiag.adapters import ADAPTER_NAMES, probe_adapter, resolve_adapter
from flowdiag.runtime.errors import UserError
from tests.flows import tiny_glow
from tests.handwritten_flows import AccumulatedGlow, TupleGlow
from tests.library_flows import (
    freia_graph,
    freia_sequence,
    images,
    nflows_glow,
    normflows_glow,
    plain_cnn,
    pyro_flow,
    zuko_flow,
)

# name -> (model, data x, the library's own total data -> latent log-det of one forward, (B,)).
Case = tuple[nn.Module, Tensor, Callable[[], Tensor]]


def _flowdiag() -> Case:
    model, x = tiny_glow(coupling="affine"), images(3)
    return model, x, lambda: model(x)[1]


def _normflows() -> Case:
    model, x = normflows_glow(), images(3)
    return model, x, lambda: model.inverse_and_log_det(x)[1]


def _nflows() -> Case:
    model, x = nflows_glow(), images(3)
    return model, x, lambda: model._transform(x)[1]


def _freia_sequence() -> Case:
    model, x = freia_sequence(), images(3)
    return model, x, lambda: model(x)[1]


def _freia_graph() -> Case:
    model, x = freia_graph(), images(3)
    return model, x, lambda: model(x)[1]


def _zuko() -> Case:
    model, x = zuko_flow(), torch.randn(3, 3, dtype=torch.float64)
    return model, x, lambda: model().transform.call_and_ladj(x)[1]


def _pyro() -> Case:
    modules, distribution = pyro_flow()
    y = torch.randn(3, 4, 4, 4, dtype=torch.float64)

    def total() -> Tensor:
        latent = y
        for t in reversed(distribution.transforms):
            latent = t.inv(latent)
        return distribution.log_prob(y) - distribution.base_dist.log_prob(latent)

    return modules, y, total


def _tuple() -> Case:
    model, x = TupleGlow().double(), images(3, channels=4)
    return model, x, lambda: model(x)[1]


def _accumulated() -> Case:
    model, x = AccumulatedGlow().double(), images(3, channels=4)
    return model, x, lambda: model(x)[1]


CASES: dict[str, Callable[[], Case]] = {
    "flowdiag": _flowdiag,
    "normflows": _normflows,
    "nflows": _nflows,
    "freia": _freia_sequence,
    "freia-graph": _freia_graph,
    "zuko": _zuko,
    "pyro": _pyro,
    "tuple": _tuple,
    "accumulated": _accumulated,
}


@pytest.mark.parametrize("case", CASES)
def test_layer_logdets_add_up_to_the_library_total(case: str) -> None:
    model, x, total = CASES[case]()
    total()  # the first call may run the library's own ActNorm init
    adapter = probe_adapter(model, x) if case in ("tuple", "accumulated") else resolve_adapter(model)
    assert adapter.name == case.split("-")[0]
    recorded: dict[int, Tensor] = {}
    detach = adapter.attach(lambda index, output, logdet: recorded.__setitem__(index, logdet))
    expected = total()
    detach.remove()
    assert sorted(recorded) == list(range(len(adapter.layers())))
    summed = sum(ld.expand_as(expected) for ld in recorded.values() if ld is not None)
    torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-9)
    # Detached: nothing is recorded any more.
    recorded.clear()
    total()
    assert not recorded


def test_flowdiag_adapter_lists_exactly_glow_flow_layers() -> None:
    model = tiny_glow(image_size=8, n_levels=3)
    layers = resolve_adapter(model).layers()
    assert [(layer.name, layer.module) for layer in layers] == model.flow_layers()
    sizes = {layer.name.split(".steps")[0]: layer.pixels for layer in layers}
    assert sizes == {"levels.0": 16, "levels.1": 4, "levels.2": 1}


def test_unknown_adapter_name_is_one_line_naming_the_choices() -> None:
    with pytest.raises(UserError) as error:
        resolve_adapter(tiny_glow(), "tensorflow")
    message = str(error.value)
    assert "\n" not in message and "'tensorflow'" in message
    assert all(name in message for name in ADAPTER_NAMES)


def test_model_without_flow_layers_is_one_line_naming_what_was_looked_for() -> None:
    for example in (None, images(2)):
        with pytest.raises(UserError) as error:
            resolve_adapter(plain_cnn().double(), example=example)
        message = str(error.value)
        assert "\n" not in message and "no recognizable flow layers in Sequential" in message
        assert "normflows" in message and "FrEIA" in message and "accumulated" in message
