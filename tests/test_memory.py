"""release_free_memory gives the C heap's free pages back to the system."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import resource
from pyroaring import BitMap64
from sidecar.memory import release_free_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

# Many small C allocations, then free all but one in 500: the survivors pin the heap's top,
# so glibc keeps the freed pages until asked.
bitmaps = [BitMap64(range(i << 20, (i << 20) + 300, 2)) for i in range(60_000)]
survivors = bitmaps[::500]
del bitmaps
before = rss()
release_free_memory()
print(before - rss())
"""


def test_free_pages_go_back_to_the_system() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=120
    )
    released = int(out.stdout.strip())
    assert released > 20 * 1024 * 1024, f"only {released:,} bytes released"
