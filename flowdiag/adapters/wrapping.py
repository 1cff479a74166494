"""Per-instance method wrappers, for libraries whose data -> latent call bypasses forward hooks.

normflows runs data -> latent through `flow.inverse(...)` and pyro through `Transform.__call__`, so
`register_forward_hook` never fires there. We shadow the bound method with one wrapper per instance
(in the instance `__dict__`, so other instances and the class stay untouched) that calls listeners
before and after the original. Several listeners share one wrapper, so a Monitor and the penalty's
size watcher can be attached at the same time and removed in any order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Before = Callable[[tuple[Any, ...], dict[str, Any]], None]
After = Callable[[tuple[Any, ...], dict[str, Any], Any], None]

_REGISTRY = "_flowdiag_listeners"


class _Listeners:
    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original
        self.before: list[Before] = []
        self.after: list[After] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for callback in tuple(self.before):
            callback(args, kwargs)
        result = self.original(*args, **kwargs)
        for callback in tuple(self.after):
            callback(args, kwargs, result)
        return result


def listen(
    module: nn.Module, method: str, *, before: Before | None = None, after: After | None = None
) -> Callable[[], None]:
    """Call `before(args, kwargs)` / `after(args, kwargs, result)` around `module.<method>`; returns undo."""
    registry: dict[str, _Listeners] = module.__dict__.setdefault(_REGISTRY, {})
    listeners = registry.get(method)
    if listeners is None:
        listeners = _Listeners(getattr(module, method))
        registry[method] = listeners
        module.__dict__[method] = listeners
    if before is not None:
        listeners.before.append(before)
    if after is not None:
        listeners.after.append(after)

    def undo() -> None:
        if before is not None:
            listeners.before.remove(before)
        if after is not None:
            listeners.after.remove(after)
        if not listeners.before and not listeners.after:
            registry.pop(method, None)
            module.__dict__.pop(method, None)
            if not registry:
                module.__dict__.pop(_REGISTRY, None)

    return undo
