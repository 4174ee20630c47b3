"""Log transports: Kafka and the embedded log directory behind one interface (each imported
on first use: confluent_kafka only by whoever uses Kafka)."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .base import (
    TOPICS,
    FencedError,
    LogReader,
    LogRecord,
    LogWriter,
    Topic,
    Transport,
    TransportError,
)

if TYPE_CHECKING:
    from .kafka import KafkaTransport
    from .logdir import LogDirTransport

__all__ = [
    "TOPICS",
    "FencedError",
    "KafkaTransport",
    "LogDirTransport",
    "LogReader",
    "LogRecord",
    "LogWriter",
    "Topic",
    "Transport",
    "TransportError",
]

__getattr__ = lazy_exports(__name__, {"KafkaTransport": ".kafka", "LogDirTransport": ".logdir"})
