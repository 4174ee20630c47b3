"""One segment's history as the log still holds it: `seg-publish --history` and the state a
`--rollback` republishes (DESIGN.md "Publish guards and history").

The log keeps deltas for its retention (7 days by default) and, on Kafka, the snapshots topic
is compacted to the newest snapshot per chunk key. A version's state is recovered from what is
left, in this order: a complete snapshot at that version; forward from an earlier known state
(a snapshot, a drop, or nothing at version 0) through every delta up to it; backward from a
later snapshot, undoing each delta (a delta is the exact difference of two states: `add` was
absent before and `remove` present, which is checked). Every step is checked against the
cardinality the log recorded, so a damaged history is an error, never a wrong state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyroaring import BitMap64

from sidecar.partitioner import partition_for
from sidecar.record import (
    CorruptRecord,
    Delta,
    Drop,
    DropMarker,
    SnapshotChunk,
    UnknownRecord,
    decode,
)
from sidecar.transport.base import Topic, Transport


class HistoryError(ValueError):
    """The log does not hold what was asked for; the message says what it does hold."""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version of a segment: from its delta (or drop) record, else from a snapshot."""

    version: int
    ts: int
    cardinality: int | None  # None for a drop
    adds: int | None  # None when only a snapshot of this version is left
    removes: int | None
    kind: str  # "delta", "drop" or "snapshot"
    snapshot: bool  # a complete snapshot of this version is in the log


@dataclass(slots=True)
class History:
    segment: str
    deltas: dict[int, Delta] = field(default_factory=dict)  # version -> whole (parts merged)
    drops: dict[int, Drop | DropMarker] = field(default_factory=dict)
    snapshots: dict[int, tuple[BitMap64, int]] = field(default_factory=dict)  # -> (bitmap, ts)
    #: a record of it carries membership expiries (DESIGN.md "Freshness"): its states are
    #: not the plain sum of its deltas, so no version of it can be rebuilt
    ttl: bool = False

    @property
    def latest(self) -> int:
        return max([*self.deltas, *self.drops, *self.snapshots], default=0)

    def versions(self) -> list[VersionInfo]:
        out = []
        for v in sorted({*self.deltas, *self.drops, *self.snapshots}):
            snap = v in self.snapshots
            if v in self.drops:
                out.append(VersionInfo(v, self.drops[v].ts, None, None, None, "drop", False))
            elif v in self.deltas:
                d = self.deltas[v]
                out.append(
                    VersionInfo(v, d.ts, d.cardinality, len(d.add), len(d.remove), "delta", snap)
                )
            else:
                bitmap, ts = self.snapshots[v]
                out.append(VersionInfo(v, ts, len(bitmap), None, None, "snapshot", True))
        return out

    def cardinality_of(self, version: int) -> int | None:
        if version in self.snapshots:
            return len(self.snapshots[version][0])
        if version in self.deltas:
            return self.deltas[version].cardinality
        return 0 if version == 0 or version in self.drops else None

    def state_at(self, version: int) -> BitMap64:
        """The segment's members as of `version`; HistoryError when the log cannot say."""
        if version < 1 or version > self.latest:
            raise HistoryError(f"segment {self.segment} has no version {version} {self._held()}")
        if version in self.drops:
            raise HistoryError(f"version {version} of segment {self.segment} is its drop")
        if self.ttl:
            raise HistoryError(
                f"segment {self.segment} has membership TTL (ttl_seconds): its versions cannot "
                "be rolled back; publish its input again, or drop it"
            )
        if version in self.snapshots:
            return BitMap64(self.snapshots[version][0])
        state = self._forward(version)
        if state is None:
            state = self._backward(version)
        if state is None:
            raise HistoryError(
                f"the log no longer holds enough of segment {self.segment} to rebuild version "
                f"{version} {self._held()}"
            )
        return state

    def _known(self, version: int) -> BitMap64 | None:
        if version in self.snapshots:
            return BitMap64(self.snapshots[version][0])
        if version == 0 or version in self.drops:
            return BitMap64()
        return None

    def _forward(self, version: int) -> BitMap64 | None:
        start = version - 1
        while start >= 0 and start + 1 in self.deltas and self._known(start) is None:
            start -= 1
        state = self._known(start) if start >= 0 else None
        if state is None:
            return None
        for v in range(start + 1, version + 1):
            d = self.deltas.get(v)
            if d is None or d.base != v - 1:
                return None
            state -= d.remove
            state |= d.add
            self._verify(state, v)
        return state

    def _backward(self, version: int) -> BitMap64 | None:
        later = sorted(v for v in self.snapshots if v > version)
        for top in later:
            if any(v in self.drops or v not in self.deltas for v in range(version + 1, top + 1)):
                continue
            state = BitMap64(self.snapshots[top][0])
            for v in range(top, version, -1):
                d = self.deltas[v]
                if not d.add.issubset(state) or state.intersection_cardinality(d.remove):
                    raise HistoryError(
                        f"segment {self.segment}: version {v} does not undo (its delta is not "
                        "the difference of two states); roll back to a version the log holds "
                        "a snapshot of"
                    )
                state -= d.add
                state |= d.remove
                self._verify(state, v - 1)
            return state
        return None

    def _verify(self, state: BitMap64, version: int) -> None:
        expected = self.cardinality_of(version)
        if expected is not None and expected != len(state):
            raise HistoryError(
                f"segment {self.segment}: the log's history disagrees with itself at version "
                f"{version} ({len(state):,} members rebuilt, the log says {expected:,})"
            )

    def _held(self) -> str:
        deltas = sorted(self.deltas)
        parts = [f"deltas of versions {deltas[0]}..{deltas[-1]}" if deltas else "no deltas"]
        snaps = sorted(self.snapshots)
        parts.append(
            "snapshots of " + ", ".join(str(v) for v in snaps) if snaps else "no snapshots"
        )
        return f"(the log holds {'; '.join(parts)})"


def read_history(transport: Transport, segment: str) -> History:
    """Read the segment's partition of both topics from their first held offset to the end."""
    history = History(segment)
    parts: dict[int, dict[int, Delta]] = {}
    chunks: dict[int, dict[int, SnapshotChunk]] = {}
    with transport.reader() as reader:
        p = partition_for(segment, reader.partitions)
        marks: dict[tuple[Topic, int], tuple[int, int]] = {
            (topic, p): reader.watermarks(topic, p) for topic in ("deltas", "snapshots")
        }
        reader.assign({tp: low for tp, (low, _) in marks.items()})
        ends = {tp: end for tp, (_, end) in marks.items()}
        for rec in reader.read_until(ends):
            if rec.value is None:
                continue
            try:
                record = decode(
                    rec.value,
                    snapshots=rec.topic == "snapshots",
                    wanted=lambda s, _v: s == segment,
                )
            except (UnknownRecord, CorruptRecord):
                continue
            if isinstance(record, Delta | SnapshotChunk):
                history.ttl |= bool(
                    record.expires_at if isinstance(record, Delta) else record.expiries
                )
            if isinstance(record, Delta):
                got = parts.setdefault(record.version, {})
                got[record.part] = record
                if len(got) == record.parts:
                    history.deltas[record.version] = _merge(list(got.values()))
            elif isinstance(record, Drop | DropMarker):
                history.drops[record.version] = record
            elif isinstance(record, SnapshotChunk):
                got_chunks = chunks.setdefault(record.version, {})
                got_chunks[record.chunk] = record
                if len(got_chunks) == record.chunks:
                    bitmap = BitMap64.union(*(c.bitmap for c in got_chunks.values()))
                    if len(bitmap) == record.cardinality:
                        history.snapshots[record.version] = (bitmap, record.ts)
    return history


def _merge(parts: list[Delta]) -> Delta:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return Delta(
        first.segment,
        first.base,
        first.version,
        BitMap64.union(*(p.add for p in parts)),
        BitMap64.union(*(p.remove for p in parts)),
        first.cardinality,
        max(p.ts for p in parts),
        expires_at=first.expires_at,
    )


def format_history(history: History) -> str:
    """The `--history` table: one line per version the log holds, oldest first."""
    import datetime as dt

    rows = history.versions()
    if not rows:
        return f"segment {history.segment}: the log holds no version of it"
    lines = [
        f"segment {history.segment}: {len(rows)} versions in the log {history._held()}",
        f"{'version':>7}  {'time (UTC)':<24}  {'cardinality':>12}  {'adds':>10}  "
        f"{'removes':>10}  record",
    ]

    def num(n: int | None) -> str:
        return "-" if n is None else f"{n:,}"

    for r in rows:
        when = dt.datetime.fromtimestamp(r.ts / 1000, tz=dt.UTC).isoformat(timespec="seconds")
        kind = r.kind + (" + snapshot" if r.snapshot and r.kind != "snapshot" else "")
        lines.append(
            f"{r.version:>7}  {when:<24}  {num(r.cardinality):>12}  {num(r.adds):>10}  "
            f"{num(r.removes):>10}  {kind}"
        )
    return "\n".join(lines)
