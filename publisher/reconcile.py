"""`seg-publish --reconcile`: make the Aerospike set a faithful mirror of the log again.

The publisher diffs against the log, so what Aerospike lost (a truncate, a restored backup, a
namespace added later, `--aerospike` turned on after the first publish) is never written
again by a publish. Reconcile compares the set with the state the log holds and rewrites only
what differs (DESIGN.md "Aerospike layout"):

- the log's state is recovered as a publish does (a replica of the log, in memory: bitmaps);
- the set is scanned once, streaming, with stored keys; per record only its own entries are
  looked at (`user in bitmap`), and the members that had a valid entry are collected per
  segment, so the missing entries are one bitmap difference per segment at the end;
- the repairs go through the sink's batched writes (grouped users, `batch_operate`), and
  records left with no entry are deleted.

An entry is valid when its segment is in the log, the user is a member, and its version is
an integer between 1 and the segment's current version (the version of the publish that
wrote it, which the log no longer tells once compacted; anything newer was written by a
publish that never committed). A missing or invalid entry is written with the segment's
current version. A record written without its key (an older publisher) is matched to its
user by digest among the members with no keyed record, and rewritten with the key; one that
matches nobody is deleted. A record without the map bin is not the mirror's and is left
alone. Nothing is written to the log.

Membership TTL (DESIGN.md "Freshness"): everything is judged as of one `now` (the clock when
the comparison starts). A member of a TTL segment whose expiry passed is not a member, and an
entry `[version, expires_at_ms]` whose expiry passed is no entry. A member's valid entry is
`[version, its expiry in the log]` exactly (a plain value, or another expiry, is outdated:
it would lapse at the wrong time), and a permanent member's a plain version. An expired entry
of a user who is not a member agrees with the log (the fallback reads it as absent), so it is
not a difference (no exit 4 with `--dry-run`); it is counted as expired and removed, records
left empty deleted: nothing else ever removes a lapsed membership from Aerospike, so
reconcile is also its garbage collector.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroaring import BitMap64

from sidecar.aerospike_layout import map_version
from sidecar.replica import RecoveredLog
from sidecar.transport.base import Transport

from .aerospike_sink import AerospikeSink, MapChange

Progress = Callable[[str], None]


@dataclass(slots=True)
class ReconcileReport:
    scanned: int = 0
    missing_records: int = 0  # members with no record at all
    missing_entries: int = 0  # a record without an entry its user should have
    extra_entries: int = 0  # an entry of a segment the user is not in (or no such segment)
    outdated_entries: int = 0  # an entry whose value is not a version the log allows
    extra_records: int = 0  # records of users in no segment (empty maps included)
    #: entries of TTL memberships whose expiry passed (not a difference: cleared as garbage)
    expired_entries: int = 0
    keyless_records: int = 0  # records without a stored key
    written: int = 0  # records written (repairs applied)
    deleted: int = 0
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def differs(self) -> bool:
        return bool(
            self.missing_records
            or self.missing_entries
            or self.extra_entries
            or self.outdated_entries
            or self.extra_records
            or self.keyless_records
        )

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        return (
            f"scanned {self.scanned:,} records: missing records {self.missing_records:,}, "
            f"missing entries {self.missing_entries:,}, extra entries {self.extra_entries:,}, "
            f"outdated entries {self.outdated_entries:,}, extra records "
            f"{self.extra_records:,}, records without a stored key {self.keyless_records:,}, "
            f"expired entries {self.expired_entries:,}; "
            f"{verb} {self.written:,} records, deleted {self.deleted:,}, "
            f"time {self.seconds:.2f} s"
        )


@dataclass(slots=True)
class _Repair:
    """A MapChange for the sink: put `segment: version` (`[version, expires_at_ms]` with an
    expiry) for `add`, remove it for `remove`."""

    segment: str
    version: int
    expires_at_ms: int = 0
    add: BitMap64 = field(default_factory=BitMap64)
    remove: BitMap64 = field(default_factory=BitMap64)


def _valid(value: Any, current: int, expires_at_ms: int) -> bool:
    """Whether `value` is a valid entry of a member whose expiry in the log is
    `expires_at_ms` (0: a permanent member)."""
    try:
        version = map_version(value)
    except ValueError:
        return False
    held = value[1] if type(value) is list else 0
    return version is not None and version <= current and held == expires_at_ms


def _expired(value: Any, now_ms: int) -> bool:
    """A well-formed TTL entry whose expiry passed."""
    try:
        return map_version(value, now_ms) is None
    except ValueError:
        return False


class _Comparison:
    """What one streamed scan finds, against the log's state."""

    def __init__(self, log: RecoveredLog, progress: Progress, now_ms: int) -> None:
        """`log` expired through `now_ms`: its members are the members as of then."""
        self.now = now_ms
        self.members = {name: state.bitmap for name, state in log.segments.items()}
        #: TTL segments' expiry buckets (all after `now`), by deadline
        self.expiries = {
            name: index.pairs()
            for name in self.members
            if (index := log.expiries_of(name)) is not None
        }
        self.versions = {name: state.version for name, state in log.segments.items()}
        self.seen = {name: BitMap64() for name in self.members}  # a valid entry was found
        self.keyed = BitMap64()  # users with a record that has its key
        self.repairs: dict[tuple[str, int], _Repair] = {}
        self.delete: list[Any] = []  # user ids or digests of records to delete
        self.keyless: dict[bytes, dict[Any, Any]] = {}
        self.matched = BitMap64()  # users whose record was found by digest
        self.report = ReconcileReport()
        self._progress = progress
        self._shown = time.monotonic()

    def repair(self, segment: str, expires_at_ms: int = 0) -> _Repair:
        found = self.repairs.get((segment, expires_at_ms))
        if found is None:
            version = self.versions.get(segment, 0)
            found = _Repair(segment, version, expires_at_ms)
            self.repairs[(segment, expires_at_ms)] = found
        return found

    def expiry_of(self, segment: str, user: int) -> int:
        """A member's expiry in the log (0: permanent)."""
        for at, bucket in self.expiries.get(segment, ()):
            if user in bucket:
                return at
        return 0

    def record(self, user: int | None, digest: bytes, segs: dict[Any, Any] | None) -> None:
        """One scanned record (runs on the client's scan thread, one at a time)."""
        report = self.report
        report.scanned += 1
        if report.scanned % 10_000 == 0 and time.monotonic() - self._shown > 1.0:
            self._shown = time.monotonic()
            self._progress(f"reconcile: scanned {report.scanned:,} records")
        if segs is None:
            return  # a record without our bin is not the mirror's (the fallback reads no map)
        if user is None:
            report.keyless_records += 1
            self.keyless[digest] = segs
            return
        self.keyed.add(user)
        self.entries(user, segs, keyed=True)

    def entries(self, user: int, segs: dict[Any, Any], *, keyed: bool) -> None:
        report = self.report
        kept = expired = 0
        for segment, value in segs.items():
            members = self.members.get(segment)
            if members is None or user not in members:
                if _expired(value, self.now):
                    expired += 1
                else:
                    report.extra_entries += 1
                self.repair(str(segment)).remove.add(user)
            else:
                at = self.expiry_of(segment, user)
                if not _valid(value, self.versions[segment], at):
                    report.outdated_entries += 1
                    self.repair(segment, at).add.add(user)
                if keyed:
                    self.seen[segment].add(user)
                kept += 1
        report.expired_entries += expired
        if not kept:
            if expired < len(segs) or not segs:
                report.extra_records += 1  # (only expired entries: their removal deletes it)
            if not segs:
                self.delete.append(user)  # an empty map: no remove will delete it

    def finish(self, sink: AerospikeSink) -> list[_Repair]:
        """The missing entries (members with no valid entry), keyless records matched to
        their users; returns the repairs."""
        report = self.report
        everyone = BitMap64.union(BitMap64(), *self.members.values())
        if self.keyless:
            self.match_keyless(sink, everyone - self.keyed)
        report.missing_records = len(everyone - self.keyed - self.matched)
        for segment, members in self.members.items():
            missing = members - self.seen[segment]
            report.missing_entries += len(missing & self.keyed)
            for at, bucket in self.expiries.get(segment, ()):
                if missing and bucket.intersect(missing):
                    self.repair(segment, at).add |= missing & bucket
                    missing -= bucket
            if missing:  # a plain segment's, or a TTL segment's permanent members
                self.repair(segment).add |= missing
        return [r for r in self.repairs.values() if r.add or r.remove]

    def match_keyless(self, sink: AerospikeSink, candidates: BitMap64) -> None:
        """Keyless records: the digest of each member without a keyed record finds its own;
        that user's entries are rewritten (storing the key), the rest is deleted."""
        import aerospike

        t = sink.target
        for user in candidates:
            digest = bytes(aerospike.calc_digest(t.namespace, t.set_name, t.key(user)[2]))
            segs = self.keyless.pop(digest, None)
            if segs is None:
                continue
            self.matched.add(user)
            self.entries(user, segs, keyed=False)  # its removes; the puts come from `missing`
            if not self.keyless:
                break
        self.delete.extend(self.keyless)  # digests of records that belong to nobody


def reconcile(
    transport: Transport,
    sink: AerospikeSink,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    writer_id: str = "seg-publisher",
) -> ReconcileReport:
    """Compare the set with the log's state and repair it (only report with `dry_run`).

    It holds the log's writer as a publish does (`writer_id`; on Kafka this fences a running
    publisher with that id), so no publish changes the log or the set meanwhile; it writes
    nothing to the log."""
    say = progress or (lambda _m: None)
    started = time.monotonic()
    with transport.writer(writer_id) as _writer:
        report = _reconcile(transport, sink, dry_run, say)
    report.seconds = time.monotonic() - started
    return report


def _reconcile(
    transport: Transport, sink: AerospikeSink, dry_run: bool, say: Progress
) -> ReconcileReport:
    with RecoveredLog(transport, progress=lambda m: say(f"recover: {m}")) as log:
        now = int(time.time() * 1000)
        log.expire(now)  # TTL memberships as of now (one clock for the log and the set)
        comparison = _Comparison(log, say, now)
    say(f"reconcile: scanning {sink.target.describe()}")
    sink.scan(comparison.record)
    repairs: list[MapChange] = list(comparison.finish(sink))
    report = comparison.report
    report.dry_run = dry_run
    users = BitMap64.union(BitMap64(), *(r.add | r.remove for r in repairs))
    report.written = len(users)
    report.deleted = len(comparison.delete)
    if not dry_run and (repairs or comparison.delete):
        sink.apply(
            repairs,
            lambda done, total: say(f"reconcile: {done:,}/{total:,} user records written"),
        )
        emptied = sink.deleted
        sink.delete_records(comparison.delete)
        report.deleted += emptied
    say(f"reconcile: scanned {report.scanned:,} records, done")
    return report
