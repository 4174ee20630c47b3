"""Poison for the log: values written straight into the topics, bypassing the publisher, and
damage to log-directory files. Shared by the log-directory tests (tests/test_poison.py) and
the Kafka fault tests (tests/test_faults_kafka.py).

Every poison value names the `reason` the replica counts it under (`Counters.skipped`), or
None for values that are well-formed but break the version rules (a gap, a cardinality that
does not match): those mark a segment stale or diverged instead, and it is answered by the
fallback, never locally.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from pyroaring import BitMap64

from sidecar.partitioner import partition_for
from sidecar.record import Delta, SnapshotChunk, delta_key, encode, snapshot_key
from sidecar.transport.base import Topic, Transport


@dataclass(frozen=True)
class Poison:
    name: str
    topic: Topic
    segment: str  # decides the partition (a segment always lives in one)
    key: bytes | None
    value: bytes
    reason: str | None


def _pack(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _delta(segment: str, **fields: object) -> bytes:
    body = msgpack.unpackb(encode(Delta("s", 0, 1, BitMap64([1]), BitMap64(), 1, 0)))
    body.update(segment=segment, **fields)
    return _pack(body)


def _chunk(segment: str, **fields: object) -> bytes:
    body = msgpack.unpackb(encode(SnapshotChunk("s", 1, 0, 1, BitMap64([1]), 1, 0, 0)))
    body.update(segment=segment, **fields)
    return _pack(body)


def catalogue() -> list[Poison]:
    """One of each kind of poison the suite injects, into both topics."""
    huge = "h" * 3_000_000  # under the topics' 4 MiB record limit
    items = [
        ("garbage", "deltas", "g", b"\x00\xffnot msgpack at all\xc1", "not_msgpack"),
        ("not-a-map", "deltas", "g", _pack([1, "delta"]), "not_a_map"),
        ("format-2", "deltas", "g", _pack({"format": 2, "kind": "delta"}), "unknown_format"),
        ("kind-bogus", "deltas", "g", _pack({"format": 1, "kind": "bogus"}), "unknown_kind"),
        ("bad-id", "deltas", "bad segment!", _delta("bad segment!"), "bad_segment"),
        ("huge-id", "deltas", "g", _delta(huge), "bad_segment"),
        ("wrong-base", "deltas", "g", _delta("ghost", base=9, version=4), "bad_base"),
        ("card-below-adds", "deltas", "g", _delta("g1", cardinality=0), "bad_cardinality"),
        ("corrupt-bitmap", "deltas", "g", _delta("g2", add=b"\x01\x02garbage"), "bad_bitmap"),
        ("huge-parts", "deltas", "g", _delta("g3", part=0, parts=2**40), "bad_parts"),
        ("part-past-parts", "deltas", "g", _delta("g3", part=5, parts=2), "bad_part"),
        ("gap", "deltas", "ghost", _delta("ghost", base=4, version=5), None),
        (
            "liar",
            "deltas",
            "liar",
            _delta("liar", add=BitMap64([1, 2]).serialize(), cardinality=5),
            None,
        ),
        ("snap-garbage", "snapshots", "g", b"\x92\x01\x02", "not_a_map"),
        ("snap-kind", "snapshots", "g", _pack({"format": 1, "kind": "delta"}), "unknown_kind"),
        ("snap-bad-id", "snapshots", "bad seg!", _chunk("bad seg!"), "bad_segment"),
        ("snap-huge-id", "snapshots", "g", _chunk(huge), "bad_segment"),
        ("snap-chunk-range", "snapshots", "g", _chunk("g4", chunk=7, chunks=3), "bad_chunk"),
        ("snap-huge-chunks", "snapshots", "g", _chunk("g5", chunks=2**40), "bad_chunks"),
        ("snap-card", "snapshots", "g", _chunk("g6", cardinality=9), "snapshot_cardinality"),
        ("snap-bitmap", "snapshots", "g", _chunk("g7", bitmap=b"\xff" * 40), "bad_bitmap"),
        ("snap-format", "snapshots", "g", _pack({"format": "1"}), "unknown_format"),
    ]
    out = []
    for name, topic, segment, value, reason in items:
        key = snapshot_key(segment[:40], 0) if topic == "snapshots" else delta_key(segment[:40])
        out.append(Poison(name, topic, segment, key, value, reason))  # type: ignore[arg-type]
    return out


#: segments a poison value may leave behind, and how: a diverged one (never answered locally)
POISON_SEGMENTS = {"liar": "diverged"}


def expected_skips(topics: tuple[str, ...] = ("deltas", "snapshots")) -> dict[str, int]:
    """How many poison values of `topics` each reason counts."""
    counts: dict[str, int] = {}
    for p in catalogue():
        if p.reason is not None and p.topic in topics:
            counts[p.reason] = counts.get(p.reason, 0) + 1
    return counts


def inject(transport: Transport, poisons: list[Poison] | None = None, partitions: int = 2) -> None:
    """Write the poison straight into the log, in one transaction of a raw writer."""
    with transport.writer("poisoner", partitions=partitions) as w, w.transaction():
        for p in poisons or catalogue():
            w.append(p.topic, partition_for(p.segment, w.partitions), p.key, p.value)
