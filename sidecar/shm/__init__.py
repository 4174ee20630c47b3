"""The shared replica: the sidecar publishes what it answers locally into files other
processes on the host map read-only (docs/SHARED_REPLICA.md). `layout` owns the index format,
`_native` (C) the segment files and the reader's hot path, `writer` the sidecar's side;
the reader is `sidecar.client.SharedReplica`."""

from __future__ import annotations

import logging
from typing import Any

from . import build

log = logging.getLogger(__name__)

_loaded: Any = None
#: why the extension cannot be used here, once `native` has found out (None: not yet, or usable)
_refused: str | None = None
_warned = False


class ShmUnavailable(RuntimeError):
    """The shared replica cannot run here: the message says why, in one line."""


def native() -> Any:
    """The C extension, or ShmUnavailable saying how to build it: when it is not built, or
    was built from another `_native.c` than the one beside it (the one check of its ABI:
    callers use everything this returns as this source defines it)."""
    global _loaded, _refused
    if _loaded is None and _refused is None:
        try:
            from . import _native as mod
        except ImportError as exc:
            _refused = (
                f"the shared replica's C extension is not built ({exc}); "
                "`pip install -e .` builds it (needs gcc and the Python headers)"
            )
        else:
            _refused = build.mismatch(mod, build.source_hash())
            if _refused is None:
                _loaded = mod
    if _refused is not None:
        raise ShmUnavailable(_refused)
    return _loaded


def native_or_none() -> Any:
    """The C extension, or None when `native` refuses it (callers then take their Python
    paths); the first refusal is logged once, as a warning saying why and how to build it."""
    global _warned
    try:
        return native()
    except ShmUnavailable as exc:
        if not _warned:
            _warned = True
            log.warning("the C extension is not used, so the Python paths run: %s", exc)
        return None
