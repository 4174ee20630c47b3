"""One publish: recover the log's state, diff, write Aerospike, then one Kafka transaction."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pyroaring import BitMap64

from sidecar.ids import segment_id
from sidecar.record import Delta
from sidecar.replica import RecoveredLog, SegmentState
from sidecar.transport.base import LogWriter, Transport, TransportError

from .guard import Guard
from .plan import (
    Change,
    SnapshotPacing,
    SnapshotPolicy,
    diff,
    heartbeat_record,
    heartbeats,
    records,
)
from .segment_set import option_value

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
    #: memberships added: members the segments did not hold before
    adds: int = 0
    #: memberships written again that the segments held: re-affirmed by a TTL publish (a new
    #: expiry), or made permanent by a TTL segment's plain publish
    renewed: int = 0
    removes: int = 0
    drops: int = 0
    snapshots: int = 0
    #: heartbeats written (segments with a max_age_seconds, changed or not)
    heartbeats: int = 0
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
            f"renewed {self.renewed:,}, removes {self.removes:,}, drops {self.drops}, "
            f"snapshots {self.snapshots}, "
            f"heartbeats {self.heartbeats}, "
            f"log records {self.records} ({self.log_bytes:,} bytes), "
            f"aerospike records {self.aerospike_records:,}, time {self.seconds:.2f} s"
        )


def _quiet(_msg: str) -> None:
    return None


class _Session:
    """The writer (holding the log: it fences or locks out other writers) and the state
    recovered from the log, kept current by reading on from where the recovery stopped."""

    def __init__(self, publisher: Publisher) -> None:
        t = publisher.transport
        # The writer before the log is read: on Kafka, init_transactions fences an older
        # publisher and aborts its unfinished transaction, so the state read next cannot change
        # under us. It starts (~0.5 s on Kafka) while the state file loads.
        started: dict[str, Any] = {}

        def start() -> None:
            try:
                started["writer"] = t.writer(publisher.writer_id, publisher.partitions)
            except BaseException as exc:  # re-raised by the thread that waits for it
                started["error"] = exc

        thread = threading.Thread(target=start, name="publisher-writer", daemon=True)
        thread.start()

        def writer_ready() -> None:
            thread.join()
            if "error" in started:
                raise started["error"]

        self.pacing = SnapshotPacing()
        try:
            self.log = RecoveredLog(
                t,
                observer=self.pacing,
                progress=lambda m: publisher.progress(f"recover: {m}"),
                state_dir=publisher.state_dir,
                before_reading=writer_ready,
            )
        except BaseException:
            thread.join()
            if "writer" in started:
                started["writer"].close()
            raise
        self.writer: LogWriter = started["writer"]

    def remember(self, change: Change, chunks: int, ts: int) -> None:
        """Apply our own committed change, so the next publish needs no re-read of it."""
        if change.drop:
            self.log.wrote_drop(change.segment, change.version)
            self.pacing.snapshot(change.segment, change.version, 1)
        elif change.snapshot is not None:
            # a copy: the engine changes its bitmaps in place, and this one may be the caller's
            state = SegmentState(change.snapshot.copy(), change.version, change.cardinality, ts)
            expiries = change.snapshot_expiries
            self.log.wrote_state(change.segment, state, expiries.copy() if expiries else None)
            self.pacing.snapshot(change.segment, change.version, chunks)
        else:
            self.log.wrote_delta(
                Delta(change.segment, change.base, change.version, change.add, change.remove,
                      change.cardinality, ts, expires_at=change.expires_at_ms)
            )  # fmt: skip

    def close(self) -> None:
        try:
            self.log.close()
        finally:
            self.writer.close()


class Publisher:
    """Publishes desired segment states to the log (and Aerospike when a sink is given).

    The current state always comes from the log, so re-running a publish after a crash at any
    point converges to the same log and records. With `state_dir` it is also kept in a local
    file, written after each publish: a file verified against the log (its identity and the
    offsets it covers) spares replaying what it covers, and any other is ignored
    (`sidecar.replica.RecoveredLog`).
    With `session=True` (a long-running job such as the stream job), the writer and the
    recovered state are kept between publishes and only the log's new records are read;
    `close()` (or leaving a `with` block) releases them. Any error drops the session, so the
    next publish recovers from the log again.
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
        session: bool = False,
        guard: Guard | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        self.transport = transport
        self.state_dir = state_dir
        self.writer_id = writer_id
        self.partitions = partitions
        self.sink = sink
        self.policy = policy or SnapshotPolicy()
        self.progress = progress or _quiet
        self.keep_session = session
        self.guard = guard
        self._session: _Session | None = None

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(
        self,
        desired: Mapping[str, BitMap64],
        *,
        prune: bool = False,
        drop: Iterable[str] = (),
        min_cardinality: Mapping[str, int] | None = None,
        max_age: Mapping[str, int] | None = None,
        ttl: Mapping[str, int] | None = None,
    ) -> PublishResult:
        """Publish `desired` (segment -> members). With a `guard`, raises GuardError, having
        written nothing, when a change breaks it (see guard.py); `min_cardinality` holds the
        manifest's floors. Without one nothing is refused: the tools that publish a job's
        output (seg-publish, seg-compute batch and stream) pass theirs. `max_age` holds the
        manifest's `max_age_seconds` (see `plan.heartbeats`; None keeps the log's). `ttl`
        holds the manifest's `ttl_seconds`: those segments' members are added or re-affirmed,
        never removed (see `plan.diff`); any other segment is published as a full state."""
        drop = [segment_id(name, "drop") for name in drop]
        both = sorted(set(drop) & set(desired))
        if both:
            raise ValueError(f"segments both in the input and to drop: {', '.join(both)}")
        ttl = {s: option_value("ttl_seconds", n) for s, n in (ttl or {}).items() if s in desired}
        started = time.monotonic()
        try:
            if self._session is None:
                self._session = _Session(self)
            else:
                self._session.log.catch_up()
            result = self._publish(
                self._session,
                desired,
                prune,
                set(drop),
                min_cardinality or {},
                dict(max_age) if max_age is not None else None,
                ttl,
            )
            self._save_state(self._session)
        except BaseException:
            self.close()
            raise
        if not self.keep_session:
            self.close()
        result.seconds = time.monotonic() - started
        return result

    def _publish(
        self,
        session: _Session,
        desired: Mapping[str, BitMap64],
        prune: bool,
        drop: set[str],
        min_cardinality: Mapping[str, int],
        max_age: dict[str, int] | None,
        ttl: dict[str, int],
    ) -> PublishResult:
        state, writer = session.log, session.writer
        offsets = state.offsets()
        unhealthy = [s for s, st in list(state.segments.items()) if not st.fresh]
        if unhealthy:
            log.warning("log history damaged for %s: republishing whole", unhealthy)
        _fault("after-recover")
        explicit = frozenset(drop)
        if prune:
            drop |= set(state.segments) - set(desired)
        # TTL cardinalities count as of the records' time: expire through it first
        ts = int(time.time() * 1000)
        lapsing = {s: st.cardinality for s, st in list(state.segments.items()) if s in ttl}
        state.expire(ts)
        plan = diff(
            state, dict(desired), drop=drop, policy=self.policy, pacing=session.pacing,
            ttl=ttl, ts=ts,
        )  # fmt: skip
        if self.guard is not None:
            self.guard.check(
                state,
                plan,
                min_cardinality=min_cardinality,
                explicit_drops=explicit,
                lapsing=lapsing,
            )
        result = PublishResult()
        beats = heartbeats(state, dict(desired), plan, max_age, ts)
        if not plan.changes and not beats:
            return result
        if self.sink is not None and plan.changes:
            result.aerospike_records = self.sink.apply(plan.changes, self._progress_users)
        _fault("after-aerospike")
        # the log's time of the change: after the sink's writes (unless a TTL change counted
        # and timed its expiry as of the plan's time)
        if plan.changes and not any(c.expires_at_ms for c in plan.changes):
            ts = int(time.time() * 1000)
            beats = [replace(b, ts=ts) for b in beats]
        chunks: list[int] = []
        shown = time.monotonic()
        with writer.transaction():
            for i, change in enumerate(plan.changes):
                old_chunks = session.pacing.chunks(change.segment)
                written = records(change, writer.partitions, ts, offsets, old_chunks)
                for topic, p, key, value in written:
                    result.log_bytes += writer.append(topic, p, key, value)
                    result.records += 1
                chunks.append(sum(t == "snapshots" and v is not None for t, _, _, v in written))
                now = time.monotonic()
                if now - shown > 1.0 or i + 1 == len(plan.changes):
                    shown = now
                    self.progress(
                        f"log: {i + 1}/{len(plan.changes)} segments, "
                        f"{result.records} records, {result.log_bytes:,} bytes"
                    )
                if i == len(plan.changes) // 2:
                    _fault("mid-transaction")
            for beat in beats:
                result.log_bytes += writer.append(*heartbeat_record(beat, writer.partitions))
                result.records += 1
        _fault("after-commit")
        for change, n in zip(plan.changes, chunks, strict=True):
            session.remember(change, n, ts)
            result.versions[change.segment] = change.version
            result.adds += change.added
            result.renewed += change.renewed
            result.removes += len(change.remove) if not change.drop else 0
            result.drops += change.drop
            result.snapshots += change.snapshot is not None
        for beat in beats:
            state.wrote_heartbeat(beat)
        result.heartbeats = len(beats)
        return result

    def _save_state(self, session: _Session) -> None:
        """The state file after a publish; failing to write it fails nothing (the previous file,
        if any, is still verified before use, and the log is the state)."""
        try:
            session.log.save_state()
        except (OSError, TransportError) as exc:
            log.warning("state file not written: %s", exc)

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
