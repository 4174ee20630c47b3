"""The log record format (DESIGN.md "The log"): the only module that knows its bytes.

Values are msgpack maps; bitmaps are `BitMap64.serialize()` bytes (portable 64-bit roaring).
Delta topic: `Delta` (one change of one segment, possibly split into `parts` records with the
same version) and `Drop`. Snapshots topic: `SnapshotChunk` under key `<segment>#<i>`, and
`DropMarker` under key `<segment>#0`, which keeps a dropped segment's last version through
compaction. Transport compression (zstd on Kafka) is not part of the value.

Split deltas: a delta whose bitmaps serialize to more than the record limit is cut into id
ranges; part i of n carries the adds and removes inside range i, all parts share `segment`,
`base`, `version`, `cardinality` (the count after the whole change) and are written in the same
transaction, in order. A reader applies the change only once it holds all n parts.

Membership TTL (DESIGN.md "Freshness"): a delta with `expires_at` (ms, > its `ts`) is a TTL
delta: `add` holds every member the publish listed (new and re-affirmed), each expiring at
`expires_at` unless a later TTL delta re-affirms it; `remove` is empty; `cardinality` is the
count after applying as of `ts` (members whose expiry is at or before `ts` gone). A snapshot
chunk of a segment with expiries carries `expiries`: `[[expires_at_ms, <roaring64 of that
chunk's members expiring then>], ...]`, counted in the chunk's size. Readers older than these
fields ignore them (they would see a TTL segment's members as permanent and its cardinality
disagree: upgrade readers before publishing TTL segments).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields

import msgpack
from pyroaring import BitMap64

from .ids import BadRequest, segment_id

FORMAT = 1
#: Upper bound for the bitmap bytes of one record; chunks and delta parts stay below it.
MAX_RECORD_BITMAP_BYTES = 900 * 1024
#: Most parts of one split delta / chunks of one snapshot a reader accepts (each ~900 KB of
#: bitmap: far above any real segment). A larger count is corrupt: a reader sizes its
#: assembly buffers by it.
MAX_PIECES = 1 << 16
_U64 = 2**64 - 1
#: the longest `max_age_seconds` / `ttl_seconds` (a 32-bit signed count of seconds: 68 years)
MAX_AGE_SECONDS = 2**31 - 1
_I64 = 2**63 - 1  # Kafka offsets are signed 64-bit


class RecordError(ValueError):
    """A log value that cannot be applied. `reason` is a short stable token for metrics
    (`unknown_kind`, `not_msgpack`, `bad_segment`, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownRecord(RecordError):
    """A well-formed value of a format or kind this reader does not know: skip and count."""


class CorruptRecord(RecordError):
    """Not msgpack, a bitmap that does not deserialize, or a field that is missing, mistyped
    or out of its range (an invalid segment id, a version that is not base + 1, a chunk or
    part index past its count, a cardinality smaller than the record's own members)."""


@dataclass(frozen=True, slots=True)
class Delta:
    segment: str
    base: int
    version: int
    add: BitMap64
    remove: BitMap64
    cardinality: int
    ts: int
    part: int = 0
    parts: int = 1
    #: a TTL delta's expiry of every member of `add` (ms); 0: not a TTL delta
    expires_at: int = 0


@dataclass(frozen=True, slots=True)
class Drop:
    segment: str
    base: int
    version: int
    ts: int


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    segment: str
    version: int
    chunk: int
    chunks: int
    bitmap: BitMap64
    cardinality: int
    delta_offset: int
    ts: int
    #: (expires_at_ms, the members of this chunk expiring then), by deadline; () when none
    expiries: tuple[tuple[int, BitMap64], ...] = ()


@dataclass(frozen=True, slots=True)
class DropMarker:
    segment: str
    version: int
    delta_offset: int
    ts: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Deltas topic: the segment is still current at `version` as of `ts` (written by every
    publish of a segment with a `max_age_seconds`, an identical one included); `max_age_s`
    0 says the segment no longer has one. Readers older than this kind skip it."""

    segment: str
    version: int
    max_age_s: int
    ts: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A well-formed record the reader said it did not want (`decode(..., wanted=...)`); its
    bitmaps were not deserialized."""

    segment: str
    version: int


Record = Delta | Drop | SnapshotChunk | DropMarker | Heartbeat


def ttl_deadline(ts_ms: int, ttl_seconds: int) -> int:
    """When a membership published at `ts_ms` with `ttl_seconds` expires: rounded up to the
    whole second, so one publish's members share one expiry bucket."""
    return -(-(ts_ms + ttl_seconds * 1000) // 1000) * 1000


def delta_key(segment: str) -> bytes:
    return segment.encode()


def snapshot_key(segment: str, chunk: int) -> bytes:
    return f"{segment}#{chunk}".encode()


#: each record type's `kind`; its fields go into the value in declaration order
_KIND_OF: dict[type, str] = {
    Delta: "delta",
    Drop: "drop",
    SnapshotChunk: "snapshot",
    Heartbeat: "heartbeat",
    DropMarker: "drop",
}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _KIND_OF}


def encode(record: Record) -> bytes:
    """The msgpack value of `record`."""
    cls = next((c for c in _KIND_OF if isinstance(record, c)), None)
    if cls is None:
        raise TypeError(f"not a log record: {type(record).__name__}")
    body: dict = {"format": FORMAT, "kind": _KIND_OF[cls]}
    for name in _FIELDS[cls]:
        value = getattr(record, name)
        body[name] = value.serialize() if isinstance(value, BitMap64) else value
    if isinstance(record, Delta):
        if record.parts == 1:  # an unsplit delta omits part/parts
            del body["part"], body["parts"]
        if not record.expires_at:  # a plain delta omits its expiry
            del body["expires_at"]
    if isinstance(record, SnapshotChunk):
        if record.expiries:
            body["expiries"] = [[at, bm.serialize()] for at, bm in record.expiries]
        else:
            del body["expiries"]
    return msgpack.packb(body, use_bin_type=True)


#: kinds each topic holds: anything else is UnknownRecord, wanted or not
_DELTA_KINDS = frozenset(("delta", "drop", "heartbeat"))
_SNAPSHOT_KINDS = frozenset(("snapshot", "drop"))


def _int(body: dict, name: str, minimum: int = 0, maximum: int = _U64) -> int:
    value = body.get(name)
    if type(value) is not int or not minimum <= value <= maximum:
        shown = value if type(value) is int else type(value).__name__
        raise CorruptRecord(
            f"field {name!r} must be an integer in {minimum}..{maximum}, got {shown!r}",
            f"bad_{name}",
        )
    return value


def _segment(body: dict) -> str:
    """The segment id, validated by the same rule as every request (`ids.segment_id`)."""
    try:
        return segment_id(body.get("segment"), "field 'segment'")
    except BadRequest as exc:
        raise CorruptRecord(str(exc), "bad_segment") from None


def _bitmap(body: dict, name: str) -> BitMap64:
    value = body.get(name)
    if type(value) is not bytes:
        raise CorruptRecord(
            f"field {name!r} must be bitmap bytes, got {type(value).__name__}", "bad_bitmap"
        )
    try:
        return BitMap64.deserialize(value)
    except Exception as exc:  # pyroaring raises ValueError or its own errors on bad bytes
        raise CorruptRecord(
            f"field {name!r} is not a portable roaring64 bitmap: {exc}", "bad_bitmap"
        ) from exc


def _piece(body: dict, index: str, count: str, optional: bool = False) -> tuple[int, int]:
    """(index, count) of a chunk or part: 0 <= index < count <= MAX_PIECES. An optional pair
    (a delta's part/parts) defaults to part 0 of 1."""
    n = _int(body, count, 1, MAX_PIECES) if not optional or count in body else 1
    i = _int(body, index, 0, n - 1) if not optional or index in body else 0
    return i, n


def _step(body: dict) -> tuple[int, int]:
    """(base, version) of a change: base < version (a step of more than one is well-formed:
    the engine's gap rule handles it)."""
    version = _int(body, "version", 1)
    base = _int(body, "base")
    if base >= version:
        raise CorruptRecord(
            f"a change must go to a higher version, got {base} -> {version}", "bad_base"
        )
    return base, version


def _at_least(cardinality: int, members: int, what: str) -> None:
    if cardinality < members:
        raise CorruptRecord(
            f"cardinality {cardinality} is below the {members} members of its {what}",
            "bad_cardinality",
        )


def _expiries(body: dict, bitmap: BitMap64, ts: int) -> tuple[tuple[int, BitMap64], ...]:
    """A snapshot chunk's optional `expiries`: distinct deadlines after `ts`, each with
    members of the chunk."""
    raw = body.get("expiries", [])
    if type(raw) is not list:
        raise CorruptRecord("field 'expiries' must be a list", "bad_expiries")
    out: list[tuple[int, BitMap64]] = []
    for pair in raw:
        if type(pair) is not list or len(pair) != 2:
            raise CorruptRecord("an expiry is [expires_at_ms, bitmap]", "bad_expiries")
        at = _int({"expires_at": pair[0]}, "expires_at", ts + 1, _I64)
        members = _bitmap({"expiries": pair[1]}, "expiries")
        if not members.issubset(bitmap):
            raise CorruptRecord("expiries name ids outside the chunk", "bad_expiries")
        out.append((at, members))
    if len({at for at, _ in out}) != len(out):
        raise CorruptRecord("expiries repeat a deadline", "bad_expiries")
    return tuple(out)


def decode(
    value: bytes,
    *,
    snapshots: bool = False,
    wanted: Callable[[str, int], bool] | None = None,
) -> Record | Skipped:
    """Parse and validate one log value. `snapshots` says which topic it came from (a drop
    differs). When `wanted(segment, version)` is False the result is `Skipped`, before any
    bitmap is deserialized: replays skip most records they read, and each bitmap is many
    allocations.

    Raises UnknownRecord for an unknown format or kind, CorruptRecord for anything malformed;
    each carries a `reason` token.
    """
    try:
        body = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception as exc:
        raise CorruptRecord(f"not msgpack: {exc}", "not_msgpack") from exc
    if not isinstance(body, dict):
        raise CorruptRecord(f"a record is a msgpack map, got {type(body).__name__}", "not_a_map")
    fmt = body.get("format")
    if fmt != FORMAT:
        raise UnknownRecord(f"unknown format {fmt!r}", "unknown_format")
    kind = body.get("kind")
    if type(kind) is not str or kind not in (_SNAPSHOT_KINDS if snapshots else _DELTA_KINDS):
        raise UnknownRecord(f"unknown kind {kind!r}", "unknown_kind")
    segment = _segment(body)
    if kind == "heartbeat":  # no bitmap: `wanted` would save nothing
        return Heartbeat(
            segment,
            _int(body, "version", 1, _I64),
            _int(body, "max_age_s", 0, MAX_AGE_SECONDS),
            _int(body, "ts"),
        )
    if snapshots:
        version = _int(body, "version", 1)
        delta_offset = _int(body, "delta_offset", 0, _I64)
    else:
        base, version = _step(body)
    ts = _int(body, "ts")
    if kind == "snapshot":
        chunk, chunks = _piece(body, "chunk", "chunks")
        cardinality = _int(body, "cardinality")
    elif kind == "delta":
        part, parts = _piece(body, "part", "parts", optional=True)
        cardinality = _int(body, "cardinality")
        expires_at = _int(body, "expires_at", ts + 1, _I64) if "expires_at" in body else 0
    if wanted is not None and not wanted(segment, version):
        return Skipped(segment, version)
    if kind == "delta":
        add, remove = _bitmap(body, "add"), _bitmap(body, "remove")
        if not add.isdisjoint(remove):
            raise CorruptRecord("a delta adds and removes the same ids", "bad_bitmap")
        if expires_at and remove:
            raise CorruptRecord("a TTL delta (expires_at) removes nothing", "bad_expires_at")
        _at_least(cardinality, len(add), "adds")
        return Delta(segment, base, version, add, remove, cardinality, ts, part, parts, expires_at)
    if kind == "snapshot":
        bitmap = _bitmap(body, "bitmap")
        _at_least(cardinality, len(bitmap), "chunk")
        expiries = _expiries(body, bitmap, ts)
        return SnapshotChunk(
            segment, version, chunk, chunks, bitmap, cardinality, delta_offset, ts, expiries
        )
    if snapshots:
        return DropMarker(segment, version, delta_offset, ts)
    return Drop(segment, base, version, ts)


def split_bitmaps(
    bitmaps: list[BitMap64], max_bytes: int = MAX_RECORD_BITMAP_BYTES
) -> list[tuple[int, int, list[BitMap64]]]:
    """Cut the id space into half-open ranges [lo, hi) so that the bitmaps' parts inside one
    range serialize to at most `max_bytes` together (a range holding a single id may exceed
    it); returns each range with the bitmaps' parts in it. Bisects by rank until every range
    fits, so dense runs and sparse stretches are both cut by their real serialized size.
    Works on sorted arrays: pyroaring's 64-bit rank and slicing are slow on sparse bitmaps.
    """
    whole = [(0, 2**64, list(bitmaps))]
    if sum(len(b.serialize()) for b in bitmaps) <= max_bytes:
        return whole
    arrays = [b.to_array() for b in bitmaps]
    union = BitMap64.union(*bitmaps).to_array() if len(bitmaps) > 1 else arrays[0]

    def index(arr: array, x: int) -> int:
        return bisect.bisect_left(arr, x) if x < 2**64 else len(arr)

    def parts(lo: int, hi: int) -> list[BitMap64]:
        out = []
        for arr in arrays:
            part = BitMap64(arr[index(arr, lo) : index(arr, hi)])
            part.run_optimize()
            out.append(part)
        return out

    done: list[tuple[int, int, list[BitMap64]]] = []
    todo = [(0, 2**64)]
    while todo:
        lo, hi = todo.pop()
        cut = parts(lo, hi)
        first, last = index(union, lo), index(union, hi)
        if sum(len(p.serialize()) for p in cut) <= max_bytes or last - first <= 1:
            done.append((lo, hi, cut))
            continue
        mid = union[(first + last) // 2]
        todo.append((mid, hi))
        todo.append((lo, mid))
    return done
