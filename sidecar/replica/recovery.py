"""Bootstrap and resync: rebuilding state from the snapshots topic plus a bounded replay of
deltas (DESIGN.md "Replica semantics")."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyroaring import BitMap64

from ..partitioner import partition_for
from ..record import DropMarker, Skipped, SnapshotChunk
from ..transport.base import LogReader, LogRecord, NewLogIdentity, Topic, Transport
from .engine import Engine, decode_counted
from .expiry import ExpiryIndex
from .forms import Forms
from .state import Counters, SegmentState

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: called between the records a bootstrap or resync reads: the serving engine's `expire`, so
#: TTL members of a serving replica still leave on time while it reads
Tick = Callable[[], object]
_NONE = BitMap64()  # a chunk record's bitmap once its members moved to the assembler's part


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A complete snapshot (or a drop marker when `state` is None) of one segment."""

    segment: str
    version: int
    state: SegmentState | None
    delta_offset: int
    chunks: int = 1
    expiries: ExpiryIndex | None = None  # a TTL segment's, from the chunks' `expiries`


class SnapshotAssembler:
    """Collects chunks and keeps, per segment, the newest version whose chunks are all there."""

    def __init__(
        self, holds: Callable[[str], bool], counters: Counters, forms: Forms | None = None
    ) -> None:
        self._holds = holds
        self._counters = counters
        #: each chunk's members as `forms.part` keeps them (the chunk records keep the rest)
        self._forms = forms or Forms(None)
        self._building: dict[tuple[str, int], dict[int, SnapshotChunk]] = {}
        self._parts: dict[tuple[str, int], dict[int, Any]] = {}
        self.complete: dict[str, Snapshot] = {}

    def add(self, rec: LogRecord) -> None:
        if rec.value is None:  # a tombstone of a chunk key a smaller snapshot no longer uses
            return

        def wanted(segment: str, version: int) -> bool:
            done = self.complete.get(segment)
            return self._holds(segment) and (done is None or done.version < version)

        record = decode_counted(rec, self._counters, "snapshot at ", snapshots=True, wanted=wanted)
        if record is None or isinstance(record, Skipped):
            return
        done = self.complete.get(record.segment)
        if done is not None and done.version >= record.version:
            return
        if isinstance(record, DropMarker):
            self._finish(Snapshot(record.segment, record.version, None, record.delta_offset))
            return
        assert isinstance(record, SnapshotChunk)
        key = (record.segment, record.version)
        chunks = self._building.setdefault(key, {})
        self._parts.setdefault(key, {})[record.chunk] = self._forms.part(record.bitmap)
        # the part holds the members: the decoded BitMap64 goes now, before the next is decoded
        record = chunks[record.chunk] = dataclasses.replace(record, bitmap=_NONE)
        if len(chunks) < record.chunks:
            return
        del self._building[key]
        members_of = self._parts.pop(key)
        parts = [chunks.get(i) for i in range(record.chunks)]
        if any(p is None or p.chunks != record.chunks for p in parts):
            self._counters.skip("chunks_mismatch")
            return
        bitmap = self._forms.assemble([members_of[i] for i in range(record.chunks)], record.version)
        if len(bitmap) != record.cardinality:
            self._counters.skip("snapshot_cardinality")
            log.warning(
                "snapshot %s@%d has %d members, says %d",
                record.segment,
                record.version,
                len(bitmap),
                record.cardinality,
            )
            return
        state = SegmentState(bitmap, record.version, len(bitmap), record.ts)
        pairs = [pair for p in parts if p is not None for pair in p.expiries]
        expiries = ExpiryIndex.from_pairs(pairs) if pairs else None
        self._finish(
            Snapshot(
                record.segment, record.version, state, record.delta_offset, record.chunks, expiries
            )
        )

    def _finish(self, snap: Snapshot) -> None:
        self.complete[snap.segment] = snap
        for key in [k for k in self._building if k[0] == snap.segment and k[1] <= snap.version]:
            del self._building[key]
            self._parts.pop(key, None)


def install(engine: Engine, snap: Snapshot) -> None:
    """Install a snapshot; the segment's deltas before its `delta_offset` are then skipped."""
    if snap.state is None:
        engine.install_drop(snap.segment, snap.version, snap.delta_offset)
    else:
        engine.install(snap.segment, snap.state, snap.delta_offset, snap.expiries)
    if engine.observer is not None:
        engine.observer.snapshot(snap.segment, snap.version, snap.chunks)


def _ticked(records: Iterator[LogRecord], tick: Tick | None) -> Iterator[LogRecord]:
    for rec in records:
        if tick is not None:
            tick()
        yield rec


def read_snapshots(
    reader: LogReader,
    partitions: list[int],
    holds: Callable[[str], bool],
    counters: Counters,
    forms: Forms | None = None,
    tick: Tick | None = None,
) -> dict[str, Snapshot]:
    asm = SnapshotAssembler(holds, counters, forms)
    every = reader.watermarks_all("snapshots")
    marks = {("snapshots", p): every[p] for p in partitions}
    reader.assign({tp: low for tp, (low, _) in marks.items()})
    for rec in _ticked(reader.read_until({tp: end for tp, (_, end) in marks.items()}), tick):
        asm.add(rec)
    return asm.complete


def bootstrap(
    reader: LogReader, engine: Engine, progress: Progress | None = None, tick: Tick | None = None
) -> None:
    """Cold start: newest complete snapshots, then deltas from the lowest `delta_offset` per
    partition up to the end offsets seen now. The reader is left assigned to the deltas."""
    say = progress or log.info
    started = time.monotonic()
    partitions = list(range(reader.partitions))
    snapshots = read_snapshots(
        reader, partitions, engine.holds, engine.counters, engine.forms, tick
    )
    for snap in snapshots.values():
        install(engine, snap)
    say(
        f"snapshots: {len(snapshots)} segments, {engine.memberships():,} memberships "
        f"in {time.monotonic() - started:.1f} s"
    )
    starts: dict[tuple[Topic, int], int] = {}
    ends: dict[tuple[Topic, int], int] = {}
    marks = reader.watermarks_all("deltas")
    lowest: dict[int, int] = {}  # partition -> the lowest delta_offset of its snapshots
    for s in snapshots.values():
        p = partition_for(s.segment, reader.partitions)
        lowest[p] = min(lowest.get(p, s.delta_offset), s.delta_offset)
    for p in partitions:
        low, end = marks[p]
        starts[("deltas", p)] = max(low, lowest[p]) if p in lowest else low
        ends[("deltas", p)] = end
    reader.assign(starts)
    for rec in _ticked(reader.read_until(ends), tick):
        engine.apply_record(rec)
    say(
        f"bootstrap done: {len(engine.segments)} segments, {engine.memberships():,} memberships "
        f"in {time.monotonic() - started:.1f} s"
    )


def resync(
    transport: Transport,
    engine: Engine,
    segments: set[str],
    upto: Callable[[int], int],
    partitions: int,
    tick: Tick | None = None,
    identity: str | None = None,
) -> None:
    """Rebuild `segments` from their snapshots plus the deltas before `upto(partition)` (where
    the main reader stands), each with a fresh reader, and install what heals. NewLogIdentity,
    and nothing installed, when that reader opened a log of another `identity` than the main
    reader's (topics created again between the two): its offsets are not the main reader's."""
    by_partition: dict[int, set[str]] = {}
    for segment in segments:
        by_partition.setdefault(partition_for(segment, partitions), set()).add(segment)
    with transport.reader() as reader:
        opened = reader.identity()
        if identity and opened is not None and opened != identity:
            raise NewLogIdentity(
                f"the log has a new identity ({opened}; was {identity}): not resyncing from it"
            )
        for p, wanted in by_partition.items():
            scratch = Engine(holds=wanted.__contains__, clock_ms=engine.clock_ms)
            snaps = read_snapshots(
                reader, [p], wanted.__contains__, engine.counters, engine.forms, tick
            )
            for snap in snaps.values():
                install(scratch, snap)
            low, _ = reader.watermarks("deltas", p)
            offsets = [s.delta_offset for s in snaps.values()]
            start = max(low, min(offsets)) if len(offsets) == len(wanted) else low
            reader.assign({("deltas", p): start})
            for rec in _ticked(reader.read_until({("deltas", p): upto(p)}), tick):
                if rec.offset < upto(p):
                    scratch.apply_record(rec)
            for segment in wanted:
                engine.counters.resyncs += 1
                state = scratch.segments.get(segment)
                if state is not None and state.fresh:
                    engine.install(segment, state, expiries=scratch.expiries.get(segment))
                    log.info("resynced %s at version %d", segment, state.version)
                elif segment in scratch.dropped:
                    engine.install_drop(segment, scratch.dropped[segment])
                else:
                    log.warning("resync of %s did not heal it; answers use the fallback", segment)
