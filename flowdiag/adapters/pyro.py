"""pyro: `TransformModule`s map latent -> data; `TransformedDistribution.log_prob(y)` runs them in
reverse, x = t.inv(y), and subtracts `t.log_abs_det_jacobian(x, y)`.

`Transform.__call__` wins over `Module.__call__`, so forward hooks never fire: we wrap
`log_abs_det_jacobian` per instance. The data -> latent output is x (its first argument) and the
data -> latent log-det is minus the forward ladj.
"""

from __future__ import annotations

from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms import GeneralizedChannelPermute
from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach, FlowLayer
from flowdiag.adapters.walk import WalkedAdapter
from flowdiag.adapters.wrapping import listen


def _is_flow(module: nn.Module) -> bool:
    return isinstance(module, TransformModule)


def _data_to_latent_order(module: nn.Module):  # type: ignore[no-untyped-def]
    # The user lists transforms latent -> data (the order TransformedDistribution applies them).
    return reversed(list(module.named_children()))


def _per_sample(ladj: Tensor, x: Tensor, event_dim: int) -> Tensor:
    extra = ladj.dim() - (x.dim() - event_dim)
    return ladj.sum(dim=tuple(range(-extra, 0))) if extra > 0 else ladj


class PyroAdapter(WalkedAdapter):
    name = "pyro"
    is_flow = staticmethod(_is_flow)
    children = staticmethod(_data_to_latent_order)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._event_dim = max((layer.module.domain.event_dim for layer in self._layers), default=0)

    def attach(self, capture: Capture) -> Detach:
        capture = self.remembering(capture)
        undo = []
        for index, layer in enumerate(self._layers):

            def after(args: tuple, kwargs: dict, ladj: Tensor, i: int = index) -> None:
                try:
                    x = args[0]
                    capture(i, x, -_per_sample(ladj, x, self._event_dim))
                except Exception as error:  # never inside the user's forward: say so once instead
                    self.unreadable(i, error)

            undo.append(listen(layer.module, "log_abs_det_jacobian", after=after))
        return Detach(undo)

    def invconvs(self) -> list[FlowLayer]:
        return [layer for layer in self._layers if isinstance(layer.module, GeneralizedChannelPermute)]

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        # W = P · L · U with a unit-diagonal L: log|det W| = Σ log|diag U|.
        return [(layer.name, layer.module.U_diag.abs().log().sum()) for layer in self.invconvs()]


ADAPTER = PyroAdapter
