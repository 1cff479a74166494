"""One protocol between flowdiag and a flow library: what a flow's layers are and how to watch them.

An adapter knows one library (or one hand-written convention) and nothing about recording. It
- lists the flow layers in data -> latent order (name, kind, spatial size where known);
- calls `capture(index, output, logdet)` each time a listed layer runs in the data -> latent
  direction, from inside the library's own call (a forward hook or a per-instance wrapper);
- reads and writes every ActNorm's statistics, so Algorithm 1 can run on the library's own layers;
- gives each invertible 1x1 conv's log|det W|, differentiable, for the eq. (2) penalty.

`capture` must not copy to the host: it is called inside the step's hot path. An adapter never raises
inside the model's forward: a call it cannot read (an unexpected output, a missing log-det) records
nothing and is reported once, as a warning (`FlowAdapter.unreadable`).

Supporting a flow flowdiag does not know is writing one subclass of `FlowAdapter` (`layers`, `attach`,
and where the model has them `actnorms` and `conv_logabsdets`) and passing an instance wherever an
adapter name is accepted: `Monitor(model, out, adapter=MyAdapter(model))`, `cumulative_init`,
`logdet_penalty`, `audit`.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

# "split": a multi-scale split whose log-det increment is its prior's log-likelihood of the factored-out
# half (the accumulated convention adds it to the running total).
LayerKind = Literal["actnorm", "invconv", "coupling", "split", "other"]


class Difference(NamedTuple):
    """A log-det given as the difference of two running totals, `total - given` (the accumulated
    convention): the recorder subtracts when it makes the step's row, every layer at once, instead of
    one small tensor op per layer inside the model's forward."""

    total: Tensor
    given: Tensor | float


# (index into layers(), the layer's output in the data -> latent direction, its log-det or None).
# A log-det may be a scalar (the same for every sample), shape (B,), a Difference, or None
# (volume-preserving).
Logdet = Tensor | Difference | None
Capture = Callable[[int, Tensor, Logdet], None]


def logdet_value(logdet: Logdet) -> Tensor | None:
    """A captured log-det as a tensor (a Difference subtracted now)."""
    if isinstance(logdet, Difference):
        return logdet.total - logdet.given
    return logdet


@dataclass(frozen=True)
class FlowLayer:
    name: str  # module path in the model, e.g. "flows.3" or "levels.0.steps.1.invconv"
    kind: LayerKind
    module: nn.Module
    pixels: int | None = None  # h·w the layer runs at, where the adapter knows it without a forward


class Detach:
    """What `attach` returns: undo every hook and wrapper it installed."""

    def __init__(self, undo: list[Callable[[], Any]]) -> None:
        self._undo = undo

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass
class ActNormStats:
    """Per-channel sums an ActNorm init needs, pooled over minibatches (float64)."""

    count: int  # values per channel: batch · h · w summed over minibatches
    total: Tensor  # (C,) Σ x
    total_sq: Tensor  # (C,) Σ x²

    def mean(self) -> Tensor:
        return self.total / self.count

    def var(self, *, unbiased: bool) -> Tensor:
        """Pooled per-channel variance; unbiased with one value per channel is 0/0 = NaN, as torch's std."""
        centered = (self.total_sq - self.total * self.mean()).clamp_min(0.0)
        return centered / (self.count - 1 if unbiased else self.count)

    def add(self, other: ActNormStats) -> ActNormStats:
        return ActNormStats(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq
        )


class ActNormAccess(ABC):
    """Read and write one library ActNorm with that library's own init formula."""

    name: str
    module: nn.Module
    channel_dim: int = 1  # which axis of the layer's input holds channels
    # normflows and FrEIA initialize on the first call in either direction, so sampling first
    # initializes them from latent noise; the others only data -> latent.
    inits_when_sampling: ClassVar[bool] = False

    def stats_of(self, x: Tensor) -> ActNormStats:
        """Per-channel float64 sums of one input minibatch (every axis but the channels pooled)."""
        x64 = x.detach().to(torch.float64).movedim(self.channel_dim, 0).reshape(x.shape[self.channel_dim], -1)
        return ActNormStats(count=x64.shape[1], total=x64.sum(dim=1), total_sq=(x64 * x64).sum(dim=1))

    def watch_input(self, callback: Callable[[Tensor], None]) -> Detach:
        """Call `callback(input)` just before the layer runs data -> latent; it may raise to stop the pass.

        The default is a forward pre-hook on `module` (libraries whose data -> latent is `__call__`).
        """
        handle = self.module.register_forward_pre_hook(lambda module, args: callback(args[0]))
        return Detach([handle.remove])

    @abstractmethod
    def is_initialized(self) -> bool: ...

    @abstractmethod
    def set_initialized(self, value: bool) -> None:
        """Set the library's own "initialized" flag (so it never initializes itself again)."""

    @abstractmethod
    def finalize(self, stats: ActNormStats) -> None:
        """Set scale and bias from pooled statistics exactly as the library's own init would from the
        concatenation of the minibatches (its std or var, biased or not, its eps)."""

    @abstractmethod
    def scale_from(self, stats: ActNormStats) -> Tensor:
        """(C,) the multiplicative scale the library's init would give; NaN/inf where it would."""


_INTERNAL = {"depth": 0}  # flowdiag's own passes in progress (nested: the audit runs the init)


@contextmanager
def internal_passes() -> Iterator[None]:
    """flowdiag's own forwards through a model (Algorithm 1, the audit): a Monitor attached to the same
    model records none of them, whatever the grad mode."""
    _INTERNAL["depth"] += 1
    try:
        yield
    finally:
        _INTERNAL["depth"] -= 1


def in_internal_pass() -> bool:
    return _INTERNAL["depth"] > 0


class FlowAdapter(ABC):
    """One library's (or one convention's) view of a flow model: subclass it to support a flow flowdiag
    does not know, and pass the instance as `adapter=` (see the module docstring)."""

    name: ClassVar[str]  # the name users pass as adapter="..."

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._warned = False

    def unreadable(self, index: int, why: object) -> None:
        """A call of layer `index` this adapter cannot read: nothing is recorded for it, and the first
        such call of the run says so (a warning, never an error inside the model's forward)."""
        if self._warned:
            return
        self._warned = True
        layers = self.layers()
        name = layers[index].name if 0 <= index < len(layers) else f"#{index}"
        warnings.warn(
            f"flowdiag ({self.name} adapter) cannot read a call of flow layer {name}: {why}; such calls "
            "are not recorded (said once per run)",
            RuntimeWarning,
            stacklevel=3,
        )

    @classmethod
    @abstractmethod
    def recognizes(cls, model: nn.Module) -> bool:
        """True when `model` is built from this library's classes (for adapter="auto")."""

    @abstractmethod
    def layers(self) -> list[FlowLayer]:
        """Every flow layer, data -> latent order."""

    @abstractmethod
    def attach(self, capture: Capture) -> Detach:
        """Call `capture` for every listed layer each time it runs data -> latent."""

    def actnorms(self) -> list[ActNormAccess]:
        """The model's data-dependent ActNorms in data -> latent order (empty if the library has none)."""
        return []

    def conv_logabsdets(self) -> list[tuple[str, Tensor]]:
        """(name, log|det W|) of every invertible 1x1 conv, differentiable; empty if there is none."""
        return []

    def conv_pixels(self) -> list[int | None]:
        """h·w each conv of `conv_logabsdets` ran at in the last forward (None: not seen yet).

        The default reads what `remember_pixels` left on each invconv layer's module: adapters call it
        from their `attach` captures and from `watch_convs`.
        """
        return [layer.module.__dict__.get(_PIXELS, layer.pixels) for layer in self.invconvs()]

    def invconvs(self) -> list[FlowLayer]:
        return [layer for layer in self.layers() if layer.kind == "invconv"]

    def watch_convs(self) -> Detach:
        """Remember the spatial size every invconv runs at, for the penalty (no host copy)."""
        return self.attach(self.remembering(lambda index, output, logdet: None))

    def remembering(self, capture: Capture) -> Capture:
        """`capture`, plus `remember_pixels` for the invconv layers: the built-in adapters' attach use it,
        and `watch_convs` wraps it around an adapter's own attach too (once: a wrapped one is kept)."""
        if getattr(capture, _REMEMBERING, False):
            return capture
        modules = [layer.module if layer.kind == "invconv" else None for layer in self.layers()]
        if all(module is None for module in modules):  # no conv: nothing to remember
            return capture

        def wrapped(index: int, output: Tensor, logdet: Logdet) -> None:
            module = modules[index]
            if module is not None:
                remember_pixels(module, output)
            capture(index, output, logdet)

        setattr(wrapped, _REMEMBERING, True)
        return wrapped

    def run_forward(self, x: Tensor) -> Any:
        """Run the whole model data -> latent on `x` (for probing, the init and the audit)."""
        return self.model(x)

    def units(self) -> list[nn.Module]:
        """The outermost flow layers in data -> latent order, where the model's own code calls each as
        `module(...)` with all it depends on in the call's arguments (a Glow's steps and splits, a
        TarFlow's blocks): Algorithm 1 then caches each one's inputs across the minibatches instead of
        re-running the model up to every ActNorm (stabilize.cumulative_units). Empty (the default): the
        library runs its layers some other way, and Algorithm 1 re-runs the model per ActNorm."""
        return []


_PIXELS = "_flowdiag_pixels"
_REMEMBERING = "_flowdiag_remembering"


def remember_pixels(module: nn.Module, output: Tensor) -> None:
    """Keep h·w of a conv's output on the module (a plain attribute: reading a shape costs no sync)."""
    if output.dim() >= 3:
        module.__dict__[_PIXELS] = int(output.shape[-2] * output.shape[-1])
