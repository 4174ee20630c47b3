"""Clients of the sidecar's Unix socket: `SidecarClient` (blocking, lowest latency) and
`AsyncSidecarClient` (asyncio, pipelined)."""

from .aio import AsyncSidecarClient
from .base import (
    DEFAULT_PATH,
    BadRequestError,
    Explain,
    NotLocalError,
    ServerError,
    SidecarError,
    SidecarTimeout,
    SidecarUnavailable,
    UnknownOpError,
)
from .sync import SidecarClient

__all__ = [
    "DEFAULT_PATH",
    "AsyncSidecarClient",
    "BadRequestError",
    "Explain",
    "NotLocalError",
    "ServerError",
    "SidecarClient",
    "SidecarError",
    "SidecarTimeout",
    "SidecarUnavailable",
    "UnknownOpError",
]
