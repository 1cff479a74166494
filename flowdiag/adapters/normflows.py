"""normflows: flows are `normflows.flows.Flow`; data -> latent is `flow.inverse(z) -> (z, log_det)`.

Training (`forward_kld`, `log_prob`, `inverse_and_log_det`) calls `.inverse` directly, so forward
hooks never fire: we wrap `.inverse` per instance. Containers apply their flows in reverse order
data -> latent; `MultiscaleFlow` runs its transform, then each level from the last to the first,
each followed by that level's merge (a split, data -> latent).
"""

from __future__ import annotations

from collections.abc import Iterable

import normflows as nf
import torch
from torch import Tensor, nn

from flowdiag.adapters.base import ActNormAccess, ActNormStats, Capture, Detach, FlowLayer
from flowdiag.adapters.walk import WalkedAdapter, as_logdet, output_tensor
from flowdiag.adapters.wrapping import listen

_EPS = 1e-6  # normflows: s = log(std + 1e-6), std unbiased


def _children(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    if isinstance(module, nf.MultiscaleFlow):
        if module.transform is not None:
            yield "transform", module.transform
        for level in reversed(range(module.num_levels)):
            yield f"flows.{level}", module.flows[level]
            if level > 0:
                yield f"merges.{level - 1}", module.merges[level - 1]
        return
    children = list(module.named_children())
    inside_library = type(module).__module__.split(".")[0] == "normflows" or isinstance(module, nn.ModuleList)
    yield from reversed(children) if inside_library else children


def _is_flow(module: nn.Module) -> bool:
    return isinstance(module, nf.flows.Flow)


class NormflowsActNorm(ActNormAccess):
    """normflows ActNorm data -> latent: z = (x - t) · exp(-s), init s = log(std + 1e-6), t = mean."""

    inits_when_sampling = True  # forward() initializes too, from latent noise when sampling first

    def __init__(self, name: str, module: nf.flows.ActNorm) -> None:
        self.name = name
        self.module = module
        self._pooled = list(module.batch_dims)  # axes the init pools over: (0, 2, 3) for images

    def is_initialized(self) -> bool:
        return bool(self.module.data_dep_init_done > 0.0)

    def set_initialized(self, value: bool) -> None:
        self.module.data_dep_init_done = torch.tensor(float(value), device=self.module.s.device)

    def stats_of(self, x: Tensor) -> ActNormStats:
        kept = [d for d in range(x.dim()) if d not in self._pooled]
        x64 = x.detach().to(torch.float64).permute(*self._pooled, *kept)
        x64 = x64.reshape(-1, x64[(0,) * len(self._pooled)].numel())
        return ActNormStats(count=x64.shape[0], total=x64.sum(dim=0), total_sq=(x64 * x64).sum(dim=0))

    def _std(self, stats: ActNormStats) -> Tensor:
        return torch.sqrt(stats.var(unbiased=True))

    def scale_from(self, stats: ActNormStats) -> Tensor:
        return 1.0 / (self._std(stats) + _EPS)

    @torch.no_grad()
    def finalize(self, stats: ActNormStats) -> None:
        s, t = self.module.s, self.module.t
        s.data = torch.log(self._std(stats) + _EPS).to(s.dtype).view_as(s)
        t.data = stats.mean().to(t.dtype).view_as(t)
        self.set_initialized(True)

    def watch_input(self, callback) -> Detach:  # type: ignore[no-untyped-def]
        return Detach([listen(self.module, "inverse", before=lambda args, kwargs: callback(args[0]))])


class NormflowsAdapter(WalkedAdapter):
    name = "normflows"
    is_flow = staticmethod(_is_flow)
    children = staticmethod(_children)

    def attach(self, capture: Capture) -> Detach:
        capture = self.remembering(capture)
        undo = []
        for index, layer in enumerate(self._layers):

            def after(args: tuple, kwargs: dict, result: tuple, i: int = index) -> None:
                try:
                    out = output_tensor(result[0])
                    capture(i, out, as_logdet(result[1], out))
                except Exception as error:  # never inside the user's forward: say so once instead
                    self.unreadable(i, error)

            undo.append(listen(layer.module, "inverse", after=after))
        return Detach(undo)

    def actnorms(self) -> list[ActNormAccess]:
        return [
            NormflowsActNorm(layer.name, layer.module)  # type: ignore[arg-type]
            for layer in self._layers
            if isinstance(layer.module, nf.flows.ActNorm)
        ]

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        return [(layer.name, _conv_logabsdet(layer.module)) for layer in self.invconvs()]

    def invconvs(self) -> list[FlowLayer]:
        return [layer for layer in self._layers if isinstance(layer.module, nf.flows.Invertible1x1Conv)]

    def run_forward(self, x: Tensor) -> object:
        top = next(
            (m for m in self.model.modules() if isinstance(m, nf.MultiscaleFlow | nf.NormalizingFlow)), None
        )
        if top is not None:
            return top.inverse_and_log_det(x)
        return self.model.inverse(x)


def _conv_logabsdet(conv: nf.flows.Invertible1x1Conv) -> Tensor:
    if conv.use_lu:
        return conv.log_S.sum()
    return torch.linalg.slogdet(conv.W.to(torch.float64)).logabsdet.to(conv.W.dtype)


ADAPTER = NormflowsAdapter
