"""The log record codec (sidecar/record.py) and the partitioner (sidecar/partitioner.py).

Round trips for every record type, the unknown/corrupt split on decode (never any other
exception), the id-range splitting used for snapshot chunks and split deltas, and Kafka's
Java murmur2 test vectors.
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.partitioner import murmur2, partition_for
from sidecar.record import (
    FORMAT,
    MAX_AGE_SECONDS,
    CorruptRecord,
    Delta,
    Drop,
    DropMarker,
    Heartbeat,
    RecordError,
    Skipped,
    SnapshotChunk,
    UnknownRecord,
    decode,
    delta_key,
    encode,
    snapshot_key,
    split_bitmaps,
)

MAX_ID = 2**64 - 1
U64 = st.integers(0, MAX_ID)

# -- strategies ---------------------------------------------------------------------------------

segment_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}\Z")
_id_values = st.one_of(
    st.integers(0, 2**16),
    st.integers(2**32 - 10, 2**32 + 10),
    U64,
    st.integers(MAX_ID - 2**17, MAX_ID),
)


@st.composite
def bitmaps(draw: st.DrawFn, ids: st.SearchStrategy[int] = _id_values) -> BitMap64:
    bm = BitMap64(draw(st.lists(ids, max_size=40)))
    if draw(st.booleans()):  # a run, so run/bitset containers show up too
        start = draw(ids)
        length = draw(st.integers(0, 5000))
        bm.update(range(start, min(start + length, MAX_ID)))
    return bm


@st.composite
def valid_deltas(draw: st.DrawFn) -> Delta:
    version = draw(st.integers(1, MAX_ID))
    add, remove = draw(bitmaps()), draw(bitmaps())
    remove -= add  # a change never adds and removes the same id
    parts = draw(st.integers(1, 50))
    return Delta(
        draw(segment_ids),
        draw(st.integers(0, version - 1)),
        version,
        add,
        remove,
        draw(st.integers(len(add), MAX_ID)),
        draw(U64),
        draw(st.integers(0, parts - 1)),
        parts,
    )


deltas = valid_deltas()
drops = st.integers(1, MAX_ID).flatmap(
    lambda v: st.builds(Drop, segment_ids, st.integers(0, v - 1), st.just(v), U64)
)


@st.composite
def valid_chunks(draw: st.DrawFn) -> SnapshotChunk:
    chunks = draw(st.integers(1, 50))
    bitmap = draw(bitmaps())
    return SnapshotChunk(
        draw(segment_ids),
        draw(st.integers(1, MAX_ID)),
        draw(st.integers(0, chunks - 1)),
        chunks,
        bitmap,
        draw(st.integers(len(bitmap), MAX_ID)),
        draw(st.integers(0, 2**63 - 1)),
        draw(U64),
    )


chunks = valid_chunks()
markers = st.builds(DropMarker, segment_ids, st.integers(1, MAX_ID), st.integers(0, 2**63 - 1), U64)
beats = st.builds(
    Heartbeat, segment_ids, st.integers(1, 2**63 - 1), st.integers(0, MAX_AGE_SECONDS), U64
)


def _is_snapshot_topic(record: object) -> bool:
    return isinstance(record, SnapshotChunk | DropMarker)


# -- round trips --------------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(deltas, drops, chunks, markers, beats))
def test_round_trip_every_record_type(record: object) -> None:
    value = encode(record)  # type: ignore[arg-type]
    assert isinstance(value, bytes)
    back = decode(value, snapshots=_is_snapshot_topic(record))
    assert type(back) is type(record)
    assert back == record


@pytest.mark.parametrize(
    "record",
    [
        Delta("s", 0, 1, BitMap64(), BitMap64(), 0, 0),
        Delta("s", MAX_ID - 1, MAX_ID, BitMap64([0, MAX_ID]), BitMap64([1]), MAX_ID, MAX_ID),
        Delta("s", 3, 4, BitMap64([7]), BitMap64(), 1, 5, part=2, parts=3),
        Drop("s", MAX_ID - 1, MAX_ID, MAX_ID),
        SnapshotChunk("s", 1, 0, 1, BitMap64(), 0, 0, 0),
        SnapshotChunk("s", MAX_ID, 4, 5, BitMap64([MAX_ID]), 1, 2**63 - 1, MAX_ID),
        DropMarker("s", MAX_ID, 2**63 - 1, 0),
    ],
    ids=repr,
)
def test_round_trip_edges(record: object) -> None:
    assert decode(encode(record), snapshots=_is_snapshot_topic(record)) == record  # type: ignore[arg-type]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(deltas, drops, chunks, markers), st.booleans())
def test_wanted_decides_before_the_bitmaps_are_read(record: object, want: bool) -> None:
    asked: list[tuple[str, int]] = []

    def wanted(segment: str, version: int) -> bool:
        asked.append((segment, version))
        return want

    back = decode(encode(record), snapshots=_is_snapshot_topic(record), wanted=wanted)  # type: ignore[arg-type]
    assert asked == [(record.segment, record.version)]  # type: ignore[attr-defined]
    assert back == (record if want else Skipped(record.segment, record.version))  # type: ignore[attr-defined]


@pytest.mark.parametrize("want", [True, False])
def test_a_kind_from_the_other_topic_is_unknown_wanted_or_not(want: bool) -> None:
    snapshot = encode(SnapshotChunk("s", 1, 0, 1, BitMap64([1]), 1, 0, 0))
    delta = encode(Delta("s", 0, 1, BitMap64([1]), BitMap64(), 1, 0))
    with pytest.raises(UnknownRecord):
        decode(snapshot, wanted=lambda _s, _v: want)
    with pytest.raises(UnknownRecord):
        decode(delta, snapshots=True, wanted=lambda _s, _v: want)


def test_an_unwanted_record_with_a_broken_bitmap_is_skipped_not_corrupt() -> None:
    body = msgpack.unpackb(encode(Delta("vip", 4, 5, BitMap64([1]), BitMap64(), 1, 123)))
    body["add"] = b"not a bitmap"
    value = msgpack.packb(body)
    assert decode(value, wanted=lambda _s, _v: False) == Skipped("vip", 5)
    with pytest.raises(CorruptRecord, match="add"):
        decode(value, wanted=lambda _s, _v: True)


def test_encoding_shape_matches_design() -> None:
    body = msgpack.unpackb(encode(Delta("vip", 4, 5, BitMap64([1]), BitMap64([2]), 9, 123)))
    assert body == {
        "format": 1,
        "kind": "delta",
        "segment": "vip",
        "base": 4,
        "version": 5,
        "add": BitMap64([1]).serialize(),
        "remove": BitMap64([2]).serialize(),
        "cardinality": 9,
        "ts": 123,
    }
    split = msgpack.unpackb(encode(Delta("vip", 4, 5, BitMap64(), BitMap64(), 9, 1, 1, 2)))
    assert (split["part"], split["parts"]) == (1, 2)
    snap = msgpack.unpackb(encode(SnapshotChunk("vip", 5, 0, 2, BitMap64([3]), 9, 77, 1)))
    assert snap["kind"] == "snapshot" and snap["chunks"] == 2 and snap["delta_offset"] == 77
    assert BitMap64.deserialize(snap["bitmap"]) == BitMap64([3])
    assert msgpack.unpackb(encode(DropMarker("vip", 6, 10, 1)))["kind"] == "drop"
    assert delta_key("vip") == b"vip"
    assert snapshot_key("vip", 3) == b"vip#3"


def test_encode_rejects_non_records() -> None:
    with pytest.raises(TypeError):
        encode({"kind": "delta"})  # type: ignore[arg-type]


# -- unknown ------------------------------------------------------------------------------------


def _valid_delta_body() -> dict:
    return msgpack.unpackb(encode(Delta("s", 0, 1, BitMap64([1]), BitMap64(), 1, 0)))


def _valid_snapshot_body() -> dict:
    return msgpack.unpackb(encode(SnapshotChunk("s", 1, 0, 1, BitMap64([1]), 1, 0, 0)))


def _pack(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("fmt", [0, 2, 99, "1", None, -1, [1]])
@pytest.mark.parametrize("snapshots", [False, True])
def test_unknown_format(fmt: object, snapshots: bool) -> None:
    body = _valid_snapshot_body() if snapshots else _valid_delta_body()
    if fmt is None:
        del body["format"]
    else:
        body["format"] = fmt
    with pytest.raises(UnknownRecord):
        decode(_pack(body), snapshots=snapshots)


@pytest.mark.parametrize("kind", ["upsert", "", "DELTA", None, 5, "snapshot"])
def test_unknown_kind_in_deltas(kind: object) -> None:
    body = _valid_delta_body()
    if kind is None:
        del body["kind"]
    else:
        body["kind"] = kind
    with pytest.raises(UnknownRecord):
        decode(_pack(body))


def test_a_delta_in_the_snapshots_topic_is_unknown() -> None:
    with pytest.raises(UnknownRecord):
        decode(encode(Delta("s", 0, 1, BitMap64(), BitMap64(), 0, 0)), snapshots=True)


def test_a_future_format_with_a_new_shape_is_unknown_not_corrupt() -> None:
    with pytest.raises(UnknownRecord):
        decode(_pack({"format": 2, "kind": "delta", "segment": 7, "add": "not bytes"}))


def test_unknown_and_corrupt_are_record_errors() -> None:
    assert issubclass(UnknownRecord, RecordError)
    assert issubclass(CorruptRecord, RecordError)
    assert not issubclass(UnknownRecord, CorruptRecord)


# -- corrupt ------------------------------------------------------------------------------------

NOT_MSGPACK = [b"", b"\xc1", b"\x92\x01", b"\x81\xa1", b"\xdd\xff\xff\xff\xff", b"\x85\x01"]


@pytest.mark.parametrize("value", NOT_MSGPACK, ids=repr)
def test_not_msgpack_is_corrupt(value: bytes) -> None:
    with pytest.raises(CorruptRecord):
        decode(value)


def test_trailing_bytes_are_corrupt() -> None:
    with pytest.raises(CorruptRecord):
        decode(encode(Drop("s", 0, 1, 0)) + b"\x00")


@pytest.mark.parametrize("body", [[1, 2], 1, "delta", None, b"x", [], 1.5, True])
def test_non_map_is_corrupt(body: object) -> None:
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


def test_truncated_values_are_corrupt() -> None:
    value = encode(Delta("seg", 1, 2, BitMap64(range(100)), BitMap64([MAX_ID]), 100, 5))
    for cut in range(len(value)):
        with pytest.raises(CorruptRecord):
            decode(value[:cut])


@pytest.mark.parametrize("field", ["add", "remove"])
@pytest.mark.parametrize("bad", [b"", b"\x00", b"garbage bytes", "text", 5, None, [1, 2]])
def test_bad_delta_bitmap_is_corrupt(field: str, bad: object) -> None:
    body = _valid_delta_body()
    body[field] = bad
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


def test_truncated_bitmap_bytes_are_corrupt() -> None:
    good = BitMap64([1, 2**40, MAX_ID]).serialize()
    for cut in range(len(good)):
        body = _valid_snapshot_body()
        body["bitmap"] = good[:cut]
        with pytest.raises(CorruptRecord):
            decode(_pack(body), snapshots=True)


DELTA_FIELDS = ["segment", "base", "version", "add", "remove", "cardinality", "ts"]
SNAPSHOT_FIELDS = [
    "segment",
    "version",
    "chunk",
    "chunks",
    "bitmap",
    "cardinality",
    "delta_offset",
    "ts",
]


@pytest.mark.parametrize("field", DELTA_FIELDS)
def test_delta_missing_field_is_corrupt(field: str) -> None:
    body = _valid_delta_body()
    del body[field]
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


@pytest.mark.parametrize("field", SNAPSHOT_FIELDS)
def test_snapshot_missing_field_is_corrupt(field: str) -> None:
    body = _valid_snapshot_body()
    del body[field]
    with pytest.raises(CorruptRecord):
        decode(_pack(body), snapshots=True)


@pytest.mark.parametrize(
    ("record", "field"),
    [(Drop("s", 1, 2, 3), f) for f in ("segment", "base", "version", "ts")]
    + [(Heartbeat("s", 2, 60, 4), f) for f in ("segment", "version", "max_age_s", "ts")],
)
def test_drop_or_heartbeat_missing_field_is_corrupt(record: Drop | Heartbeat, field: str) -> None:
    body = msgpack.unpackb(encode(record))
    del body[field]
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


@pytest.mark.parametrize(
    ("field", "bad"), [("max_age_s", -1), ("max_age_s", 2**31), ("version", 0)]
)
def test_heartbeat_out_of_range_is_corrupt(field: str, bad: int) -> None:
    body = msgpack.unpackb(encode(Heartbeat("s", 2, 60, 4)))
    body[field] = bad
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


def test_a_heartbeat_in_the_snapshots_topic_is_unknown() -> None:
    with pytest.raises(UnknownRecord):
        decode(encode(Heartbeat("s", 2, 60, 4)), snapshots=True)


@pytest.mark.parametrize("field", ["segment", "version", "delta_offset", "ts"])
def test_drop_marker_missing_field_is_corrupt(field: str) -> None:
    body = msgpack.unpackb(encode(DropMarker("s", 2, 3, 4)))
    del body[field]
    with pytest.raises(CorruptRecord):
        decode(_pack(body), snapshots=True)


MISTYPED_INTS = ["7", 7.0, True, False, None, -1, b"\x07", [7]]


@pytest.mark.parametrize("field", ["base", "version", "cardinality", "ts", "part", "parts"])
@pytest.mark.parametrize("bad", MISTYPED_INTS, ids=repr)
def test_delta_mistyped_int_is_corrupt(field: str, bad: object) -> None:
    body = _valid_delta_body()
    body[field] = bad
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


@pytest.mark.parametrize("field", ["version", "chunk", "chunks", "cardinality", "delta_offset"])
@pytest.mark.parametrize("bad", MISTYPED_INTS, ids=repr)
def test_snapshot_mistyped_int_is_corrupt(field: str, bad: object) -> None:
    body = _valid_snapshot_body()
    body[field] = bad
    with pytest.raises(CorruptRecord):
        decode(_pack(body), snapshots=True)


@pytest.mark.parametrize("bad", ["", 5, None, b"seg", ["s"]], ids=repr)
def test_mistyped_segment_is_corrupt(bad: object) -> None:
    body = _valid_delta_body()
    body["segment"] = bad
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


def test_version_zero_is_corrupt() -> None:
    for value, snapshots in [
        (encode(Delta("s", 0, 1, BitMap64(), BitMap64(), 0, 0)), False),
        (encode(Drop("s", 0, 1, 0)), False),
        (encode(SnapshotChunk("s", 1, 0, 1, BitMap64(), 0, 0, 0)), True),
        (encode(DropMarker("s", 1, 0, 0)), True),
    ]:
        body = msgpack.unpackb(value)
        body["version"] = 0
        with pytest.raises(CorruptRecord):
            decode(_pack(body), snapshots=snapshots)


@pytest.mark.parametrize("part,parts", [(1, 1), (3, 3), (4, 3), (0, 0), (MAX_ID, 2)])
def test_part_not_below_parts_is_corrupt(part: int, parts: int) -> None:
    body = _valid_delta_body()
    body["part"] = part
    body["parts"] = parts
    with pytest.raises(CorruptRecord):
        decode(_pack(body))


def test_part_without_parts_means_one_part() -> None:
    body = _valid_delta_body()
    body["part"] = 1
    with pytest.raises(CorruptRecord):
        decode(_pack(body))
    body["part"] = 0
    assert decode(_pack(body)).parts == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("chunk,chunks", [(1, 1), (5, 2), (0, 0)])
def test_chunk_not_below_chunks_is_corrupt(chunk: int, chunks: int) -> None:
    body = _valid_snapshot_body()
    body["chunk"] = chunk
    body["chunks"] = chunks
    with pytest.raises(CorruptRecord):
        decode(_pack(body), snapshots=True)


# -- decode never raises anything else ---------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), MAX_ID),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.binary(max_size=40),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_scalars, inner, max_size=4),
    max_leaves=10,
)
_field_names = st.sampled_from(
    [
        "format",
        "kind",
        *DELTA_FIELDS,
        *SNAPSHOT_FIELDS,
        "part",
        "parts",
        "other",
    ]
)
_field_values = st.one_of(
    st.sampled_from([1, 0, 2, "delta", "drop", "snapshot", "s", b""]),
    st.integers(-5, 5),
    bitmaps().map(lambda b: b.serialize()),
    _values,
)


@st.composite
def record_like_maps(draw: st.DrawFn) -> dict:
    body = draw(st.dictionaries(_field_names, _field_values, max_size=12))
    if draw(st.booleans()):
        body["format"] = FORMAT
    if draw(st.booleans()):
        body["kind"] = draw(st.sampled_from(["delta", "drop", "snapshot"]))
    return body


def _decode_never_crashes(value: bytes) -> None:
    for snapshots in (False, True):
        try:
            record = decode(value, snapshots=snapshots)
        except (UnknownRecord, CorruptRecord):
            continue
        assert isinstance(record, Delta | Drop | SnapshotChunk | DropMarker)
        if isinstance(record, Delta):
            assert 0 <= record.part < record.parts
        if isinstance(record, SnapshotChunk):
            assert 0 <= record.chunk < record.chunks


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_record_errors(value: bytes) -> None:
    _decode_never_crashes(value)


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(record_like_maps())
def test_random_maps_only_raise_record_errors(body: dict) -> None:
    _decode_never_crashes(_pack(body))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_records_only_raise_record_errors(data: st.DataObject) -> None:
    record = data.draw(st.one_of(deltas, drops, chunks, markers))
    value = bytearray(encode(record))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(value) - 1))
        value[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(value)))
    _decode_never_crashes(bytes(value[:cut]))


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_random_bitmap_bytes_are_corrupt_or_valid(raw: bytes) -> None:
    body = _valid_delta_body()
    body["add"] = raw
    try:
        record = decode(_pack(body))
    except CorruptRecord:
        return
    assert isinstance(record, Delta)


# -- split_bitmaps --------------------------------------------------------------------------------

Pieces = list[tuple[int, int, list[BitMap64]]]


def _check_partition(bitmaps_: list[BitMap64], pieces: Pieces) -> None:
    """The ranges cover the id space in order; each bitmap's parts lie in their range and
    together are exactly that bitmap."""
    assert pieces[0][0] == 0
    assert pieces[-1][1] == 2**64
    for (lo, hi, _), (next_lo, _, _) in zip(pieces, pieces[1:], strict=False):
        assert lo < hi == next_lo
    for k, bm in enumerate(bitmaps_):
        parts = [parts[k] for _, _, parts in pieces]
        for part, (lo, hi, _) in zip(parts, pieces, strict=True):
            assert all(lo <= x < hi for x in part)
        assert sum(len(p) for p in parts) == len(bm)  # pairwise disjoint ...
        assert BitMap64.union(BitMap64(), *parts) == bm  # ... and together exactly bm


def _sizes(pieces: Pieces) -> list[int]:
    return [sum(len(p.serialize()) for p in parts) for _, _, parts in pieces]


def test_split_one_range_when_it_fits() -> None:
    assert [(lo, hi) for lo, hi, _ in split_bitmaps([])] == [(0, 2**64)]
    assert [(lo, hi) for lo, hi, _ in split_bitmaps([BitMap64()])] == [(0, 2**64)]
    two = [BitMap64(range(1000)), BitMap64([MAX_ID])]
    assert split_bitmaps(two) == [(0, 2**64, two)]


_below_top = st.one_of(
    st.integers(0, 2**20), st.integers(0, MAX_ID - 1), st.integers(MAX_ID - 2**18, MAX_ID - 1)
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(bitmaps(_below_top), min_size=1, max_size=3),
    st.integers(16, 2048),
)
def test_split_partitions_the_bitmaps_exactly(bms: list[BitMap64], max_bytes: int) -> None:
    _check_partition(bms, split_bitmaps(bms, max_bytes))


@st.composite
def uniform_bitmaps(draw: st.DrawFn) -> list[BitMap64]:
    """Ids spread evenly over a span (what hashed or sequential user ids look like)."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    span = draw(st.sampled_from([2**16, 2**24, 2**32, 2**48, 2**64 - 1]))
    base = draw(st.sampled_from([0, MAX_ID - span]))
    out = []
    for _ in range(draw(st.integers(1, 2))):
        n = draw(st.integers(0, 3000))
        out.append(BitMap64(rnd.randrange(base, base + span) for _ in range(n)))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uniform_bitmaps(), st.integers(512, 8192))
def test_split_parts_stay_under_the_byte_limit(bms: list[BitMap64], max_bytes: int) -> None:
    pieces = split_bitmaps(bms, max_bytes)
    _check_partition(bms, pieces)
    assert max(_sizes(pieces)) <= max_bytes
    total = sum(len(b.serialize()) for b in bms)
    if total > max_bytes:
        assert len(pieces) > 1


def test_split_a_big_sparse_bitmap_at_the_real_limit() -> None:
    from sidecar.record import MAX_RECORD_BITMAP_BYTES

    rnd = random.Random(7)
    bm = BitMap64(rnd.randrange(0, 2**64) for _ in range(60_000))  # ~1.5 MB serialized
    pieces = split_bitmaps([bm])
    assert len(pieces) > 1
    _check_partition([bm], pieces)
    assert max(_sizes(pieces)) <= MAX_RECORD_BITMAP_BYTES


def test_ids_near_the_top_below_the_last_one() -> None:
    bm = BitMap64(range(MAX_ID - 5000, MAX_ID))  # up to 2**64-2
    bm.update(range(1000))
    _check_partition([bm], split_bitmaps([bm], 64))


def test_small_bitmaps_holding_the_top_id() -> None:
    bm = BitMap64([0, 5, MAX_ID - 1, MAX_ID])
    pieces = split_bitmaps([bm], 1)
    _check_partition([bm], pieces)
    assert pieces[-1][2] == [BitMap64([MAX_ID])]


def test_split_with_a_cluster_at_the_top_id() -> None:
    bm = BitMap64(range(MAX_ID - 5000, MAX_ID))
    bm.add(MAX_ID)
    bm.update(range(0, 2**32, 2**24 + 1))
    _check_partition([bm], split_bitmaps([bm], 1024))


def test_split_bounds_part_size_for_dense_plus_sparse() -> None:
    from sidecar.record import MAX_RECORD_BITMAP_BYTES

    rnd = random.Random(0)
    bm = BitMap64(range(0, 20_000_000))  # a run: a few KB serialized
    bm.update(rnd.sample(range(2**40, 2**63), 200_000))  # sparse: ~4.4 MB serialized
    sizes = _sizes(split_bitmaps([bm]))
    assert max(sizes) <= MAX_RECORD_BITMAP_BYTES, sizes


# -- murmur2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_java_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@given(st.binary(max_size=64))
def test_murmur2_is_a_signed_32_bit_int(data: bytes) -> None:
    h = murmur2(data)
    assert -(2**31) <= h < 2**31


@given(segment_ids, st.integers(1, 1000))
def test_partition_for_range(segment: str, partitions: int) -> None:
    p = partition_for(segment, partitions)
    assert 0 <= p < partitions
    assert p == (murmur2(segment.encode()) & 0x7FFFFFFF) % partitions


def test_partition_for_java_values() -> None:
    # Java: Utils.toPositive(Utils.murmur2("foobar".getBytes())) % n
    assert partition_for("foobar", 8) == (-790332482 & 0x7FFFFFFF) % 8
    assert partition_for("21", 3) == (-973932308 & 0x7FFFFFFF) % 3
    assert partition_for("abc", 1) == 0
    # spreads segments over partitions
    assert len({partition_for(f"seg-{i}", 8) for i in range(200)}) == 8


# -- every field validated on decode (issue 12, defect 2) ------------------------------------------

_DELTA = "delta"
_SNAP = "snapshot"
_MARK = "marker"

INVALID_FIELDS = [
    # (which body, field, bad value, reason)
    (_DELTA, "segment", "bad segment!", "bad_segment"),
    (_DELTA, "segment", "x" * 5_000_000, "bad_segment"),
    (_DELTA, "segment", "s\n", "bad_segment"),
    (_DELTA, "segment", "", "bad_segment"),
    (_DELTA, "segment", "-leading-dash", "bad_segment"),
    (_SNAP, "segment", "bad seg!", "bad_segment"),
    (_SNAP, "segment", "y" * 129, "bad_segment"),
    (_MARK, "segment", "a/b", "bad_segment"),
    (_DELTA, "base", 5, "bad_base"),  # version 1 from base 5
    (_DELTA, "version", 0, "bad_version"),
    (_SNAP, "version", 0, "bad_version"),
    (_DELTA, "ts", -1, "bad_ts"),
    (_SNAP, "delta_offset", 2**63, "bad_delta_offset"),
    (_MARK, "delta_offset", -3, "bad_delta_offset"),
    (_SNAP, "chunks", 2**40, "bad_chunks"),
    (_SNAP, "chunk", 3, "bad_chunk"),
    (_DELTA, "parts", 2**40, "bad_parts"),
    (_DELTA, "cardinality", -1, "bad_cardinality"),
    (_SNAP, "cardinality", "many", "bad_cardinality"),
]


def _body(which: str) -> dict:
    if which == _DELTA:
        return _valid_delta_body()
    if which == _SNAP:
        return _valid_snapshot_body()
    return msgpack.unpackb(encode(DropMarker("s", 2, 0, 0)))


@pytest.mark.parametrize(
    "which,field,bad,reason",
    INVALID_FIELDS,
    ids=lambda v: repr(v)[:30] if isinstance(v, str) else None,
)
def test_every_field_is_validated_on_decode(
    which: str, field: str, bad: object, reason: str
) -> None:
    body = _body(which)
    body[field] = bad
    if field == "parts":
        body["part"] = 0
    for wanted in (None, lambda _s, _v: False):  # a skipped record is validated the same
        with pytest.raises(CorruptRecord) as caught:
            decode(_pack(body), snapshots=which != _DELTA, wanted=wanted)
        assert caught.value.reason == reason
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_a_cardinality_below_the_records_own_members_is_corrupt() -> None:
    with pytest.raises(CorruptRecord) as caught:
        decode(encode(Delta("s", 0, 1, BitMap64([1, 2, 3]), BitMap64(), 2, 0)))
    assert caught.value.reason == "bad_cardinality"
    with pytest.raises(CorruptRecord) as caught:
        decode(encode(SnapshotChunk("s", 1, 0, 1, BitMap64([1, 2]), 1, 0, 0)), snapshots=True)
    assert caught.value.reason == "bad_cardinality"


def test_a_delta_that_adds_and_removes_the_same_id_is_corrupt() -> None:
    with pytest.raises(CorruptRecord) as caught:
        decode(encode(Delta("s", 0, 1, BitMap64([1, 2]), BitMap64([2]), 2, 0)))
    assert caught.value.reason == "bad_bitmap"


@pytest.mark.parametrize(
    "value,snapshots,reason",
    [
        (b"\xc1garbage", False, "not_msgpack"),
        (_pack([1, 2]), True, "not_a_map"),
        (_pack({"format": 2, "kind": "delta"}), False, "unknown_format"),
        (_pack({"format": 1, "kind": "bogus"}), True, "unknown_kind"),
        (_pack({"format": 1, "kind": ["delta"]}), False, "unknown_kind"),
    ],
)
def test_unreadable_values_carry_a_reason(value: bytes, snapshots: bool, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        decode(value, snapshots=snapshots)
    assert caught.value.reason == reason
