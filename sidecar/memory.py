"""Giving memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

#: glibc's mallopt parameter, and the size from which blocks get a mapping of their own
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def _libc(name: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")


def release_free_memory() -> None:
    """Collect garbage, then return the C heap's free pages to the system (glibc's
    `malloc_trim`). A bootstrap frees many temporaries (record bytes, snapshot chunks, decoded
    deltas) between the bitmaps it keeps; without this the process keeps that memory."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


def fix_mmap_threshold() -> None:
    """Give blocks of MMAP_THRESHOLD bytes and more a mapping of their own (returned to the
    system when freed) and keep glibc from raising that threshold after one is freed (its
    default; the heap's trim threshold then rises with it, to 2x). A replica builds and frees
    arrays of millions of ids (a compact segment's form and its rebuilds,
    sidecar/replica/forms.py); with the dynamic threshold they are carved from the heap and
    the memory stays with the process: 7.2 instead of 3.0 bytes per member for 2M ids random
    over 2^32. Process-wide, so a host embedding a replica gets it too; an explicit
    MALLOC_MMAP_THRESHOLD_ in the environment is left as it is."""
    if _MALLOPT is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
