"""A package's public names imported on first use (PEP 562 module `__getattr__`): a tool that
needs one part of a package does not pay for the rest at start-up. `seg-publish`, a new
process per publish, reads the replica's recovery and the Kafka transport, never the servers,
clients, asyncio or the log directory; importing them all took 0.2-0.4 s (perf/ANALYSIS.md)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` for `package`: name -> the module (relative to `package`) that
    defines it. A name is imported once, then kept in the package's namespace."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
