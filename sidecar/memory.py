"""Giving memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Collect garbage, then return the C heap's free pages to the system (glibc's
    `malloc_trim`). A bootstrap frees many temporaries (record bytes, snapshot chunks, decoded
    deltas) between the bitmaps it keeps; without this the process keeps that memory."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
