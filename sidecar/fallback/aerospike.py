"""The Aerospike fallback: one `get` of bin `segs` for a user the replica cannot answer.

The aerospike client is synchronous (a C client), so calls run on a small thread pool. Each
call has a time budget (client-side `total_timeout` plus an asyncio deadline), at most
`max_in_flight` calls run at once (beyond that the answer is None at once), and a circuit
breaker stops calling a server that keeps failing. It never raises and never hangs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..aerospike_layout import AerospikeTarget, map_version
from .base import Fallback, FallbackMap
from .breaker import CircuitBreaker

log = logging.getLogger(__name__)


class AerospikeFallback(Fallback):
    name = "aerospike"

    def __init__(
        self,
        target: AerospikeTarget,
        *,
        budget_ms: float = 5.0,
        max_in_flight: int = 64,
        breaker: CircuitBreaker | None = None,
        threads: int = 8,
    ) -> None:
        self.target = target
        self.budget = budget_ms / 1000.0
        self.max_in_flight = max_in_flight
        self.breaker = breaker or CircuitBreaker()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aerospike")
        self._client: Any = None
        self._connect_lock = threading.Lock()
        self._last_connect_try = 0.0
        self._connecting = False
        self._closed = False
        self.in_flight = 0
        self.calls = {"ok": 0, "not_found": 0, "timeout": 0, "error": 0, "rejected": 0}

    # -- connection (lazy, in the background, retried at most once a second) ---------------
    def _policies(self) -> dict[str, Any]:
        budget_ms = max(1, int(self.budget * 1000))
        return {
            "read": {"total_timeout": budget_ms, "socket_timeout": budget_ms, "max_retries": 0},
            "login_timeout_ms": 1000,
        }

    def start(self) -> None:
        """Begin connecting now (in the background), so the first misses find a client."""
        self._connect_in_background()

    def _connect_in_background(self) -> None:
        """Start one connection attempt on its own thread (one at a time, at most once a
        second). Connecting takes longer than the budget, so it stays off the request path:
        calls made meanwhile answer None at once and are not breaker failures (otherwise a
        burst of first calls would all time out on the connect and open the breaker)."""
        with self._connect_lock:
            if self._client is not None or self._connecting or self._closed:
                return
            now = time.monotonic()
            if now - self._last_connect_try < 1.0:
                return
            self._last_connect_try = now
            self._connecting = True
        threading.Thread(target=self._connect, name="aerospike-connect", daemon=True).start()

    def _connect(self) -> None:
        try:
            client = self.target.connect(self._policies(), connect_timeout=1000, tend_interval=1000)
        except Exception as exc:
            log.warning("cannot connect to Aerospike %s: %s", self.target.describe(), exc)
            with self._connect_lock:
                self._connecting = False
            return
        with self._connect_lock:
            self._connecting = False
            if not self._closed:
                self._client = client
                return
        client.close()  # closed while connecting

    def _connected(self) -> Any:
        client = self._client
        if client is None:
            raise ConnectionError("Aerospike not connected")
        return client

    def _get(self, user: int) -> dict[str, int]:
        import aerospike

        client = self._connected()
        bin_name = self.target.bin_name
        try:
            _, _, bins = client.select(self.target.key(user), [bin_name])
        except aerospike.exception.RecordNotFound:
            return {}
        value = (bins or {}).get(bin_name) or {}
        now = int(time.time() * 1000)  # a malformed value raises: the answer is unknown
        found = FallbackMap()
        for k, v in value.items():
            version = map_version(v, now)  # None: a TTL membership past its expiry
            if version is not None:
                found[str(k)] = version
                if type(v) is list:  # map_version checked it: [version, expires_at_ms]
                    found.expires_at[str(k)] = v[1]
        return found

    # -- the fallback ---------------------------------------------------------------------
    async def segments_of(self, user: int) -> dict[str, int] | None:
        if self._client is None:
            self._connect_in_background()
            self.calls["rejected"] += 1
            return None
        if self.in_flight >= self.max_in_flight or not self.breaker.allow():
            self.calls["rejected"] += 1
            return None
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._get, user)
        try:
            # The client enforces the budget; the deadline here covers a stuck call.
            result = await asyncio.wait_for(future, self.budget + 0.002)
        except TimeoutError:
            self.calls["timeout"] += 1
            self.breaker.failure()
            return None
        except Exception as exc:
            self.calls["timeout" if "imeout" in type(exc).__name__ else "error"] += 1
            self.breaker.failure()
            log.debug("aerospike get failed: %s", exc)
            return None
        finally:
            self.in_flight -= 1
        self.breaker.success()
        self.calls["ok" if result else "not_found"] += 1
        return result

    def status(self) -> dict[str, object]:
        return {
            "kind": self.name,
            "hosts": [f"{h}:{p}" for h, p in self.target.hosts],
            "breaker": self.breaker.state,
            "breaker_opened": self.breaker.opened_total,
            "in_flight": self.in_flight,
            "calls": dict(self.calls),
            "budget_ms": self.budget * 1000,
        }

    async def close(self) -> None:
        """Stop calling, wait for the calls already out, then free the client. Freeing it
        under a call still running on the pool is a use-after-free in the C client (it
        aborted the process); the wait is bounded by the calls' own `total_timeout`."""
        with self._connect_lock:
            self._closed = True
            client, self._client = self._client, None
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        if client is not None:
            client.close()
