"""The C extension's build identity and building it in a source checkout (a development aid:
tests and `seg-perf` use it). `setup.py` compiles `source_hash()` into the extension as
`SOURCE_HASH`; `sidecar.shm.native` refuses a build whose hash is not this source's (an
in-place build older than sidecar/shm/_native.c), and the code takes its Python paths until
`REBUILD` runs. Standard library only: setup.py loads this file by path."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_native.c"
#: what rebuilds the extension in place (`pip install -e .` does too)
REBUILD = "python setup.py build_ext --inplace"


def source_hash(source: Path = SOURCE) -> str | None:
    """The identity of a build of `source`: the first 16 hex digits of its SHA-256, or None
    when the source is not here (an installed package, built with the code it ships with)."""
    try:
        return hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def mismatch(module: Any, expected: str | None) -> str | None:
    """Why the loaded extension `module` is not a build of the source expecting `expected`
    (None: it is, or there is no source to compare with), in one line naming the rebuild."""
    if expected is None:
        return None
    built = getattr(module, "SOURCE_HASH", None)
    if built == expected:
        return None
    return (
        f"the C extension was built from another sidecar/shm/_native.c (build "
        f"{built or 'unknown'}, source {expected}); rebuild it: `{REBUILD}` (or `pip install -e .`)"
    )


def stale() -> bool:
    """No in-place build of `_native.c` for this interpreter, or one built from another
    source (a source checkout; the hash is a literal in the built file)."""
    expected = source_hash()
    if expected is None:
        return False  # an installed package: built when it was installed
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = HERE / f"_native{suffix}"
        if built.exists():
            return expected.encode() not in built.read_bytes()
    return True


def build_if_stale() -> bool:
    """Build the extension in place when `stale()`; True when it built. Call it before
    `sidecar.shm._native` is imported: a loaded extension is not reloaded. Processes that
    call it at once (pytest's xdist workers) build it once: the others wait, then find it."""
    if not stale():
        return False
    root = HERE.parent.parent
    (root / "build").mkdir(exist_ok=True)
    with open(root / "build" / ".native.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stale():
            return False
        subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=root,
            check=True,
            capture_output=True,
        )
    return True
