"""Every adapter against its real library or a flow written in its convention, through the shared
invertibility base: the recorded per-layer log-dets add up to the model's own total log-det of the same
forward, each equals the Jacobian log-det of its layer, and "auto" finds the adapter with no forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from flowdiag.adapters import ADAPTER_NAMES, resolve_adapter
from flowdiag.adapters.transformer import TransformerAdapter
from flowdiag.runtime.errors import UserError
from tests.flows import tiny_glow
from tests.handwritten_flows import tarflow, threaded_glow, tuple_glow
from tests.invertibility import assert_layer_logdets_are_jacobians, assert_logdets_add_up
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


@dataclass
class Case:
    model: nn.Module
    x: Tensor
    run: Callable[[Tensor], Any]  # one data -> latent forward, as the library's users call it
    total: Callable[[Tensor], Tensor]  # the library's own total log-det of that forward, (B,)
    adapter: str
    layer_jacobians: bool = True  # pyro and zuko: their layers' inputs are not a call flowdiag hooks


def _flowdiag() -> Case:
    model = tiny_glow(coupling="affine")
    return Case(model, images(3), model, lambda x: model(x)[1], "flowdiag")


def _normflows() -> Case:
    model = normflows_glow()
    return Case(
        model, images(3), model.inverse_and_log_det, lambda x: model.inverse_and_log_det(x)[1], "normflows"
    )


def _nflows() -> Case:
    model = nflows_glow()
    return Case(model, images(3), model._transform, lambda x: model._transform(x)[1], "nflows")


def _freia(build: Callable[[], nn.Module]) -> Callable[[], Case]:
    def case() -> Case:
        model = build()
        return Case(model, images(3), model, lambda x: model(x)[1], "freia")

    return case


def _zuko() -> Case:
    model = zuko_flow()

    def run(x: Tensor) -> Any:
        return model().transform.call_and_ladj(x)

    return Case(model, torch.randn(3, 3, dtype=torch.float64), run, lambda x: run(x)[1], "zuko", False)


def _pyro() -> Case:
    modules, distribution = pyro_flow()

    def total(y: Tensor) -> Tensor:
        latent = y
        for t in reversed(distribution.transforms):
            latent = t.inv(latent)
        return distribution.log_prob(y) - distribution.base_dist.log_prob(latent)

    return Case(modules, torch.randn(3, 4, 4, 4, dtype=torch.float64), total, total, "pyro", False)


def _tuple(affine: bool) -> Callable[[], Case]:
    def case() -> Case:
        model = tuple_glow(affine=affine)
        return Case(model, images(3, size=8), model, lambda x: model(x)[1], "tuple")

    return case


def _accumulated() -> Case:
    model = threaded_glow(noise=False)
    return Case(model, images(3, size=8), model, lambda x: model.flow(x, logdet=0.0)[1], "accumulated")


def _transformer(logdet: str, extra: bool = False) -> Callable[[], Case]:
    def case() -> Case:
        model = tarflow(logdet=logdet, extra=extra)
        dims = 16 if logdet == "mean" else 1  # TarFlow's per-dimension mean: T · D = 4 tokens · 4 values
        return Case(model, images(3), model, lambda x: model(x)[2] * dims, "transformer")

    return case


CASES: dict[str, Callable[[], Case]] = {
    "flowdiag": _flowdiag,
    "normflows": _normflows,
    "nflows": _nflows,
    "freia": _freia(freia_sequence),
    "freia-graph": _freia(freia_graph),
    "zuko": _zuko,
    "pyro": _pyro,
    "tuple-affine": _tuple(True),
    "tuple-additive": _tuple(False),
    "accumulated": _accumulated,
    "transformer-mean": _transformer("mean"),
    "transformer-token": _transformer("token"),
    "transformer-element-3-tuple": _transformer("element", extra=True),
}


@pytest.mark.parametrize("name", CASES)
def test_layer_logdets_add_up_to_the_library_total(name: str) -> None:
    case = CASES[name]()
    case.run(case.x)  # the first call may run the library's own ActNorm init
    adapter = resolve_adapter(case.model)  # "auto": no forward needed
    assert adapter.name == case.adapter
    assert_logdets_add_up(adapter, lambda: case.run(case.x), case.total(case.x).detach())
    recorded: list[int] = []
    adapter.attach(lambda index, output, logdet: recorded.append(index)).remove()
    case.run(case.x)
    assert not recorded  # detached: nothing is recorded any more


@pytest.mark.parametrize("name", [name for name in CASES if name not in ("zuko", "pyro")])
def test_each_layer_logdet_is_its_jacobian_at_batch_1(name: str) -> None:
    case = CASES[name]()
    case.run(case.x)
    assert_layer_logdets_are_jacobians(resolve_adapter(case.model), case.run, case.x[:1])


def test_accumulated_lists_flow_layers_only_and_the_split_with_its_prior() -> None:
    model = threaded_glow(noise=False)
    adapter = resolve_adapter(model)
    names = {layer.name: layer.kind for layer in adapter.layers()}
    assert not any(".block." in name for name in names)  # ActNorms inside coupling networks are no layers
    assert names["flow.layers.1.actnorm"] == "actnorm" and names["flow.layers.1"] == "coupling"
    assert names["flow.layers.3"] == "split"
    # ... but Algorithm 1 initializes them: 3 ActNorms a step, 2 of them in the network.
    assert len(adapter.actnorms()) == 3 * 4
    assert sum(".block." in norm.name for norm in adapter.actnorms()) == 2 * 4


def test_transformer_blocks_with_a_summed_logdet_take_an_instance() -> None:
    model, x = tarflow(), images(2)
    summed = TransformerAdapter(model, logdet="sum")
    recorded = []
    summed.attach(lambda index, output, logdet: recorded.append(logdet)).remove()
    detach = summed.attach(lambda index, output, logdet: recorded.append(logdet))
    total = model(x)[2]
    detach.remove()
    torch.testing.assert_close(sum(recorded), total)  # taken as given: the model's own units


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
    with pytest.raises(UserError) as error:
        resolve_adapter(plain_cnn().double())
    message = str(error.value)
    assert "\n" not in message and "no recognizable flow layers in Sequential" in message
    assert "normflows" in message and "FrEIA" in message and "logdet" in message and "attention" in message
    assert "FlowAdapter" in message  # the way to support a flow flowdiag does not know


def test_the_run_file_takes_every_kind_an_adapter_gives() -> None:
    """A split is stored as a split: the store's kinds and the adapters' are one list."""
    import typing

    from flowdiag.adapters.base import LayerKind
    from flowdiag.record.store import LAYER_KINDS

    assert typing.get_args(LayerKind) == LAYER_KINDS
