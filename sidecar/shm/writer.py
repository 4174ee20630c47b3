"""The sidecar's side of the shared replica: publishes what `Replica.local` answers into a
directory other processes on the host map read-only (docs/SHARED_REPLICA.md).

A thread of its own, so the replica thread stays as it is: the replica's change hook wakes it
(`Replica.waiters.watch`, called from `Engine.on_change` after every change the engine applies
and on readiness), and it rescans every second anyway (answerability can change with the
clock). Changes that land while it writes are published by the next pass: one pass for a
burst. A
segment whose `SegmentState` object changed gets a new file, written whole before the index
names it; the index's table is swapped under a seqlock; the file it replaced is unlinked
afterwards. A reader that still maps an unlinked file keeps reading that version until it
next looks at the index (unlinked files stay mapped): so a reader never sees half of a
change, and the memory of an old version is returned when its last reader lets go of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..replica.forms import is_compact
from ..replica.state import SegmentState, retry_changed
from . import ShmUnavailable, layout, native
from .layout import Entry

if TYPE_CHECKING:
    from ..replica.runner import Replica

log = logging.getLogger(__name__)


def default_dir(uds: str | os.PathLike[str]) -> Path:
    """`--shm`'s default: `<socket path without its suffix>.shm`, beside the socket."""
    return Path(uds).with_suffix(".shm")


class ShmWriter:
    def __init__(
        self,
        replica: Replica,
        directory: str | os.PathLike[str],
        *,
        mode: int = 0o660,
        rescan: float = 1.0,
    ) -> None:
        self.native = native()
        self.replica = replica
        self.dir = Path(directory)
        self.mode = mode & 0o666
        self.rescan = rescan
        self.instance = secrets.randbits(63) | 1
        self.published: dict[str, tuple[SegmentState, Entry]] = {}
        self.files_written = 0
        self._next_file = 0
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._capacity = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0

    @property
    def index_path(self) -> Path:
        return self.dir / layout.INDEX_NAME

    def info(self) -> dict[str, Any]:
        """What the `shm_info` socket op answers: where a reader finds the index."""
        return {
            "layout": layout.LAYOUT,
            "dir": str(self.dir),
            "index": str(self.index_path),
            "instance": self.instance,
        }

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> ShmWriter:
        """Take the directory (one writer per directory), clear what an earlier writer left,
        create the index; ShmUnavailable with the reason when it cannot."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # readers need x on the directory
                group = 0o050 if self.mode & 0o060 else 0
                other = 0o005 if self.mode & 0o006 else 0
                os.chmod(self.dir, 0o700 | group | other)
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ShmUnavailable(
                    f"another sidecar publishes a shared replica in {self.dir}"
                ) from None
            self._lock_fd = fd
            for old in self.dir.iterdir():
                if old.suffix == ".seg" or old.name.startswith(layout.INDEX_NAME):
                    old.unlink(missing_ok=True)
            self._new_index(1024)
        except OSError as exc:
            self._release()
            raise ShmUnavailable(f"cannot publish a shared replica in {self.dir}: {exc}") from None
        self.replica.waiters.watch(self._wake.set)
        self._thread = threading.Thread(target=self._run, name="shm-writer", daemon=True)
        self._thread.start()
        log.info("shared replica in %s", self.dir)
        return self

    def stop(self) -> None:
        """Mark the index closed (readers let go and look for a new one) and remove the files
        (readers that still map them keep them until they do)."""
        self._stop.set()
        self._wake.set()
        self.replica.waiters.unwatch(self._wake.set)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._map is not None:
            self._close_index()
            for _state, entry in self.published.values():
                self._file(entry.file).unlink(missing_ok=True)
            self.published.clear()
            self.index_path.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the index ------------------------------------------------------------------------------
    def _new_index(self, capacity: int) -> None:
        """A new index file with room for `capacity` entries, renamed over the old one, which
        is then marked closed so its readers move over."""
        size = layout.ENTRIES_OFFSET + capacity * layout.ENTRY_SIZE
        tmp = self.dir / f"{layout.INDEX_NAME}.{self.instance:x}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.mode)
        os.fchmod(fd, self.mode)
        os.ftruncate(fd, size)
        new = mmap.mmap(fd, size)
        new[: layout.HEADER.size] = layout.header(capacity, self.instance, self._beat_ms())
        entries = [e for _s, e in self.published.values()]
        data = layout.table(entries)
        new[layout.TABLE_OFFSET : layout.TABLE_OFFSET + len(data)] = data
        os.rename(tmp, self.index_path)
        if self._map is not None:
            self._close_index()
        self._fd, self._map, self._capacity = fd, new, capacity

    def _close_index(self) -> None:
        assert self._map is not None and self._fd is not None
        closed = layout.CLOSED.to_bytes(4, "little")
        self._map[layout.STATE_OFFSET : layout.STATE_OFFSET + 4] = closed
        self.native.write_locked(self._map, layout.SEQ_OFFSET, b"", layout.TABLE_OFFSET)
        self._map.close()
        os.close(self._fd)
        self._map = self._fd = None

    def _beat_ms(self) -> int:
        return int(self.native.coarse_ms())

    def beat(self) -> None:
        if self._map is not None:
            self.native.store(self._map, layout.HEARTBEAT_OFFSET, self._beat_ms())
        self._last_beat = time.monotonic()

    def _file(self, number: int) -> Path:
        return layout.segment_file(self.dir, self.instance, number)

    # -- publishing ---------------------------------------------------------------------------
    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(layout.HEARTBEAT_S)
            if self._stop.is_set():
                return
            try:
                now = time.monotonic()
                if woken or now - last_scan >= self.rescan:
                    self._wake.clear()  # before the pass: a change during it wakes the next
                    last_scan = now
                    self.sync()
                if time.monotonic() - self._last_beat >= layout.HEARTBEAT_S:
                    self.beat()
            except Exception:  # keep publishing heartbeats is worse than stopping: log, retry
                log.exception("shared replica: publishing failed")
                self._stop.wait(1.0)

    def sync(self) -> bool:
        """Publish what `Replica.local` answers now; True when the table changed."""
        replica = self.replica
        local = replica.local
        names = retry_changed(lambda: list(replica.engine.segments))
        new: dict[str, tuple[SegmentState, Entry]] = {}
        changed = False
        for name in names:
            st = local(name)
            if type(st) is not SegmentState:
                continue
            old = self.published.get(name)
            if old is not None and old[0] is st:
                new[name] = old
                continue
            with replica.engine.lock:  # bitmaps change in place under it
                st = local(name)
                if type(st) is not SegmentState:
                    continue
                members = st.bitmap
                if is_compact(members) and members.version == st.version:
                    ids = None  # already this format (sidecar/replica/forms.py)
                else:
                    ids = members.to_array()
            data = members.data if ids is None else self.native.encode(ids, st.version)
            del ids, members
            self._next_file += 1
            number = self._next_file
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(self._file(number), flags, self.mode)
            try:
                os.fchmod(fd, self.mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            self.files_written += 1
            new[name] = (st, Entry(name, number, st.version, st.cardinality, st.updated_ms))
            changed = True
            if time.monotonic() - self._last_beat >= layout.HEARTBEAT_S:
                self.beat()
        if not changed and new.keys() == self.published.keys():
            return False
        gone = [
            e.file for s, (_st, e) in self.published.items() if new.get(s, (None, None))[1] is not e
        ]
        if len(new) > self._capacity:
            self.published = new
            self._new_index(max(2 * len(new), 2 * self._capacity))
        else:
            assert self._map is not None
            data = layout.table([e for _s, e in new.values()])
            self.native.write_locked(self._map, layout.SEQ_OFFSET, data, layout.TABLE_OFFSET)
        self.published = new
        for number in gone:
            self._file(number).unlink(missing_ok=True)
        return True
