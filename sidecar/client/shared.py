"""`SharedReplica`: membership checks from the sidecar's replica mapped into this process
(docs/SHARED_REPLICA.md), with no system call per check.

    r = SharedReplica("/tmp/seg-sidecar/sidecar.sock")
    r.contains(user, segment)   # True / False as the sidecar's local check, None otherwise
    r.check(user, segment)      # the same, asking the sidecar's socket where it is None

`contains` is one C call (sidecar/shm/_native.c): it reads the index's sequence number and the
writer's heartbeat from the mapping, and searches the segment's mapped file. When either moved
(a publish landed, the sidecar stopped or restarted) it calls `_refresh` first, which takes a
consistent copy of the index's table under its seqlock and maps the files it names; a reader
whose sidecar went away answers None and looks for a new index (through the socket's
`shm_info`) at most every `retry_s`. Safe to share between threads (the GIL serialises the C
path; a refresh under way in another thread leaves the previous, consistent table in use).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from ..ids import segment_id, user_id
from ..shm import layout, native
from .base import DEFAULT_PATH, SidecarError
from .sync import SidecarClient

_MASK32 = 0xFFFFFFFF


class SharedReplica:
    """`SharedReplica(uds_path)`, or `SharedReplica(shm_dir=DIR)` for a directory given
    directly. sidecar.shm.ShmUnavailable when the C extension is not built."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        shm_dir: str | os.PathLike[str] | None = None,
        timeout: float = 1.0,
        max_age_ms: int = layout.MAX_AGE_MS,
        retry_s: float = 0.2,
    ) -> None:
        self.native = native()
        self.path = os.fspath(path)
        self.shm_dir = os.fspath(shm_dir) if shm_dir is not None else None
        self.timeout = timeout
        self.max_age_ms = max_age_ms
        self.retry_s = retry_s
        self._client: SidecarClient | None = None
        self._index_path: str | None = None
        self._files: dict[str, tuple[int, Any, layout.Entry]] = {}
        self._last_try = float("-inf")
        self._refreshing = threading.Lock()
        #: how many times an index was mapped (the first time included)
        self.remaps = 0
        self.instance: int | None = None
        self._reader = self.native.Reader(
            self._refresh,
            self._miss,
            seq_offset=layout.SEQ_OFFSET,
            heartbeat_offset=layout.HEARTBEAT_OFFSET,
            max_age_ms=max_age_ms,
        )
        #: contains(user, segment) -> True / False / None: the hot path, one C call
        self.contains = self._reader.contains

    # -- what the C path hands back ------------------------------------------------------------
    @staticmethod
    def _miss(user: object, segment: object) -> None:
        """A segment not published (or bad arguments: BadRequest, as the sidecar says)."""
        user_id(user)
        segment_id(segment)
        return None

    def _refresh(self) -> None:
        if not self._refreshing.acquire(blocking=False):
            return  # another thread is at it; the table in use is consistent
        try:
            r = self._reader
            if r.mapped:
                if r.load(layout.STATE_OFFSET) & _MASK32 == layout.OPEN and self._alive():
                    self._take_table()
                    return
                self._drop()
            now = time.monotonic()
            if now - self._last_try >= self.retry_s:
                self._last_try = now
                self._open()
        finally:
            self._refreshing.release()

    def _alive(self) -> bool:
        """The mapped index's writer stamped its heartbeat recently."""
        beat = self._reader.load(layout.HEARTBEAT_OFFSET)
        return self.native.coarse_ms() - beat <= self.max_age_ms

    def _drop(self) -> None:
        self._reader.unmap()
        self._reader.set(0, {})
        self._files = {}
        self.instance = None

    def _take_table(self) -> bool:
        """Map the files of a consistent copy of the table; False when the writer kept the
        table busy (the previous one stays in use)."""
        r = self._reader
        for _ in range(100):
            snap = r.snapshot(
                layout.TABLE_OFFSET, layout.COUNT_OFFSET, layout.ENTRY_SIZE, layout.ENTRIES_OFFSET
            )
            if snap is None:
                return False
            seq, data = snap
            files: dict[str, tuple[int, Any, layout.Entry]] = {}
            try:
                for e in layout.parse_table(data):
                    old = self._files.get(e.segment)
                    if old is not None and old[0] == e.file:
                        files[e.segment] = old
                        continue
                    path = layout.segment_file(self._dir(), self.instance or 0, e.file)
                    files[e.segment] = (e.file, self.native.Segment(str(path)), e)
            except FileNotFoundError:
                continue  # replaced since the copy was taken: take the table again
            self._files = files
            r.set(seq, {name: f[1] for name, f in files.items()})
            return True
        return False

    def _dir(self) -> str:
        return os.path.dirname(self._index_path or "")

    def _open(self) -> None:
        """Find and map the index (the socket says where, unless given a directory)."""
        index = self._locate()
        if index is None:
            return
        r = self._reader
        try:
            r.map(index)
        except (OSError, ValueError):
            return
        try:
            head = b"".join(r.load(off).to_bytes(8, "little") for off in range(0, 48, 8))
            instance, state, _capacity = layout.parse_header(head)
        except ValueError:
            self._drop()
            return
        if state != layout.OPEN or not self._alive():
            self._drop()  # closed, or left behind by a writer that died
            return
        self._index_path = index
        self.instance = instance
        self._files = {}
        if self._take_table():
            self.remaps += 1
        else:
            self._drop()

    def _locate(self) -> str | None:
        if self.shm_dir is not None:
            return os.path.join(self.shm_dir, layout.INDEX_NAME)
        try:
            info = self.client().shm_info()
        except SidecarError:
            return self._index_path  # the sidecar is away: the last known place, if any
        if not isinstance(info, dict) or info.get("layout") != layout.LAYOUT:
            return None  # not published (--shm '') or a layout this reader does not know
        return str(info.get("index") or "") or None

    # -- the rest of the API -------------------------------------------------------------------
    def client(self) -> SidecarClient:
        """The socket client this reader asks where the index is (and `check` asks)."""
        if self._client is None:
            self._client = SidecarClient(self.path, self.timeout)
        return self._client

    def check(self, user: int, segment: str) -> bool | None:
        """`contains`, and the sidecar's socket check (local, then its fallback) where that is
        None."""
        found = self.contains(user, segment)
        if found is not None:
            return found
        return self.client().check(user, segment)

    def segment(self, segment: str) -> Any:
        """The mapped segment as of now (`.contains(user)`, `.version`, `.cardinality`): one
        version however long it is held; None when `contains` would answer None."""
        self.contains(0, segment)  # brings the table up to date
        found = self._files.get(segment)
        return found[1] if found is not None else None

    def segments(self) -> dict[str, int]:
        """segment -> version of what this reader answers now."""
        self.contains(0, "a")
        return {name: f[2].version for name, f in self._files.items()}

    @property
    def connected(self) -> bool:
        """An index is mapped, current, and its writer alive."""
        return bool(self._reader.current)

    def close(self) -> None:
        self._drop()
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SharedReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
