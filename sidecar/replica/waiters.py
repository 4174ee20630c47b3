"""Read-your-publish waiters (DESIGN.md "Freshness"): callers waiting for a segment to reach
a version, woken by the replica thread when that segment changes, never by polling.

A waiter is a callback registered for one segment; `notify(segment)` runs every callback of
that segment once (the replica thread calls it from `Engine.on_change`), `notify_all()` every
callback (on readiness). A watcher (`watch`) is called on every notify, for any segment, and
stays registered (the shared replica's writer, sidecar/shm/writer.py). Callbacks must be cheap
and thread-safe: the asyncio one is `loop.call_soon_threadsafe`, the blocking one sets a
`threading.Event`. A woken waiter checks again and registers anew if the version has not
landed yet, so a spurious wake costs one check.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

Wake = Callable[[], None]


class Waiters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_segment: dict[str, list[Wake]] = {}
        self._watchers: list[Wake] = []

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._by_segment.values())

    def add(self, segment: str, wake: Wake) -> None:
        with self._lock:
            self._by_segment.setdefault(segment, []).append(wake)

    def discard(self, segment: str, wake: Wake) -> None:
        with self._lock:
            wakes = self._by_segment.get(segment)
            if wakes is None:
                return
            try:
                wakes.remove(wake)
            except ValueError:
                return
            if not wakes:
                del self._by_segment[segment]

    def watch(self, wake: Wake) -> None:
        """Call `wake()` on every change of any segment (and on readiness), until `unwatch`."""
        with self._lock:
            self._watchers = [*self._watchers, wake]

    def unwatch(self, wake: Wake) -> None:
        with self._lock:
            self._watchers = [w for w in self._watchers if w is not wake]

    def notify(self, segment: str) -> None:
        for watcher in self._watchers:
            watcher()
        if segment not in self._by_segment:  # the common case, no lock: nobody waits
            return
        with self._lock:
            wakes = self._by_segment.pop(segment, ())
        for wake in wakes:
            wake()

    def notify_all(self) -> None:
        for watcher in self._watchers:
            watcher()
        with self._lock:
            wakes = [w for ws in self._by_segment.values() for w in ws]
            self._by_segment.clear()
        for wake in wakes:
            wake()

    async def wait(self, segment: str, done: Callable[[], bool], timeout: float) -> bool:
        """Until `done()` (checked after each change of `segment`) or `timeout` seconds;
        returns `done()`. Costs no task and no timer per change: one future per wake."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut: asyncio.Future[None] = loop.create_future()

            def wake(fut: asyncio.Future[None] = fut) -> None:
                loop.call_soon_threadsafe(_resolve, fut)

            self.add(segment, wake)
            try:
                if done():  # landed before we registered: no wake would come
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    async with asyncio.timeout(remaining):
                        await fut
                except TimeoutError:
                    return done()
            finally:
                self.discard(segment, wake)

    def wait_blocking(self, segment: str, done: Callable[[], bool], timeout: float) -> bool:
        """`wait` for a thread (the embedded replica's callers)."""
        deadline = time.monotonic() + timeout
        while True:
            event = threading.Event()
            self.add(segment, event.set)
            try:
                if done():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not event.wait(remaining):
                    return done()
            finally:
                self.discard(segment, event.set)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
