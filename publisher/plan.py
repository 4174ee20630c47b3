"""The diff between the log's current state and the desired one, as log records."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pyroaring import BitMap64

from sidecar.partitioner import partition_for
from sidecar.record import (
    MAX_RECORD_BITMAP_BYTES,
    Delta,
    Drop,
    DropMarker,
    Heartbeat,
    SnapshotChunk,
    delta_key,
    encode,
    snapshot_key,
    split_bitmaps,
    ttl_deadline,
)
from sidecar.replica import RecoveredLog
from sidecar.replica.expiry import ExpiryIndex
from sidecar.transport.base import Topic


@dataclass(slots=True)
class Change:
    """One segment's change in a publish."""

    segment: str
    base: int
    version: int
    add: BitMap64
    remove: BitMap64
    cardinality: int
    drop: bool = False
    snapshot: BitMap64 | None = None  # set when this publish writes a snapshot
    #: a TTL segment's change (DESIGN.md "Freshness"): every member of `add` (all the publish
    #: listed) expires then (ms); `remove` is empty. 0: a plain change
    expires_at_ms: int = 0
    #: with `snapshot`: the expiry index after this change (a TTL segment's)
    snapshot_expiries: ExpiryIndex | None = None
    #: how many members of `add` the segment already held: written again, not added (a TTL
    #: re-affirmation; a switch from TTL to plain rewriting them permanent)
    renewed: int = 0

    @property
    def added(self) -> int:
        """Members `add` brings that the segment did not hold."""
        return len(self.add) - self.renewed


@dataclass(slots=True)
class SnapshotInfo:
    """A segment's last snapshot in the log and the memberships changed by deltas since."""

    snapshot_version: int = 0
    snapshot_chunks: int = 0
    churn: int = 0


class SnapshotPacing:
    """What snapshot pacing needs to know of the log, per segment: the `LogObserver` of the
    publisher's `RecoveredLog`, told of its own snapshots by the publisher."""

    def __init__(self) -> None:
        self.info: dict[str, SnapshotInfo] = {}

    def snapshot(self, segment: str, version: int, chunks: int) -> None:
        self.info[segment] = SnapshotInfo(version, chunks, 0)

    def delta(self, segment: str, changed: int) -> None:
        info = self.info.get(segment)
        if info is None:
            info = self.info[segment] = SnapshotInfo()
        info.churn += changed

    def chunks(self, segment: str) -> int:
        """How many chunks the segment's snapshot in the log has (0: none)."""
        info = self.info.get(segment)
        return info.snapshot_chunks if info is not None else 0

    def export(self) -> dict[str, list[int]]:
        """For the state file (`RecoveredLog.save_state`)."""
        return {s: [i.snapshot_version, i.snapshot_chunks, i.churn] for s, i in self.info.items()}

    def load(self, data: object) -> None:
        """From a verified state file: what `export` gave (anything else leaves it empty)."""
        if isinstance(data, dict):
            self.info = {str(s): SnapshotInfo(*map(int, v)) for s, v in data.items()}


@dataclass(slots=True)
class SnapshotPolicy:
    """When to write a snapshot besides a segment's first publish."""

    every_versions: int = 50
    #: write one when the memberships changed since the last snapshot exceed this many times
    #: the segment's size (replaying the deltas would cost more than reading a snapshot)
    churn_ratio: float = 1.0

    def due(self, info: SnapshotInfo | None, version: int, cardinality: int, churn: int) -> bool:
        if info is None or info.snapshot_version == 0:
            return True
        if version - info.snapshot_version >= self.every_versions:
            return True
        return info.churn + churn > self.churn_ratio * max(cardinality, 1)


@dataclass(slots=True)
class Plan:
    changes: list[Change] = field(default_factory=list)

    @property
    def adds(self) -> int:
        return sum(c.added for c in self.changes)

    @property
    def renewed(self) -> int:
        return sum(c.renewed for c in self.changes)

    @property
    def removes(self) -> int:
        return sum(len(c.remove) for c in self.changes)


def diff(
    log: RecoveredLog,
    desired: dict[str, BitMap64],
    *,
    drop: set[str] | frozenset[str] = frozenset(),
    pacing: SnapshotPacing,
    policy: SnapshotPolicy | None = None,
    ttl: Mapping[str, int] | None = None,
    ts: int = 0,
) -> Plan:
    """Changes that take the log from its state to `desired` (and drop `drop`); `pacing`
    (the log's snapshots so far) decides with `policy` which changes also write a snapshot.

    A segment in `ttl` (segment -> ttl_seconds) is published additively: its listed members
    are added or re-affirmed, expiring `ttl_seconds` after `ts` (the records' time; `log`
    must be expired through it), and unlisted ones lapse at their own expiry. Any other
    segment is a full state; one that had expiring members lists all its members in `add`
    (a replica whose clock already expired some still ends with every one, now permanent)."""
    policy = policy or SnapshotPolicy()
    known = pacing.info
    plan = Plan()
    for name in sorted(desired):
        target = desired[name]
        current = log.segments.get(name)
        base = log.version_of(name)
        if ttl is not None and name in ttl:
            info = known.get(name)

            def due(change: Change, info: SnapshotInfo | None = info) -> bool:
                return policy.due(info, change.version, change.cardinality, len(change.add))

            change = _ttl_change(log, name, target, ttl_deadline(ts, ttl[name]), due)
            if change is not None:
                plan.changes.append(change)
            continue
        index = log.expiries_of(name)
        expiring = index is not None and bool(index.buckets)
        if current is not None and current.fresh and current.bitmap == target and not expiring:
            continue
        old = current.bitmap if current is not None and current.fresh else BitMap64()
        add = target - old if not expiring else BitMap64(target)
        remove = old - target
        if current is not None and not current.fresh:
            # The log's own history of this segment is damaged: restate it whole.
            remove = BitMap64()
        change = Change(name, base, base + 1, add, remove, len(target))
        if expiring:  # every member listed: the ones held already are rewritten permanent
            change.renewed = len(add) - len(target - old)
        unhealthy = current is not None and not current.fresh
        info = known.get(name)
        if unhealthy or policy.due(info, base + 1, len(target), len(add) + len(remove)):
            change.snapshot = target
        plan.changes.append(change)
    for name in sorted(drop):
        if name in log.segments:
            base = log.version_of(name)
            current = log.segments[name].bitmap
            plan.changes.append(Change(name, base, base + 1, BitMap64(), current, 0, drop=True))
    return plan


def _ttl_change(
    log: RecoveredLog,
    name: str,
    listed: BitMap64,
    expires_at: int,
    snapshot_due: Callable[[Change], bool],
) -> Change | None:
    """The additive change of a TTL segment (None: nothing to add or re-affirm), with the
    state after it as its snapshot when `snapshot_due(change)` (always for a segment whose
    history in the log is damaged: the listed members are then its state)."""
    current = log.segments.get(name)
    base = log.version_of(name)
    old = current.bitmap if current is not None and current.fresh else None
    if old is not None and not listed:
        return None
    count = old.union_cardinality(listed) if old is not None else len(listed)
    change = Change(name, base, base + 1, BitMap64(listed), BitMap64(), count)
    change.expires_at_ms = expires_at
    change.renewed = len(listed) - (count - len(old)) if old is not None else 0
    if (current is not None and old is None) or snapshot_due(change):
        index = log.expiries_of(name) if old is not None else None
        after = index.copy() if index is not None else ExpiryIndex()
        after.affirm(listed, expires_at)
        change.snapshot = old | listed if old is not None else BitMap64(listed)
        change.snapshot_expiries = after
    return change


def records(
    change: Change,
    partitions: int,
    ts: int,
    delta_offsets: dict[int, int],
    old_chunks: int,
    max_bytes: int = MAX_RECORD_BITMAP_BYTES,
) -> list[tuple[Topic, int, bytes, bytes | None]]:
    """The log records of one change: delta part(s) or a drop, then snapshot chunks (or a drop
    marker) and tombstones for chunk keys the new snapshot no longer uses."""
    p = partition_for(change.segment, partitions)
    out: list[tuple[Topic, int, bytes, bytes | None]] = []
    if change.drop:
        out.append(
            (
                "deltas",
                p,
                delta_key(change.segment),
                encode(Drop(change.segment, change.base, change.version, ts)),
            )
        )
        marker = DropMarker(change.segment, change.version, delta_offsets[p], ts)
        out.append(("snapshots", p, snapshot_key(change.segment, 0), encode(marker)))
        out.extend(
            ("snapshots", p, snapshot_key(change.segment, i), None) for i in range(1, old_chunks)
        )
        return out
    pieces = split_bitmaps([change.add, change.remove], max_bytes)
    for i, (_, _, (add, remove)) in enumerate(pieces):
        delta = Delta(
            segment=change.segment,
            base=change.base,
            version=change.version,
            add=add,
            remove=remove,
            cardinality=change.cardinality,
            ts=ts,
            part=i,
            parts=len(pieces),
            expires_at=change.expires_at_ms,
        )
        out.append(("deltas", p, delta_key(change.segment), encode(delta)))
    if change.snapshot is not None:
        # a TTL segment's expiry buckets are cut with the members: each chunk carries its id
        # range's piece of every bucket, counted in its size
        pairs = change.snapshot_expiries.pairs() if change.snapshot_expiries is not None else []
        chunks = split_bitmaps([change.snapshot, *(b for _, b in pairs)], max_bytes)
        for i, (_, _, (bitmap, *buckets)) in enumerate(chunks):
            chunk = SnapshotChunk(
                segment=change.segment,
                version=change.version,
                chunk=i,
                chunks=len(chunks),
                bitmap=bitmap,
                cardinality=change.cardinality,
                delta_offset=delta_offsets[p],
                ts=ts,
                expiries=tuple(
                    (at, piece) for (at, _), piece in zip(pairs, buckets, strict=True) if piece
                ),
            )
            out.append(("snapshots", p, snapshot_key(change.segment, i), encode(chunk)))
        out.extend(
            ("snapshots", p, snapshot_key(change.segment, i), None)
            for i in range(len(chunks), old_chunks)
        )
    return out


def heartbeats(
    log: RecoveredLog,
    desired: dict[str, BitMap64],
    plan: Plan,
    max_age: dict[str, int] | None,
    ts: int,
) -> list[Heartbeat]:
    """The heartbeats of a publish (DESIGN.md "Freshness"): one for each published segment
    that has a max age, at its version after this publish, changed or not (an identical
    republish then still renews the segment). `max_age` is the input's (segment -> seconds):
    a segment it leaves out that had one in the log gets a beat of 0, which clears it. None
    (a rollback, a caller with no manifest) keeps each segment's max age as the log has it."""
    versions = {c.segment: c.version for c in plan.changes if not c.drop}
    beats = []
    for segment in desired:
        had = log.max_age_of(segment)
        seconds = had if max_age is None else max_age.get(segment, 0)
        if not seconds and not had:
            continue
        version = versions.get(segment) or log.version_of(segment)
        if version:
            beats.append(Heartbeat(segment, version, seconds, ts))
    return beats


def heartbeat_record(beat: Heartbeat, partitions: int) -> tuple[Topic, int, bytes, bytes]:
    """A heartbeat goes where the segment's deltas go: replicas read it after them."""
    p = partition_for(beat.segment, partitions)
    return "deltas", p, delta_key(beat.segment), encode(beat)
