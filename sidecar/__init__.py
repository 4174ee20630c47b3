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

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
    from .client import AsyncSidecarClient, SidecarClient
    from .ids import BadRequest
    from .replica import Replica
    from .transport.kafka import KafkaTransport
    from .transport.logdir import LogDirTransport

__all__ = [
    "AsyncSidecarClient",
    "BadRequest",
    "KafkaTransport",
    "LogDirTransport",
    "Replica",
    "SidecarClient",
]

# imported on first use (sidecar/lazy.py): `import sidecar.partitioner` loads no servers,
# clients or Kafka
__getattr__ = lazy_exports(
    __name__,
    {
        "AsyncSidecarClient": ".client",
        "SidecarClient": ".client",
        "BadRequest": ".ids",
        "Replica": ".replica",
        "KafkaTransport": ".transport.kafka",
        "LogDirTransport": ".transport.logdir",
    },
)
