"""Adapters are values: a flow flowdiag does not know takes a small FlowAdapter of the user's own, and
every entry point (Monitor, cumulative_init, logdet_penalty, audit) accepts that instance."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import flowdiag
from flowdiag.adapters import resolve_adapter
from flowdiag.adapters.base import ActNormAccess, Capture, Detach, FlowAdapter, FlowLayer
from flowdiag.adapters.handwritten import LocScaleActNorm
from flowdiag.record.store import read_run
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from tests.handwritten_flows import ActNorm
from tests.library_flows import images


class Normalize(ActNorm):
    """An ActNorm under a name no adapter looks for."""


class Mix(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(channels, channels))[0] * 1.2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight).logabsdet
        return torch.einsum("ij,bjhw->bihw", self.weight, x), logdet


class Chain(nn.Module):
    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.parts = nn.ModuleList([Normalize(channels), Mix(channels), Normalize(channels), Mix(channels)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for part in self.parts:
            x, logdet = part(x)
            total = total + logdet
        return x, total


class ChainAdapter(FlowAdapter):
    """What a user writes for their own flow: its layers, how to watch them, its ActNorms and convs."""

    name = "chain"

    def __init__(self, model: Chain) -> None:
        super().__init__(model)
        self._layers = [
            FlowLayer(f"parts.{i}", "actnorm" if isinstance(part, Normalize) else "invconv", part)
            for i, part in enumerate(model.parts)
        ]

    @classmethod
    def recognizes(cls, model: nn.Module) -> bool:
        return isinstance(model, Chain)

    def layers(self) -> list[FlowLayer]:
        return self._layers

    def attach(self, capture: Capture) -> Detach:
        handles = [
            layer.module.register_forward_hook(lambda m, args, out, i=i: capture(i, out[0], out[1]))
            for i, layer in enumerate(self._layers)
        ]
        return Detach([handle.remove for handle in handles])

    def actnorms(self) -> list[ActNormAccess]:
        return [
            LocScaleActNorm(layer.name, layer.module) for layer in self._layers if layer.kind == "actnorm"
        ]

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        return [
            (layer.name, torch.linalg.slogdet(layer.module.weight).logabsdet) for layer in self.invconvs()
        ]


def _data(seed: int, n: int = 3) -> Tensor:
    return images(n, channels=2, seed=seed) * torch.tensor([1.0, 4.0], dtype=torch.float64).view(1, 2, 1, 1)


def test_auto_does_not_know_it_and_says_how_to_teach_it() -> None:
    with pytest.raises(UserError, match="FlowAdapter"):
        resolve_adapter(Chain().double())


def test_every_entry_point_takes_the_instance(tmp_path: Path) -> None:
    model = Chain().double()
    reference = copy.deepcopy(model)
    minibatches = [_data(seed) for seed in range(4)]
    report = flowdiag.audit(model, minibatches[0], adapter=ChainAdapter(model))
    assert report.adapter == "chain" and [norm.name for norm in report.actnorms] == ["parts.0", "parts.2"]
    untouched = ChainAdapter(model).actnorms()
    assert not any(norm.is_initialized() for norm in untouched)  # the audit left the model alone
    figures = flowdiag.cumulative_init(model, minibatches, adapter=ChainAdapter(model))
    reference(torch.cat(minibatches))  # the flow's own init on the concatenation
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], msg=name)
    assert [figure.n_values for figure in figures] == [4 * 3 * 16] * 2
    penalty = flowdiag.logdet_penalty(model, adapter=ChainAdapter(model))
    expected = sum((16 * torch.linalg.slogdet(part.weight).logabsdet) ** 2 for part in model.parts[1::2])
    torch.testing.assert_close(penalty, expected)
    with flowdiag.Monitor(model, tmp_path, adapter=ChainAdapter(model)) as monitor:
        x = _data(9)
        z, total = model(x)
        loss = z.pow(2).mean() - total.mean()
        loss.backward()
        assert monitor.step(loss) is None
    assert monitor.last.logdet.sum() == pytest.approx(float(total.detach().mean()), rel=1e-9)
    assert read_run(tmp_path / RUN_FILE).layer_names == ["parts.0", "parts.1", "parts.2", "parts.3"]
