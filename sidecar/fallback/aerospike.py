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

from .base import Fallback
from .breaker import CircuitBreaker

log = logging.getLogger(__name__)


def user_key(user: int) -> int:
    """Aerospike integer keys are signed 64-bit: ids >= 2**63 wrap to negative keys. The
    publisher writes with the same mapping."""
    return user - 2**64 if user >= 2**63 else user


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]`."""
    hosts = []
    for item in spec.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {item!r}")
        hosts.append((host, int(port)))
    return hosts


class AerospikeFallback(Fallback):
    name = "aerospike"

    def __init__(
        self,
        hosts: list[tuple[str, int]],
        *,
        namespace: str = "test",
        set_name: str = "users",
        bin_name: str = "segs",
        budget_ms: float = 5.0,
        max_in_flight: int = 64,
        breaker: CircuitBreaker | None = None,
        user: str | None = None,
        password: str | None = None,
        tls_name: str | None = None,
        threads: int = 8,
    ) -> None:
        self.hosts = hosts
        self.namespace = namespace
        self.set_name = set_name
        self.bin_name = bin_name
        self.budget = budget_ms / 1000.0
        self.max_in_flight = max_in_flight
        self.breaker = breaker or CircuitBreaker()
        self._auth = (user, password) if user else None
        self._tls_name = tls_name
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aerospike")
        self._client: Any = None
        self._connect_lock = threading.Lock()
        self._last_connect_try = 0.0
        self._connecting = False
        self._closed = False
        self.in_flight = 0
        self.calls = {"ok": 0, "not_found": 0, "timeout": 0, "error": 0, "rejected": 0}

    # -- connection (lazy, in the background, retried at most once a second) ---------------
    def _config(self) -> dict[str, Any]:
        budget_ms = max(1, int(self.budget * 1000))
        hosts: list[tuple[Any, ...]] = (
            [(h, p, self._tls_name) for h, p in self.hosts] if self._tls_name else self.hosts
        )
        config: dict[str, Any] = {
            "hosts": hosts,
            "policies": {
                "read": {"total_timeout": budget_ms, "socket_timeout": budget_ms, "max_retries": 0},
                "login_timeout_ms": 1000,
            },
            "connect_timeout": 1000,
            "tend_interval": 1000,
        }
        if self._tls_name:
            config["tls"] = {"enable": True}
        return config

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
        import aerospike

        try:
            client = aerospike.client(self._config())
            if self._auth:
                client.connect(*self._auth)
            else:
                client.connect()
            if self._closed:  # closed while connecting
                client.close()
            else:
                self._client = client
        except Exception as exc:
            log.warning("cannot connect to Aerospike %s: %s", self.hosts, exc)
        finally:
            self._connecting = False

    def _connected(self) -> Any:
        client = self._client
        if client is None:
            raise ConnectionError("Aerospike not connected")
        return client

    def _get(self, user: int) -> dict[str, int]:
        import aerospike

        client = self._connected()
        try:
            _, _, bins = client.get((self.namespace, self.set_name, user_key(user)))
        except aerospike.exception.RecordNotFound:
            return {}
        value = (bins or {}).get(self.bin_name) or {}
        return {str(k): int(v) for k, v in value.items()}

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
            "hosts": [f"{h}:{p}" for h, p in self.hosts],
            "breaker": self.breaker.state,
            "breaker_opened": self.breaker.opened_total,
            "in_flight": self.in_flight,
            "calls": dict(self.calls),
            "budget_ms": self.budget * 1000,
        }

    async def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
            self._client = None
