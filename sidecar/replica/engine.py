"""The replica engine: applies log records to in-memory bitmaps by DESIGN.md's version rules.

Free of transports, threads and servers. `recovery.py` feeds it snapshots and resyncs;
`runner.py` feeds it the tail of the log.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from pyroaring import BitMap64

from ..record import (
    CorruptRecord,
    Delta,
    Drop,
    Heartbeat,
    Record,
    Skipped,
    UnknownRecord,
    decode,
)
from ..transport.base import LogRecord
from .expiry import ExpiryIndex
from .forms import Forms, nbytes
from .state import Age, Counters, Health, SegmentState

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


def segment_filter(globs: Iterable[str] | None) -> Callable[[str], bool]:
    """`--segments a*,b` as a predicate; None or empty holds every segment."""
    patterns = [g.strip() for g in globs or () if g.strip()]
    if not patterns:
        return lambda _segment: True
    return lambda segment: any(fnmatch.fnmatchcase(segment, p) for p in patterns)


def _apply_in_one_step(bitmap: BitMap64, delta: Delta) -> BitMap64:
    """The bitmap after `delta`, changed by one in-place roaring call where it can be: a copy
    costs time in proportion to the segment (milliseconds for millions of members), all of it
    holding the GIL the servers need. Readers of several memberships hold `Engine.lock`;
    readers that take no lock (a check, a batch) still never see a change's adds without its
    removes, because pyroaring holds the GIL for the whole call (tests/test_atomic_apply.py).
    A delta that does not fit the local state (adds already present, removes absent: it will
    diverge) is built aside and returned as a new bitmap, swapped in with its state. Engine
    bitmaps are never shared with callers."""
    add, remove = delta.add, delta.remove
    if not remove:
        bitmap |= add
    elif not add:
        bitmap -= remove
    elif add.isdisjoint(bitmap) and remove.issubset(bitmap):
        bitmap ^= add | remove  # flips exactly the adds in and the removes out
    else:
        return (bitmap | add) - remove
    return bitmap


def decode_counted(
    rec: LogRecord,
    counters: Counters,
    what: str,
    *,
    snapshots: bool = False,
    wanted: Callable[[str, int], bool] | None = None,
) -> Record | Skipped | None:
    """`decode(rec.value)`, or None when it cannot be applied: counted by reason in
    `counters`, and a corrupt one logged as "corrupt <what>[partition]@offset"."""
    try:
        return decode(rec.value, snapshots=snapshots, wanted=wanted)
    except UnknownRecord as exc:
        counters.skip(exc.reason, unknown=True)
    except CorruptRecord as exc:
        counters.skip(exc.reason)
        log.warning("corrupt %s[%d]@%d: %s", what, rec.partition, rec.offset, exc)
    return None


class _PendingParts:
    """The parts of one split delta seen so far."""

    __slots__ = ("parts", "first_offset", "version")

    def __init__(self, version: int, count: int, first_offset: int) -> None:
        self.version = version
        self.parts: list[Delta | None] = [None] * count
        self.first_offset = first_offset


class LogObserver(Protocol):
    """Told what recovery and the tail bring, for a writer that paces its snapshots by them
    (the publisher); replicas have none."""

    def snapshot(self, segment: str, version: int, chunks: int) -> None:
        """A snapshot (or a drop marker, 1 chunk) of `segment` at `version` was installed."""

    def delta(self, segment: str, changed: int) -> None:
        """A delta changing `changed` memberships of `segment` was applied."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _refill(table: dict[K, V], other: dict[K, V]) -> None:
    table.clear()
    table.update(other)


class Engine:
    def __init__(
        self,
        holds: Callable[[str], bool] | None = None,
        observer: LogObserver | None = None,
        clock_ms: Callable[[], int] | None = None,
        forms: Forms | None = None,
    ) -> None:
        self.segments: dict[str, SegmentState] = {}
        #: chooses each segment's in-memory form by its shape (sidecar/replica/forms.py)
        self.forms = forms if forms is not None else Forms()
        #: TTL segments' expiry indexes (DESIGN.md "Freshness"; expiry.py)
        self.expiries: dict[str, ExpiryIndex] = {}
        #: (deadline, segment) of every bucket made; popped by `expire` (stale ones are no-ops)
        self._deadlines: list[tuple[int, str]] = []
        #: the clock `expire()` judges expiries by (ms since the epoch); tests give their own
        self.clock_ms = clock_ms or _now_ms
        self.dropped: dict[str, int] = {}  # dropped segment -> version of the drop
        self.observer = observer
        #: segments with a max_age_seconds (DESIGN.md "Freshness"), from their heartbeats
        self.ages: dict[str, Age] = {}
        # segment -> the deltas offset its installed snapshot covers: older records of that
        # segment (replayed because another segment's snapshot starts earlier) are skipped.
        self.replay_from: dict[str, int] = {}
        self.counters = Counters()
        self.holds = holds or (lambda _segment: True)
        self.needs_resync: set[str] = set()
        self._pending: dict[str, _PendingParts] = {}
        #: Held while a bitmap is changed in place and its new state swapped in, so that a
        #: reader holding it (sidecar/replica/view.py) sees every segment at one version.
        #: Swapping in a whole new state needs no lock: one dict assignment.
        self.lock = threading.Lock()
        #: bumped after every change of what the engine holds: equal values mean equal state
        self.generation = 0
        #: called with a segment's name after its state, version or health changed (the
        #: replica wakes read-your-publish waiters from it); on the applying thread
        self.on_change: Callable[[str], None] | None = None
        #: ids of the bitmaps a checkpoint being written on another thread reads (`pin`):
        #: changed copy-on-write until it is done, never in place under it
        self._pinned: frozenset[int] = frozenset()

    def pin(self, states: Iterable[SegmentState]) -> None:
        """Keep these states' bitmaps as they are until `unpin` (a checkpoint serializes them
        on another thread): a change copies such a bitmap once and changes the copy. Costs a
        copy of each roaring segment changed meanwhile, nothing for the others."""
        self._pinned = frozenset(id(s.bitmap) for s in states if type(s.bitmap) is BitMap64)

    def unpin(self) -> None:
        self._pinned = frozenset()

    def _own(self, bitmap: BitMap64) -> BitMap64:
        """`bitmap`, or a copy of it to change when a checkpoint still reads it."""
        return BitMap64(bitmap) if id(bitmap) in self._pinned else bitmap

    def _changed(self, segment: str) -> None:
        self.generation += 1
        if self.on_change is not None:
            self.on_change(segment)

    def reset(self) -> None:
        """Forget all state, keeping this object (servers hold a reference to it)."""
        self.generation += 1
        self.segments.clear()
        self.dropped.clear()
        self.ages.clear()
        self.expiries.clear()
        self._deadlines.clear()
        self.replay_from.clear()
        self.needs_resync.clear()
        self._pending.clear()

    def adopt(self, other: Engine) -> None:
        """Take `other`'s whole state (a bootstrap built aside) in one step under `lock`: a
        reader holding it sees all of the old state or all of the new; a lock-free check sees
        each segment at its old or its new state, never a segment missing that both hold.
        `other`'s expiries due by now (on this engine's clock) are dropped before the swap: a
        membership that expired while it was built is never readable here."""
        other.expire(self.clock_ms())
        with self.lock:
            changed = set(self.segments) | set(other.segments) | set(self.dropped)
            self.segments.update(other.segments)
            for segment in [s for s in self.segments if s not in other.segments]:
                del self.segments[segment]
            # the tables are held by reference elsewhere (servers, the runner): refilled
            _refill(self.dropped, other.dropped)
            _refill(self.ages, other.ages)
            _refill(self.expiries, other.expiries)
            _refill(self.replay_from, other.replay_from)
            _refill(self._pending, other._pending)
            self._deadlines[:] = other._deadlines
            self.needs_resync.clear()
            self.needs_resync.update(other.needs_resync)
        for segment in sorted(changed | set(other.dropped)):
            self._changed(segment)

    # -- reading -------------------------------------------------------------------------
    def version_of(self, segment: str) -> int:
        state = self.segments.get(segment)
        if state is not None:
            return state.version
        return self.dropped.get(segment, 0)

    def expires_at(self, segment: str, user: int) -> int | None:
        """When `user`'s membership of `segment` expires (ms), or None: not a member, or a
        permanent one. Reads under `lock`: safe from any thread."""
        with self.lock:
            index = self.expiries.get(segment)
            return index.expires_at(user) if index is not None else None

    def next_expiry(self) -> int | None:
        """The earliest deadline of any bucket (possibly one already gone: a no-op to act on)."""
        return self._deadlines[0][0] if self._deadlines else None

    def pending_offset(self, partition_of: Callable[[str], int], partition: int) -> int | None:
        """The lowest offset of a split delta still being assembled in `partition`: a
        checkpoint must resume from there so the parts are read again."""
        offsets = [p.first_offset for s, p in self._pending.items() if partition_of(s) == partition]
        return min(offsets) if offsets else None

    # -- applying ------------------------------------------------------------------------
    def apply_record(self, rec: LogRecord) -> None:
        """Apply one record of the deltas topic; bad values are counted, never raised."""
        if rec.value is None:
            return
        offset = rec.offset

        def wanted(segment: str, version: int) -> bool:
            return (
                self.holds(segment)
                and offset >= self.replay_from.get(segment, 0)
                and version > self.version_of(segment)
            )

        record = decode_counted(rec, self.counters, "record at deltas", wanted=wanted)
        if record is None:
            return
        if isinstance(record, Skipped):
            if self.holds(record.segment):
                self.counters.duplicates += 1  # before its snapshot, or already applied
            else:
                self.counters.ignored += 1
            return
        if isinstance(record, Delta):
            self.apply_delta(record, rec.offset)
        elif isinstance(record, Heartbeat):
            self.apply_heartbeat(record)
        elif isinstance(record, Drop):
            self.apply_drop(record)

    def apply_heartbeat(self, beat: Heartbeat) -> None:
        """The segment's current version is affirmed as of `beat.ts`: its age restarts (and
        its max age is set, or cleared by 0). A beat for another version changes nothing: an
        older one is a replay, a newer one follows a change this engine has not applied (the
        gap rule handles that change)."""
        if not self.holds(beat.segment):
            self.counters.ignored += 1
            return
        state = self.segments.get(beat.segment)
        if state is None or state.version != beat.version:
            self.counters.duplicates += 1
            return
        if beat.max_age_s == 0:
            if self.ages.pop(beat.segment, None) is not None:
                self.generation += 1
            return
        age = self.ages.get(beat.segment)
        heard = max(beat.ts, age.heard_ms) if age is not None else beat.ts
        self.ages[beat.segment] = Age(beat.max_age_s * 1000, heard)
        self.generation += 1
        self.counters.heartbeats += 1

    def _check_order(self, segment: str, base: int, version: int) -> bool:
        """True when a change from `base` to `version` applies now; counts the rest."""
        local = self.version_of(segment)
        if version <= local:
            self.counters.duplicates += 1
            return False
        state = self.segments.get(segment)
        if base != local or (state is not None and not state.fresh):
            self.counters.gaps += 1
            self.mark(segment, Health.STALE)
            return False
        return True

    def apply_delta(self, delta: Delta, offset: int = -1) -> None:
        if delta.parts > 1:
            assembled = self._assemble(delta, offset)
            if assembled is None:
                return
            delta = assembled
        if not self._check_order(delta.segment, delta.base, delta.version):
            return
        segment = delta.segment
        with self.lock:
            index = self.expiries.get(segment)
            checked = True
            if index is not None:
                # the change's author counted as of its ts: expire through it first. If this
                # replica's clock already dropped a later deadline, the count cannot match:
                # only a TTL delta can meet that (a plain one after TTL lists every member)
                self._drop_due(segment, index, delta.ts)
                checked = not delta.expires_at or index.dropped_ms <= delta.ts
            current = self.segments.get(segment)
            if current is None:
                bitmap = self.forms.settle(BitMap64(delta.add), delta.version)
            elif type(current.bitmap) is BitMap64:
                bitmap = _apply_in_one_step(self._own(current.bitmap), delta)
                bitmap = self.forms.settle(bitmap, delta.version)
            else:  # the compact form: rebuilt, O(n)
                bitmap = self.forms.apply(current.bitmap, delta.add, delta.remove, delta.version)
            if delta.expires_at:
                if index is None:
                    index = self.expiries[segment] = ExpiryIndex()
                fresh_bucket = delta.expires_at not in index.buckets
                index.affirm(delta.add, delta.expires_at)
                if fresh_bucket and delta.add:
                    heapq.heappush(self._deadlines, (delta.expires_at, segment))
            elif index is not None:
                del self.expiries[segment]  # a plain publish: its members are permanent
            if not checked:
                self.counters.ttl_unchecked += 1
            self._swap_in(delta, bitmap, checked)
            if delta.expires_at and index is not None:
                now = self.clock_ms()  # one moment judges the whole delta
                if delta.expires_at <= now:
                    # it reached this replica after its own deadline (a lagging replica): its
                    # members go in the same step, never readable until the next `expire`
                    self._drop_due(segment, index, now)
        self.dropped.pop(delta.segment, None)
        self._changed(delta.segment)
        self.counters.applied += 1
        if self.observer is not None:
            self.observer.delta(delta.segment, len(delta.add) + len(delta.remove))

    def _swap_in(self, delta: Delta, bitmap: BitMap64, checked: bool = True) -> None:
        health = Health.FRESH
        if checked and len(bitmap) != delta.cardinality:
            self.counters.diverged += 1
            health = Health.DIVERGED
            self.needs_resync.add(delta.segment)
            self.expiries.pop(delta.segment, None)
            log.warning(
                "segment %s diverged at version %d: %d members, the log says %d",
                delta.segment,
                delta.version,
                len(bitmap),
                delta.cardinality,
            )
        self.segments[delta.segment] = SegmentState(
            bitmap, delta.version, len(bitmap), delta.ts, health
        )

    def _assemble(self, part: Delta, offset: int) -> Delta | None:
        pending = self._pending.get(part.segment)
        if pending is None or pending.version != part.version:
            pending = _PendingParts(part.version, part.parts, offset)
            self._pending[part.segment] = pending
        if len(pending.parts) != part.parts or any(
            p is not None and p.expires_at != part.expires_at for p in pending.parts
        ):
            self.counters.skip("parts_mismatch")
            del self._pending[part.segment]
            return None
        pending.parts[part.part] = part
        if any(p is None for p in pending.parts):
            return None
        del self._pending[part.segment]
        parts = [p for p in pending.parts if p is not None]
        return Delta(
            segment=part.segment,
            base=part.base,
            version=part.version,
            add=BitMap64.union(*(p.add for p in parts)),
            remove=BitMap64.union(*(p.remove for p in parts)),
            cardinality=part.cardinality,
            ts=max(p.ts for p in parts),
            expires_at=part.expires_at,
        )

    def apply_drop(self, drop: Drop) -> None:
        if not self._check_order(drop.segment, drop.base, drop.version):
            return
        self.install_drop(drop.segment, drop.version)
        self.counters.drops += 1

    def mark(self, segment: str, health: Health) -> None:
        """Mark a present segment unhealthy (or note an absent one) and queue its resync."""
        state = self.segments.get(segment)
        if state is not None and state.health is not health:
            self.segments[segment] = SegmentState(
                state.bitmap, state.version, state.cardinality, state.updated_ms, health
            )
            self._changed(segment)
        self.needs_resync.add(segment)

    # -- expiring (membership TTL) ----------------------------------------------------------
    def expire(self, now_ms: int | None = None) -> list[str]:
        """Drop every expiry bucket due at `now_ms` (default: the clock) and its members from
        the segment, each segment in one step under `lock` (its version stays); returns the
        segments changed. Costs one heap look when nothing is due."""
        now = self.clock_ms() if now_ms is None else now_ms
        heap = self._deadlines
        due: set[str] = set()
        while heap and heap[0][0] <= now:
            due.add(heapq.heappop(heap)[1])
        changed = []
        for segment in sorted(due):
            index = self.expiries.get(segment)
            if index is None:
                continue
            with self.lock:
                if self._drop_due(segment, index, now):
                    changed.append(segment)
        for segment in changed:
            self._changed(segment)
        return changed

    def _drop_due(self, segment: str, index: ExpiryIndex, now_ms: int) -> bool:
        """Under `lock`: drop the segment's buckets due at `now_ms`; True when any was."""
        members = index.take_due(now_ms)
        if members is None:
            return False
        state = self.segments.get(segment)
        if state is not None:
            bitmap = state.bitmap
            if type(bitmap) is BitMap64:
                bitmap = self._own(bitmap)
                bitmap -= members  # one roaring call: a lock-free reader sees before or after
                bitmap = self.forms.settle(bitmap, state.version)
            else:  # the compact form: rebuilt, O(n), swapped in whole
                bitmap = self.forms.apply(bitmap, BitMap64(), members, state.version)
            self.segments[segment] = SegmentState(
                bitmap, state.version, len(bitmap), state.updated_ms, state.health
            )
            self.counters.expired += len(members)
        return True

    # -- installing whole states (bootstrap, resync, checkpoint) --------------------------
    def install(
        self,
        segment: str,
        state: SegmentState,
        from_offset: int = 0,
        expiries: ExpiryIndex | None = None,
    ) -> None:
        """Install `state` (with its expiry index: members of the bitmap, owned by the engine
        from now on; buckets already due are dropped by the next `expire`)."""
        if expiries is not None and (expiries.buckets or expiries.dropped_ms):
            self.expiries[segment] = expiries
            for deadline in expiries.buckets:
                heapq.heappush(self._deadlines, (deadline, segment))
        else:
            self.expiries.pop(segment, None)
        members = self.forms.settle(state.bitmap, state.version)
        if members is not state.bitmap:
            state = dataclasses.replace(state, bitmap=members)
        self.segments[segment] = state
        self.dropped.pop(segment, None)
        self._pending.pop(segment, None)
        self._changed(segment)
        if from_offset:
            self.replay_from[segment] = from_offset

    def install_drop(self, segment: str, version: int, from_offset: int = 0) -> None:
        self.segments.pop(segment, None)
        self.ages.pop(segment, None)
        self.expiries.pop(segment, None)
        self.dropped[segment] = version
        self._pending.pop(segment, None)
        self._changed(segment)
        if from_offset:
            self.replay_from[segment] = from_offset

    # -- summary ---------------------------------------------------------------------------
    def memberships(self) -> int:
        return sum(s.cardinality for s in list(self.segments.values()))

    def bitmap_bytes(self) -> int:
        """Bytes held in roaring containers and compact forms (`forms.nbytes`), TTL
        segments' expiry buckets included (about a second copy of their members)."""
        held = sum(nbytes(state.bitmap) for state in list(self.segments.values()))
        return held + sum(
            nbytes(bucket)
            for index in list(self.expiries.values())
            for bucket in list(index.buckets.values())
        )
