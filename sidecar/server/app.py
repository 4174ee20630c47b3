"""Both servers (Unix socket and HTTP) on one event loop, around one query layer."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..fallback.base import Fallback
from ..protocol import DEFAULT_MAX_FRAME
from .http import DEFAULT_MAX_BODY, DEFAULT_TIMEOUTS, HttpServer, HttpTimeouts
from .metrics import Metrics
from .queries import Queries
from .uds import DEFAULT_SOCKET_MODE, UdsServer

if TYPE_CHECKING:
    from ..replica.runner import Replica

log = logging.getLogger(__name__)

DEFAULT_UDS = "/tmp/seg-sidecar/sidecar.sock"


@dataclass(frozen=True)
class ServerOptions:
    """How the servers listen and bound their clients (`seg-sidecar`'s server options)."""

    uds_path: str | os.PathLike[str] | None = DEFAULT_UDS
    http_host: str | None = "127.0.0.1"
    http_port: int | None = 8571
    socket_mode: int = DEFAULT_SOCKET_MODE
    max_frame: int = DEFAULT_MAX_FRAME
    max_body: int = DEFAULT_MAX_BODY
    grace: float = 5.0
    process_metrics: bool = True
    ui: bool = True
    http_timeouts: HttpTimeouts = DEFAULT_TIMEOUTS
    shm_info: dict[str, Any] | None = None


class Sidecar:
    """The servers of one sidecar. `start()` binds, `close()` shuts down gracefully: stop
    accepting, let in-flight requests finish (up to `grace` seconds), close connections."""

    def __init__(
        self,
        replica: Replica,
        fallback: Fallback | None = None,
        options: ServerOptions = ServerOptions(),  # noqa: B008 (frozen)
    ) -> None:
        opts = options
        self.replica = replica
        self.metrics = Metrics(replica, process=opts.process_metrics)
        self.queries = Queries(replica, fallback, metrics=self.metrics)
        if fallback is not None and "breaker" in fallback.status():
            states = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
            self.metrics.gauge(
                "seg_fallback_breaker_state",
                "The fallback's circuit breaker: 0 closed, 1 half-open, 2 open.",
                lambda: states.get(str(fallback.status()["breaker"]), -1.0),
            )
        self.grace = opts.grace
        self.uds: UdsServer | None = None
        self.http: HttpServer | None = None
        if opts.uds_path:
            self.uds = UdsServer(
                self.queries,
                opts.uds_path,
                metrics=self.metrics,
                mode=opts.socket_mode,
                max_frame=opts.max_frame,
                shm_info=opts.shm_info,
            )
        if opts.http_host is not None and opts.http_port is not None:
            self.http = HttpServer(
                self.queries,
                self.metrics,
                opts.http_host,
                opts.http_port,
                max_body=opts.max_body,
                shutdown_timeout=opts.grace,
                ui=opts.ui,
                timeouts=opts.http_timeouts,
            )

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def start(self) -> None:
        if self.uds is not None:
            await self.uds.start()
        if self.http is not None:
            try:
                await self.http.start()
            except BaseException:
                if self.uds is not None:
                    await self.uds.close(0)
                raise

    async def close(self) -> None:
        results = await asyncio.gather(
            *(s.close() for s in (self.uds, self.http) if s is not None), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                log.error("error while closing a server: %r", r)


async def serve(
    replica: Replica,
    fallback: Fallback | None,
    options: ServerOptions,
    *,
    stop: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Run both servers until `stop` is set (forever when None), then shut down gracefully.
    Run it on a uvloop loop (`uvloop.run(serve(...))`); the replica runs on its own thread."""
    sidecar = Sidecar(replica, fallback, options)
    await sidecar.start()
    if started is not None:
        started.set()
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        log.info("shutting down the servers")
        await sidecar.close()
