"""Log transports: Kafka and the embedded log directory behind one interface."""

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


def __getattr__(name: str) -> object:
    # confluent_kafka is imported only by whoever uses Kafka.
    if name == "KafkaTransport":
        from .kafka import KafkaTransport

        return KafkaTransport
    raise AttributeError(name)
