"""The segment sidecar: an in-memory roaring-bitmap replica of the segment log, its servers
and clients.

    from sidecar import Replica, LogDirTransport, SidecarClient

    replica = Replica(LogDirTransport("/var/lib/segments/log")).start()
    replica.wait_ready(30)
    replica.contains(42, "vip_buyers")          # in-process, well under a microsecond
    replica.eval(42, "vip_buyers & !churned")   # a segment expression (sidecar/expr/)
    replica.count("vip_buyers & !churned")      # (count, versions) from one consistent view

    with SidecarClient("/tmp/seg-sidecar/sidecar.sock") as client:
        client.check(42, "vip_buyers")          # over the sidecar's Unix socket
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import transport
from .client import AsyncSidecarClient, SidecarClient
from .ids import BadRequest
from .replica import Replica
from .transport import LogDirTransport

if TYPE_CHECKING:
    from .transport.kafka import KafkaTransport

__all__ = [
    "AsyncSidecarClient",
    "BadRequest",
    "KafkaTransport",
    "LogDirTransport",
    "Replica",
    "SidecarClient",
]


def __getattr__(name: str) -> Any:
    if name == "KafkaTransport":  # imported lazily by sidecar.transport too
        return transport.KafkaTransport
    raise AttributeError(f"module 'sidecar' has no attribute {name!r}")
