"""The log transport interface: what the replica engine and the publisher see.

Two logical topics, `deltas` and `snapshots`, with the same partition count. A writer appends
records in transactions (all or nothing, across partitions and topics); a reader sees only
committed records, in offset order within a partition, and can tail. Kafka and a local
directory implement it (`kafka.py`, `logdir.py`).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

Topic = Literal["deltas", "snapshots"]
TOPICS: tuple[Topic, Topic] = ("deltas", "snapshots")


class TransportError(RuntimeError):
    """The log cannot be reached or used as asked. The message says why."""


class NewLogIdentity(TransportError):
    """The log took a new identity under a reader, or shrank under it (`seg-publish
    --repair-log`): its offsets and versions may mean other changes now."""


class FencedError(TransportError):
    """Another writer with the same identity took over: this one must stop."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    topic: Topic
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None is a tombstone (snapshots topic)


class LogWriter(abc.ABC):
    """Appends records in transactions. One writer per log identity at a time: a second one
    fences the first."""

    partitions: int

    @abc.abstractmethod
    def begin(self) -> None: ...

    @abc.abstractmethod
    def append(self, topic: Topic, partition: int, key: bytes | None, value: bytes | None) -> int:
        """Queue one record in the open transaction; returns its size in bytes."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Commit the open transaction; on return every reader sees it (read-your-writes:
        a replica that starts right after a publish includes that publish)."""

    @abc.abstractmethod
    def abort(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @contextmanager
    def transaction(self) -> Iterator[LogWriter]:
        """`with writer.transaction():` commits on success, aborts on any exception."""
        self.begin()
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.commit()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogReader(abc.ABC):
    """Reads committed records of assigned partitions, from a chosen offset, and tails."""

    partitions: int

    @abc.abstractmethod
    def watermarks(self, topic: Topic, partition: int) -> tuple[int, int]:
        """(first offset still held, end offset of committed data)."""

    def watermarks_all(self, topic: Topic) -> dict[int, tuple[int, int]]:
        """`watermarks` of every partition of `topic`, in one round trip where the log can."""
        return {p: self.watermarks(topic, p) for p in range(self.partitions)}

    @abc.abstractmethod
    def assign(self, assignments: dict[tuple[Topic, int], int]) -> None:
        """Read exactly these (topic, partition) from these offsets, replacing any earlier
        assignment."""

    @abc.abstractmethod
    def poll(self, timeout: float) -> list[LogRecord]:
        """Committed records in offset order per partition; [] after `timeout` seconds idle, or
        sooner when a position moved past offsets that hold no records (transaction markers)."""

    @abc.abstractmethod
    def position(self, topic: Topic, partition: int) -> int:
        """The offset this reader reads next in that partition (past markers it skipped)."""

    def identity(self) -> str | None:
        """`Transport.identity()` of the log as this reader opened it, when the reader knows it
        without a round trip; None otherwise. A reader that sees the log take a new identity
        under it raises NewLogIdentity (its offsets may mean other records now)."""
        return None

    def damage(self) -> str | None:
        """Why this reader cannot read past some point of the log (a damaged log directory),
        in one line; None when nothing is in the way."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...

    def read_until(
        self, ends: dict[tuple[Topic, int], int], *, stall_timeout: float = 120.0
    ) -> Iterator[LogRecord]:
        """Records of the assigned partitions until each reached its end offset in `ends`;
        TransportError when none comes for `stall_timeout` seconds."""
        last_progress = time.monotonic()
        while True:
            behind = [tp for tp, end in ends.items() if self.position(*tp) < end]
            if not behind:
                return
            records = self.poll(0.2)
            if records:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall_timeout:
                raise TransportError(f"no progress reading {behind} for {stall_timeout:.0f} s")
            yield from records

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport(abc.ABC):
    """A log: makes readers and writers. `describe()` names it for logs and status."""

    @abc.abstractmethod
    def reader(self) -> LogReader: ...

    @abc.abstractmethod
    def writer(self, writer_id: str, partitions: int | None = None) -> LogWriter:
        """A transactional writer; creates the topics with `partitions` when absent."""

    @abc.abstractmethod
    def describe(self) -> str: ...

    def identity(self) -> str:
        """Names this log and its incarnation: a log deleted and created again at the same
        place gets a new identity, so checkpoints of the old one are not trusted."""
        return self.describe()
