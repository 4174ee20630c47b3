"""Crash-safe directory output: build beside the destination, then swap it in with a rename."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputError(RuntimeError):
    """The output directory cannot be written or replaced."""


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a directory's entries (new names, renames), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to a new file and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def check_replaceable(dest: Path, marker: str, what: str) -> None:
    """Refuse to replace `dest` unless it is absent, an empty directory, or holds `marker`.

    This keeps a mistyped --out from wiping a directory that is not ours.
    """
    if not dest.exists():
        return
    if not dest.is_dir():
        raise OutputError(f"{dest} exists and is not a directory")
    if (dest / marker).is_file() or not any(dest.iterdir()):
        return
    raise OutputError(f"refusing to replace {dest}: it is not empty and not a {what} (no {marker})")


@contextmanager
def atomic_directory(dest: Path, marker: str, what: str) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `dest`; on success it replaces `dest`.

    The swap is one rename (an atomic exchange on Linux), so readers see either the old or
    the new directory, never a half-written one. On error the temporary directory is removed
    and `dest` is untouched.
    """
    dest = Path(dest).absolute()
    check_replaceable(dest, marker, what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, _files in os.walk(tmp):
            fsync_path(Path(root))
        _swap_in(tmp, dest, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, dest: Path, tag: str) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        fsync_path(dest.parent)
        return
    if not dest.is_dir():
        raise OutputError(f"{dest} exists and is not a directory")
    if _exchange(tmp, dest):
        # tmp now holds the old contents.
        fsync_path(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # Portable fallback: two renames. A crash between them leaves the old set under
    # .<name>.old-<tag> and no half-written set under <name>.
    old = dest.parent / f".{dest.name}.old-{tag}"
    os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_path(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
