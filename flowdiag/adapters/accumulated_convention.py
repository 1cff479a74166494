"""Hand-written Glows that thread a running log-det: `layer(x, logdet=None, reverse=False) -> (x, total)`
(y0ast/Glow-PyTorch, chaiyujin/glow-pytorch).

A layer's log-det is its output total minus its input total, read with a pre-hook and a forward hook
(both with kwargs). Those projects write the coupling inline in `FlowStep.forward`, so a module that
threads the log-det and holds only leaf flow layers (the step) is listed too, after its children, with
its own residual: the step's difference minus its children's. A split adds its prior's log-likelihood
of the factored-out half to the total: that is its increment, recorded with the kind "split".

Which modules are flow layers is read from the module tree. Inside a module that threads the log-det,
a module that does not is a network (a coupling's `block` / `f`): nothing in it is a flow layer, even
an ActNorm that takes a `logdet` argument, since those projects call it as `x, _ = actnorm(x)` and
drop what it returns. Algorithm 1 still initializes those ActNorms (`HandwrittenParts.actnorms`).
ModuleLists, ModuleDicts and Sequentials of flow layers are containers the owner's code loops over.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from flowdiag.adapters.base import Capture, Detach, Difference, FlowAdapter, FlowLayer
from flowdiag.adapters.handwritten import HandwrittenParts
from flowdiag.adapters.observe import observe_call
from flowdiag.adapters.walk import kind_by_class_name, output_tensor


def _signature(module: nn.Module) -> list[inspect.Parameter]:
    """The class's forward's parameters after `self`: what any wrapper of the instance's forward
    (flowdiag's own, while attached) hides."""
    try:
        return list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []


def threads_logdet(module: nn.Module) -> bool:
    return any(parameter.name == "logdet" for parameter in _signature(module))


def _is_container(module: nn.Module) -> bool:
    """Holds modules for its owner's code to call, rather than being a network called as a whole."""
    if type(module).forward is nn.Module.forward:  # no forward of its own: ModuleList, ModuleDict
        return True
    children = list(module.children())
    return isinstance(module, nn.Sequential) and bool(children) and all(map(threads_logdet, children))


def _flow_parts(module: nn.Module) -> list[nn.Module]:
    """The flow layers directly inside `module`: modules threading the log-det, through containers only."""
    found: list[nn.Module] = []
    for child in module.children():
        if threads_logdet(child):
            found.append(child)
        elif _is_container(child):
            found += _flow_parts(child)
    return found


class _Arguments:
    """Reads `logdet` and `reverse` from one module's call, the signature read once (not per call)."""

    def __init__(self, module: nn.Module) -> None:
        parameters = _signature(module)
        self._position = {p.name: i for i, p in enumerate(parameters)}
        self._default = {
            p.name: None if p.default is inspect.Parameter.empty else p.default for p in parameters
        }

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self._position.get(name)
        if position is not None and position < len(args):
            return args[position]
        return self._default.get(name)


class AccumulatedAdapter(HandwrittenParts, FlowAdapter):
    name = "accumulated"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._layers: list[FlowLayer] = []
        self._parent: list[int | None] = []  # index of the step whose residual a leaf reports to
        self._visit("", model, inside=False)

    def _visit(self, prefix: str, module: nn.Module, *, inside: bool) -> None:
        threading = threads_logdet(module)
        if inside and not threading and not _is_container(module):
            return  # a network inside a flow layer: none of its modules is a flow layer
        if threading and prefix:
            parts = _flow_parts(module)
            if not parts:
                self._add(FlowLayer(prefix, kind_by_class_name(module) or "other", module))
                return
            if not any(_flow_parts(part) for part in parts):
                self._visit_step(prefix, module)
                return
        for name, child in module.named_children():
            self._visit(f"{prefix}.{name}" if prefix else name, child, inside=inside or threading)

    def _visit_step(self, prefix: str, step: nn.Module) -> None:
        """The step: its flow layers first, then its own residual (the inline coupling)."""
        start = len(self._layers)
        for name, child in step.named_children():
            self._visit(f"{prefix}.{name}", child, inside=True)
        self._parent[start:] = [len(self._layers)] * (len(self._layers) - start)
        self._add(FlowLayer(prefix, "coupling", step))

    def _add(self, layer: FlowLayer) -> None:
        self._layers.append(layer)
        self._parent.append(None)

    @classmethod
    def recognizes(cls, model: nn.Module) -> bool:
        return any(threads_logdet(m) for m in list(model.modules())[1:])

    def layers(self) -> list[FlowLayer]:
        return self._layers

    def attach(self, capture: Capture) -> Detach:
        # Wrapped forwards, not hooks, where the module has none: each call stays on `Module.__call__`'s
        # fast path (adapters.observe). Inside the forward only references are kept: the log-dets go to
        # `capture` as Differences of running totals, subtracted when the step's row is made.
        capture = self.remembering(capture)
        given: dict[int, Tensor | float] = {}  # the running total each layer in progress was given
        children: dict[int, list[tuple[Tensor, Tensor | float]]] = {}  # a step's layers' (total, given)
        steps = {parent for parent in self._parent if parent is not None}
        undo = []
        for index, layer in enumerate(self._layers):
            arguments = _Arguments(layer.module)

            def before(args: tuple, kwargs: dict, i: int = index, a: _Arguments = arguments) -> None:
                try:
                    if a.get(args, kwargs, "reverse"):
                        return
                    total = a.get(args, kwargs, "logdet")
                    given[i] = 0.0 if total is None else total
                    if i in steps:
                        children[i] = []
                except Exception as error:  # never inside the user's forward: say so once instead
                    self.unreadable(i, error)

            def after(args: tuple, kwargs: dict, output: Any, i: int = index) -> None:
                if i not in given:
                    return
                try:
                    self._report(i, output, given.pop(i), children, capture)
                except Exception as error:
                    self.unreadable(i, error)

            undo.append(observe_call(layer.module, before, after))
        return Detach(undo)

    def _report(
        self,
        i: int,
        output: Any,
        given: Tensor | float,
        children: dict[int, list[tuple[Tensor, Tensor | float]]],
        capture: Capture,
    ) -> None:
        """Layer i's increment (a step's: less its layers') to `capture`; its totals to its step."""
        if not isinstance(output, tuple | list) or len(output) < 2 or output[1] is None:
            raise TypeError("returned no running log-det: it was called as (x, _) = layer(x), not threaded")
        out = output_tensor(output[0])
        total = output[1] if isinstance(output[1], Tensor) else out.new_full((), float(output[1]))
        kids = children.pop(i, None)
        own = Difference(total, given) if kids is None else _own_increment(total, given, kids)
        parent = self._parent[i]
        if parent is not None and parent in children:
            children[parent].append((total, given))
        capture(i, out, own)


def _own_increment(
    total: Tensor, given: Tensor | float, kids: list[tuple[Tensor, Tensor | float]] | None
) -> Difference | Tensor:
    """total - given, less the increments of the step's layers. When each layer was given what the one
    before returned (first: the step's own), theirs telescope: the step's own is total - the last's."""
    if not kids:
        return Difference(total, given)
    start: Tensor | float = given
    for kid_total, kid_given in kids:
        if kid_given is not start:
            break
        start = kid_total
    else:
        return Difference(total, start)
    own = total - given  # the step changed the total between its layers: subtract each now
    for kid_total, kid_given in kids:
        own = own - (kid_total - kid_given)
    return own


ADAPTER = AccumulatedAdapter
