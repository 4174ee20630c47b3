"""The shared replica: the sidecar publishes what it answers locally into files other
processes on the host map read-only (docs/SHARED_REPLICA.md). `layout` owns the index format,
`_native` (C) the segment files and the reader's hot path, `writer` the sidecar's side;
the reader is `sidecar.client.SharedReplica`."""

from __future__ import annotations

from typing import Any

_loaded: Any = None


class ShmUnavailable(RuntimeError):
    """The shared replica cannot run here: the message says why, in one line."""


def native() -> Any:
    """The C extension, or ShmUnavailable saying how to build it."""
    global _loaded
    if _loaded is None:
        try:
            from . import _native as mod
        except ImportError as exc:
            raise ShmUnavailable(
                f"the shared replica's C extension is not built ({exc}); "
                "`pip install -e .` builds it (needs gcc and the Python headers)"
            ) from None
        _loaded = mod
    return _loaded


def native_or_none() -> Any:
    """The C extension, or None when it is not built (callers then take their Python path)."""
    try:
        return native()
    except ShmUnavailable:
        return None
