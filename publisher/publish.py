"""One publish: recover the log's state, diff, write Aerospike, then one Kafka transaction."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pyroaring import BitMap64

from sidecar.replica.engine import Engine
from sidecar.replica.recovery import bootstrap
from sidecar.transport.base import Transport

from .plan import Change, SnapshotPolicy, diff, records

log = logging.getLogger(__name__)

#: A failpoint for crash tests: SEG_PUBLISH_FAULT=<point> kills the process with SIGKILL there.
FAULT_ENV = "SEG_PUBLISH_FAULT"
FAULT_POINTS = ("after-recover", "after-aerospike", "mid-transaction", "after-commit")


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class MembershipSink(Protocol):
    """Where per-user memberships go besides the log (Aerospike)."""

    def apply(self, changes: list[Change], progress: Callable[[int, int], None]) -> int:
        """Write the changes; returns the number of user records written."""
        ...


@dataclass(slots=True)
class PublishResult:
    versions: dict[str, int] = field(default_factory=dict)
    adds: int = 0
    removes: int = 0
    drops: int = 0
    snapshots: int = 0
    records: int = 0
    log_bytes: int = 0
    aerospike_records: int = 0
    seconds: float = 0.0

    @property
    def segments_changed(self) -> int:
        return len(self.versions)

    def summary(self) -> str:
        return (
            f"segments changed {self.segments_changed}, adds {self.adds:,}, "
            f"removes {self.removes:,}, drops {self.drops}, snapshots {self.snapshots}, "
            f"log records {self.records} ({self.log_bytes:,} bytes), "
            f"aerospike records {self.aerospike_records:,}, time {self.seconds:.2f} s"
        )


def _quiet(_msg: str) -> None:
    return None


class Publisher:
    """Publishes desired segment states to the log (and Aerospike when a sink is given).

    The current state always comes from replaying the log, never from a local file, so
    re-running a publish after a crash at any point converges to the same log and records.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        writer_id: str = "seg-publisher",
        partitions: int | None = None,
        sink: MembershipSink | None = None,
        policy: SnapshotPolicy | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.transport = transport
        self.writer_id = writer_id
        self.partitions = partitions
        self.sink = sink
        self.policy = policy or SnapshotPolicy()
        self.progress = progress or _quiet

    def publish(
        self,
        desired: Mapping[str, BitMap64],
        *,
        prune: bool = False,
        drop: Iterable[str] = (),
    ) -> PublishResult:
        both = sorted(set(drop) & set(desired))
        if both:
            raise ValueError(f"segments both in the input and to drop: {', '.join(both)}")
        started = time.monotonic()
        # The writer first: on Kafka, init_transactions fences an older publisher and aborts
        # its unfinished transaction, so the state read next cannot change under us.
        with self.transport.writer(self.writer_id, self.partitions) as writer:
            engine = Engine()
            with self.transport.reader() as reader:
                bootstrap(reader, engine, progress=lambda m: self.progress(f"recover: {m}"))
                offsets = {p: reader.position("deltas", p) for p in range(reader.partitions)}
                unhealthy = [s for s, st in engine.segments.items() if not st.fresh]
                if unhealthy:
                    log.warning("log history damaged for %s: republishing whole", unhealthy)
            _fault("after-recover")
            to_drop = set(drop)
            if prune:
                to_drop |= set(engine.segments) - set(desired)
            plan = diff(engine, dict(desired), drop=to_drop, policy=self.policy)
            result = PublishResult()
            if not plan.changes:
                result.seconds = time.monotonic() - started
                return result
            if self.sink is not None:
                result.aerospike_records = self.sink.apply(plan.changes, self._progress_users)
            _fault("after-aerospike")
            ts = int(time.time() * 1000)
            with writer.transaction():
                for i, change in enumerate(plan.changes):
                    info = engine.log_info.get(change.segment)
                    old_chunks = info.snapshot_chunks if info else 0
                    for topic, p, key, value in records(
                        change, writer.partitions, ts, offsets, old_chunks
                    ):
                        result.log_bytes += writer.append(topic, p, key, value)
                        result.records += 1
                    if i == len(plan.changes) // 2:
                        _fault("mid-transaction")
            _fault("after-commit")
        for change in plan.changes:
            result.versions[change.segment] = change.version
            result.adds += len(change.add)
            result.removes += len(change.remove) if not change.drop else 0
            result.drops += change.drop
            result.snapshots += change.snapshot is not None
        result.seconds = time.monotonic() - started
        return result

    def _progress_users(self, done: int, total: int) -> None:
        self.progress(f"aerospike: {done:,}/{total:,} user records")


def publish(
    transport: Transport,
    segments: Mapping[str, BitMap64],
    *,
    prune: bool = False,
    sink: MembershipSink | None = None,
    writer_id: str = "seg-publisher",
) -> dict[str, int]:
    """Publish `segments` (name -> members); returns the new version of each changed one."""
    return (
        Publisher(transport, writer_id=writer_id, sink=sink).publish(segments, prune=prune).versions
    )
