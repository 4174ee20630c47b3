"""Clients of the sidecar's Unix socket: `SidecarClient` (blocking, lowest latency) and
`AsyncSidecarClient` (asyncio, pipelined); `SharedReplica` reads the replica a sidecar on the
same host publishes in shared memory, with no system call per check."""

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
from .shared import SharedReplica
from .sync import SidecarClient

__all__ = [
    "DEFAULT_PATH",
    "AsyncSidecarClient",
    "BadRequestError",
    "Explain",
    "NotLocalError",
    "ServerError",
    "SharedReplica",
    "SidecarClient",
    "SidecarError",
    "SidecarTimeout",
    "SidecarUnavailable",
    "UnknownOpError",
]
