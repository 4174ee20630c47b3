"""Building the C extension in a source checkout (a development aid: tests and `seg-perf`
use it). An in-place build older than sidecar/shm/_native.c lacks what the Python code now
asks of it, and the code takes its slower Python paths; `pip install -e .` rebuilds too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_native.c"


def stale() -> bool:
    """No in-place build of `_native.c`, or one older than the source (a source checkout)."""
    if not SOURCE.exists():
        return False  # an installed package: built when it was installed
    built = list(HERE.glob("_native.*.so")) + list(HERE.glob("_native.*.pyd"))
    return not built or max(p.stat().st_mtime for p in built) < SOURCE.stat().st_mtime


def build_if_stale() -> bool:
    """Build the extension in place when `stale()`; True when it built. Call it before
    `sidecar.shm._native` is imported: a loaded extension is not reloaded."""
    if not stale():
        return False
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=HERE.parent.parent,
        check=True,
        capture_output=True,
    )
    return True
