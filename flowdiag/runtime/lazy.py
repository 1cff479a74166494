"""Public names that load on first use: a package's `__getattr__` from a table name -> module, so
importing the package (and the CLI) pulls in neither torch nor matplotlib until a name is used."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(table[name]), name)

    return __getattr__
