"""Clients of the sidecar's Unix socket: `SidecarClient` (blocking, lowest latency) and
`AsyncSidecarClient` (asyncio, pipelined)."""

from .aio import AsyncSidecarClient
from .sync import (
    DEFAULT_PATH,
    BadRequestError,
    Explain,
    ServerError,
    SidecarClient,
    SidecarError,
    SidecarTimeout,
    SidecarUnavailable,
    UnknownOpError,
)

__all__ = [
    "DEFAULT_PATH",
    "AsyncSidecarClient",
    "BadRequestError",
    "Explain",
    "ServerError",
    "SidecarClient",
    "SidecarError",
    "SidecarTimeout",
    "SidecarUnavailable",
    "UnknownOpError",
]
