"""Algorithm 1 through the model's own forward, each unit's inputs kept across the M minibatches.

A unit is an outermost flow layer the model's code calls as `unit(...)` (`FlowAdapter.units`: a Glow's
steps, squeezes and splits). Its ActNorms, in its layers or in its coupling's network, depend only on
the unit's call arguments, and those only on the units before it. So, unit by unit in call order:
1. a pass over each minibatch runs the model up to the unit and keeps its call's arguments;
2. for each ActNorm in the unit, a pass per minibatch feeds the unit its kept arguments and stops as
   the ActNorm is about to see its input; the ActNorm is set from the pooled sums before the next one's
   passes, which therefore see their inputs through it (an ActNorm that is the unit reads them at once);
3. the next unit holding an ActNorm gets its arguments from a pass that runs this unit on its kept
   arguments, and the units up to that one on what the model makes of it, and stops at its call.
In every pass the units before the current one do not run: each returns a stand-in of its output's
shape filled with NaN, so the model's code between units still runs, cheaply. If a stand-in's NaN
reaches a unit's kept arguments (the model is not a sequence of units), or a unit runs twice, or an
ActNorm runs outside every unit, the walk says so (`NotSequential`) and the caller falls back to
re-running the model up to each ActNorm (`cumulative_adapters`).

Memory: the units' kept arguments for the M minibatches (about the data's size: the frontier of
flowdiag's own walk, `cumulative_glow`) plus one minibatch's activations. Cost: one plan pass on the
first minibatch, then per minibatch each unit that holds ActNorms runs once per ActNorm (stopped at it)
and once whole, every other unit once, and the model's code between units once per pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowdiag.adapters.base import ActNormAccess, ActNormStats, FlowAdapter
from flowdiag.runtime.distributed import Pool
from flowdiag.stabilize.init_passes import Reached, pooled, run_until_stopped

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a unit call's positional and keyword arguments
UnitCall = Callable[..., Any]  # (unit index, its own forward, *args, **kwargs) -> output


class NotSequential(Exception):
    """The model is not a sequence of units the walk can keep inputs of; fall back to per-ActNorm passes."""


@contextmanager
def _overriding(units: Sequence[nn.Module], call: UnitCall) -> Iterator[None]:
    """Route every call of each unit through `call(index, forward, ...)`: an instance-level forward,
    which `Module.__call__` finds before the class's; the unit's own (or a previous wrapper) is restored."""
    previous = []
    for index, unit in enumerate(units):
        before = unit.__dict__.get("forward")
        own = before or type(unit).forward.__get__(unit)
        unit.forward = functools.partial(call, index, own)  # type: ignore[method-assign]
        previous.append(before)
    try:
        yield
    finally:
        for unit, before in zip(units, previous, strict=True):
            if before is None:
                unit.__dict__.pop("forward", None)
            else:
                unit.forward = before  # type: ignore[method-assign]


@dataclass
class _Plan:
    units: list[nn.Module]  # in the order the model calls them
    norms: list[list[ActNormAccess]]  # per unit, the ActNorms it runs, in call order


def _plan(adapter: FlowAdapter, norms: Sequence[ActNormAccess], x: Tensor) -> _Plan:
    """One pass on the first minibatch: the units' call order, and which unit runs each ActNorm."""
    units = adapter.units()
    called: list[int] = []
    stack: list[int] = []
    found: dict[int, int | None] = {}  # norm index -> unit index (None: outside every unit)

    def unit_call(index: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if index in called:
            raise NotSequential(f"unit {index} ran twice in one forward")
        called.append(index)
        stack.append(index)
        try:
            return forward(*args, **kwargs)
        finally:
            stack.pop()

    def seen(k: int, norm: ActNormAccess) -> None:
        own = next((i for i, unit in enumerate(units) if unit is norm.module), None)
        found.setdefault(k, own if own is not None else (stack[-1] if stack else None))

    watchers = [norm.watch_input(lambda _x, k=k, norm=norm: seen(k, norm)) for k, norm in enumerate(norms)]
    try:
        with _overriding(units, unit_call):
            run_until_stopped(adapter, x)
    finally:
        for watcher in watchers:
            watcher.remove()
    if len(found) < len(norms) or None in found.values():
        raise NotSequential("an ActNorm ran outside every unit, or not at all")
    position = {unit: p for p, unit in enumerate(called)}
    per_unit: list[list[ActNormAccess]] = [[] for _ in called]
    for k in found:  # dicts keep the order the ActNorms ran in
        per_unit[position[found[k]]].append(norms[k])  # type: ignore[index]
    return _Plan([units[i] for i in called], per_unit)


def _rebuilt(like: tuple | list, items: Iterator[Any]) -> Any:
    """A tuple, list or named tuple of `like`'s type holding `items`."""
    values = list(items)
    return type(like)(*values) if hasattr(like, "_fields") else type(like)(values)


@dataclass(frozen=True)
class _TensorShape:
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def _template(output: Any) -> Any:
    """What a stand-in for `output` needs: shapes and dtypes, no values (None and numbers as they are)."""
    if isinstance(output, Tensor):
        return _TensorShape(output.shape, output.dtype, output.device)
    if isinstance(output, tuple | list):
        return _rebuilt(output, (_template(item) for item in output))
    return output


def _stand_in(template: Any, made: dict[_TensorShape, Tensor]) -> Any:
    """NaN of the template's shapes: one tensor per shape, made once (`made`) and handed out again."""
    if isinstance(template, _TensorShape):
        if template not in made:
            fill = math.nan if template.dtype.is_floating_point or template.dtype.is_complex else 0
            made[template] = torch.full(template.shape, fill, dtype=template.dtype, device=template.device)
        return made[template]
    if isinstance(template, tuple | list):
        return _rebuilt(template, (_stand_in(item, made) for item in template))
    return template


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _copied(value: Any) -> Any:
    """The same arguments with every tensor copied (a unit may change its input in place)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return _rebuilt(value, (_copied(item) for item in value))
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    return value


class _Runner:
    """The state of the walk's passes, read by every unit call (`call`)."""

    def __init__(self, plan: _Plan, minibatches: Sequence[Tensor]) -> None:
        self.plan = plan
        self.minibatches = minibatches
        self.templates: list[list[Any]] = [[None] * len(minibatches) for _ in plan.units]
        self.stand_ins: dict[_TensorShape, Tensor] = {}
        self.real_from = 0  # units before it return stand-ins
        self.kept: list[Call] | None = None  # per minibatch, the arguments unit `real_from` gets
        self.stop_at: int | None = None  # keep this unit's arguments, then stop (or go in: `enter`)
        self.enter = False
        self.caught: Call | None = None
        self.j = 0  # the minibatch of the pass

    def call(self, index: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if index < self.real_from:
            return _stand_in(self.templates[index][self.j], self.stand_ins)
        if index == self.stop_at:
            self.caught = _copied((args, kwargs))
            if not self.enter:
                raise Reached
        elif index == self.real_from and self.kept is not None:
            args, kwargs = _copied(self.kept[self.j])
        output = forward(*args, **kwargs)
        self.templates[index][self.j] = _template(output)
        return output

    def passes(self, adapter: FlowAdapter) -> Iterator[bool]:
        """One pass per minibatch; yields whether flowdiag stopped it. A pass the stand-ins broke is
        no error of the model's: the walk gives up (the fallback re-raises what is the model's)."""
        for j, x in enumerate(self.minibatches):
            self.j = j
            try:
                yield run_until_stopped(adapter, x)
            except Exception as error:
                raise NotSequential(f"a pass failed ({error})") from error

    def keep(self, adapter: FlowAdapter, unit: int, pool: Pool) -> ActNormStats:
        """Each minibatch's arguments of `unit`, from the units from `real_from` on; the same passes go
        on into the unit up to its first ActNorm, whose pooled input sums they return."""
        first = self.plan.norms[unit][0]
        self.stop_at, self.enter, kept = unit, first.module is not self.plan.units[unit], []
        with _grabbing(first) as grabbed:
            for stopped in self.passes(adapter):
                if not stopped or self.caught is None:
                    raise NotSequential(f"unit {unit} did not run")
                kept.append(self.caught)
        self.stop_at, self.enter, self.caught = None, False, None
        self._check(kept)
        self.real_from, self.kept = unit, kept
        return pooled(grabbed if grabbed else [first.stats_of(args[0]) for args, _ in kept], pool)

    def _check(self, kept: list[Call]) -> None:
        """No stand-in's NaN in the kept arguments, and every stand-in still NaN: one sync per unit."""
        flags = [torch.isnan(t).any() for t in _tensors(kept) if t.is_floating_point()]
        flags += [~torch.isnan(t).all() for t in self.stand_ins.values() if t.is_floating_point()]
        if flags and bool(torch.stack(flags).any()):
            raise NotSequential("a stand-in reached a unit's arguments")

    def stats(self, adapter: FlowAdapter, norm: ActNormAccess, unit: int, pool: Pool) -> ActNormStats:
        """The pooled input sums of a later ActNorm of `unit` over every minibatch (and rank)."""
        assert self.kept is not None and self.real_from == unit
        with _grabbing(norm) as grabbed:
            if not all(self.passes(adapter)):
                raise NotSequential(f"ActNorm {norm.name} did not run")
        return pooled(grabbed, pool)


@contextmanager
def _grabbing(norm: ActNormAccess) -> Iterator[list[ActNormStats]]:
    """The input sums `norm` sees, each pass stopped there."""
    grabbed: list[ActNormStats] = []

    def grab(x: Tensor) -> None:
        grabbed.append(norm.stats_of(x))
        raise Reached

    watcher = norm.watch_input(grab)
    try:
        yield grabbed
    finally:
        watcher.remove()


def walk_units(
    adapter: FlowAdapter, norms: Sequence[ActNormAccess], minibatches: Sequence[Tensor], pool: Pool
) -> list[tuple[ActNormAccess, ActNormStats]]:
    """Initialize `norms` unit by unit (the module docstring); returns each with its pooled sums.
    Raises NotSequential, having maybe set some ActNorms already, where the model is no such sequence."""
    plan = _plan(adapter, norms, minibatches[0])
    runner = _Runner(plan, minibatches)
    holding = [index for index, unit_norms in enumerate(plan.norms) if unit_norms]
    results = []
    with _overriding(plan.units, runner.call):
        for unit in holding:
            for k, norm in enumerate(plan.norms[unit]):
                stats = (
                    runner.keep(adapter, unit, pool) if k == 0 else runner.stats(adapter, norm, unit, pool)
                )
                norm.finalize(stats)
                results.append((norm, stats))
    return results
