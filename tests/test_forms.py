"""A segment's in-memory form (sidecar/replica/forms.py): the compact form against a Python
set, the engine choosing forms across deltas that move a segment between shapes, checkpoints."""

from __future__ import annotations

import time
from array import array
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.expr import compile_expr
from sidecar.record import Delta
from sidecar.replica import checkpoint, view
from sidecar.replica.engine import Engine
from sidecar.replica.forms import (
    COMPACT,
    FormPolicy,
    Forms,
    dump,
    is_compact,
    load,
    roaring_bytes,
    to_bitmap,
    within,
)
from sidecar.replica.state import SegmentState
from tests.test_shared_replica import native

HIGH = 2**64 - 1
ids_64 = st.sets(st.integers(0, HIGH), max_size=400)
ids_32 = st.sets(st.integers(0, 2**32 - 1), max_size=3000)
runs = st.lists(
    st.tuples(st.integers(0, HIGH - 70_000), st.integers(1, 9000), st.integers(1, 3)),
    min_size=1,
    max_size=2,
).map(lambda rs: {x for a, n, step in rs for x in range(a, a + n * step, step)})
shapes = st.one_of(ids_64, ids_32, runs, st.just(set()), st.just({0, HIGH}))


def compact(ids: set[int], version: int = 1):  # type: ignore[no-untyped-def]
    return native.Segment.frombytes(native.encode(array("Q", sorted(ids)), version))


def probes_for(ids: set[int], extra: list[int]) -> list[int]:
    near = [x + d for x in sorted(ids)[:300] for d in (-1, 0, 1) if 0 <= x + d <= HIGH]
    return near + extra + [0, 1, HIGH, HIGH - 1, 2**32, 2**32 - 1]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=shapes, extra=st.lists(st.integers(0, HIGH), max_size=40), version=st.integers(1, 2**50))
def test_compact_form_is_the_set(ids: set[int], extra: list[int], version: int) -> None:
    seg = compact(ids, version)
    truth = sorted(ids)
    for x in probes_for(ids, extra):
        assert (x in seg) == (x in ids), x
    assert len(seg) == len(ids) == seg.cardinality
    assert list(seg) == truth
    assert seg.to_array() == array("Q", truth)
    assert to_bitmap(seg) == BitMap64(truth)
    again = load(*dump(seg))  # the checkpoint's round trip
    assert dump(seg)[1] == COMPACT and again.data == seg.data and list(again) == truth
    assert again.version == version
    users = BitMap64(probes_for(ids, extra))
    assert within(seg, users) == BitMap64(ids) & users


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=shapes, add=shapes, remove=shapes)
def test_merge_and_shape(base: set[int], add: set[int], remove: set[int]) -> None:
    def arr(s: set[int]) -> array[int]:
        return array("Q", sorted(s))

    merged = native.merge(arr(base), arr(add), arr(remove))
    assert merged == arr((base | add) - remove)
    k, roaring, size = native.shape(merged)
    bm = BitMap64(merged)
    bm.run_optimize()  # roaring then holds each container in its smallest kind, as shape says
    stats = bm.get_statistics()
    assert k == stats["n_containers"]
    assert roaring == sum(stats[f"n_bytes_{c}_containers"] for c in ("array", "run", "bitset"))
    assert size == len(native.encode(merged, 1))


def test_each_kind_is_chosen_where_it_is_smallest() -> None:
    cases = {
        native.KIND_ELIAS_FANO: spread(5000),  # random over 2**64: ~6 B a member
        native.KIND_CONTAINERS: set(range(70_000)),  # dense: bitsets, 1 bit a member
        native.KIND_SORTED: {0, HIGH},  # two ids: Elias-Fano's bitvector costs more
    }
    for kind, ids in cases.items():
        seg = compact(ids)
        assert seg.kind == kind and list(seg) == sorted(ids)
        assert all(x in seg for x in list(ids)[:500]) and (HIGH - 1 not in seg)
    assert len(compact(spread(5000)).data) < 7.0 * 5000  # the bound: 6.6 B a member


def test_compact_form_refuses_what_bitmap64_refuses() -> None:
    seg = compact({1, 2, 3})
    bm = BitMap64([1, 2, 3])
    for bad, exc in ((-1, OverflowError), (2**64, OverflowError), ("1", TypeError)):
        with pytest.raises(exc):
            bad in bm  # noqa: B015
        with pytest.raises(exc):
            bad in seg  # noqa: B015
    with pytest.raises(ValueError, match="magic"):
        native.Segment.frombytes(b"x" * 80)
    with pytest.raises(ValueError, match="unknown segment form"):
        load(b"", "bloom")


# -- the engine choosing forms --------------------------------------------------------------

SMALL = FormPolicy(min_members=64)


def spread(n: int, salt: int = 0) -> set[int]:
    return {((i + salt) * 0x9E3779B97F4A7C15) % 2**64 for i in range(n)}


#: members a delta adds or removes: spread over 2**64, over 2**32, or a run
chunks = st.one_of(
    st.builds(spread, st.integers(0, 3000), st.integers(0, 10**6)),
    st.sets(st.integers(0, 2**32 - 1), max_size=2000),
    st.tuples(st.integers(0, 2**40), st.integers(0, 20_000)).map(lambda t: set(range(*t))),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(st.tuples(chunks, st.floats(0, 1), st.booleans()), min_size=1, max_size=8),
    extra=st.lists(st.integers(0, HIGH), max_size=30),
)
def test_engine_answers_as_bitmap64_across_forms(
    steps: list[tuple[set[int], float, bool]], extra: list[int]
) -> None:
    """Deltas that add a shape's members and remove a fraction of what is held: the engine's
    segment (whatever form it chose) answers as a BitMap64 the same deltas were applied to."""
    engine = Engine(forms=Forms(SMALL))
    truth = BitMap64()
    for version, (adding, fraction, shuffle_out) in enumerate(steps, start=1):
        held = list(truth)
        gone = set(held[:: max(1, int(1 / fraction))] if fraction > 0.05 else [])
        if shuffle_out:
            gone |= set(held[-int(len(held) * fraction) :]) if held else set()
        add, remove = BitMap64(adding - gone) - truth, BitMap64(gone)
        truth = (truth | add) - remove
        delta = Delta("s", version - 1, version, add, remove, len(truth), 1000 + version)
        engine.apply_delta(delta)
        state = engine.segments["s"]
        assert state.fresh and state.version == version and state.cardinality == len(truth)
        members = state.bitmap
        assert len(members) == len(truth)
        for x in probes_for(set(truth), extra):
            assert (x in members) == (x in truth), x
        assert to_bitmap(members) == truth


def test_a_segment_moves_between_forms() -> None:
    engine = Engine(forms=Forms(SMALL))
    sparse = BitMap64(spread(5000))
    engine.apply_delta(Delta("s", 0, 1, sparse, BitMap64(), 5000, 1))
    assert is_compact(engine.segments["s"].bitmap)
    assert engine.segments["s"].bitmap.version == 1
    dense = BitMap64(range(10**9, 10**9 + 5_000_000))
    engine.apply_delta(Delta("s", 1, 2, dense, BitMap64(), 5_005_000, 2))
    assert not is_compact(engine.segments["s"].bitmap)  # 77 bitsets or a few runs: roaring
    engine.apply_delta(Delta("s", 2, 3, BitMap64(), dense, 5000, 3))
    state = engine.segments["s"]
    assert is_compact(state.bitmap) and to_bitmap(state.bitmap) == sparse
    # small segments and the publisher's engine stay roaring
    engine.apply_delta(Delta("t", 0, 1, BitMap64(spread(10)), BitMap64(), 10, 1))
    assert not is_compact(engine.segments["t"].bitmap)
    roaring_only = Engine(forms=Forms(None))
    roaring_only.install("s", state)
    assert type(roaring_only.segments["s"].bitmap) is BitMap64
    assert roaring_only.segments["s"].bitmap == sparse


def test_hysteresis_keeps_a_form_near_the_line() -> None:
    forms = Forms(FormPolicy(min_members=0, max_per_container=10**6, to_compact=0.5))
    wide = BitMap64((i + 1) << 32 for i in range(1000))  # roaring ~102 B a member: compact
    assert is_compact(forms.settle(wide, 1))
    # 1 in 8 over one 2**16 range: compact costs ~0.69 of roaring's bitset, inside the band
    mid = BitMap64(range(0, 2**16, 8))
    containers, payload, size = native.shape(mid.to_array())
    assert 0.5 < size / roaring_bytes(containers, payload) <= 0.9
    assert not is_compact(forms.settle(mid.copy(), 1))  # roaring stays roaring
    kept = forms.apply(forms.settle(wide, 1), mid, wide, 2)
    assert is_compact(kept) and to_bitmap(kept) == mid  # compact stays compact
    run = BitMap64(range(2**20, 2**20 + 100_000))
    back = forms.apply(kept, run, BitMap64(), 3)
    assert not is_compact(back) and back == mid | run  # a long run: roaring again


def test_clustered_ids_stay_roaring() -> None:
    """Members per 2^16 range decide too: 1 in 16 is smaller as Elias-Fano, but stays roaring
    (deltas in place); a compact segment may grow to twice the limit before it turns."""
    forms = Forms(FormPolicy(min_members=0, max_per_container=100))
    one_in_16 = BitMap64(range(0, 2**20, 16))  # 4,096 a range
    containers, payload, size = native.shape(one_in_16.to_array())
    assert size < 0.5 * roaring_bytes(containers, payload)
    assert not is_compact(forms.settle(one_in_16, 1))
    sparse = BitMap64(range(0, 2**24, 2**16 // 90))  # 91 a range: compact
    assert is_compact(seg := forms.settle(sparse, 1))
    denser = BitMap64(range(5, 2**24, 2**16 // 60))  # with these, 151 a range: still compact
    assert is_compact(grown := forms.apply(seg, denser, BitMap64(), 2))
    assert not is_compact(forms.settle(to_bitmap(grown), 2))  # but not from roaring
    assert not is_compact(forms.apply(grown, one_in_16, BitMap64(), 3))  # over 200: roaring


def test_checkpoint_keeps_the_compact_form(tmp_path: Path) -> None:
    engine = Engine(forms=Forms(SMALL))
    sparse = BitMap64(spread(3000))
    dense = BitMap64(range(100, 50_000))
    engine.install("sparse", SegmentState(sparse, 4, len(sparse), 10))
    engine.install("dense", SegmentState(dense, 2, len(dense), 20))
    assert is_compact(engine.segments["sparse"].bitmap)
    ckpt = checkpoint.Checkpoint("log-1", 1, {0: 7}, dict(engine.segments), {"old": 3})
    checkpoint.save(tmp_path, ckpt)
    back = checkpoint.read(tmp_path)
    assert back is not None and back.offsets == {0: 7} and back.dropped == {"old": 3}
    got = back.segments
    assert is_compact(got["sparse"].bitmap) and not is_compact(got["dense"].bitmap)
    assert to_bitmap(got["sparse"].bitmap) == sparse and got["dense"].bitmap == dense
    assert (got["sparse"].version, got["sparse"].cardinality) == (4, 3000)


# -- a replica answering expressions and restarting with compact segments --------------------


def test_replica_expressions_and_restart_over_compact_segments(tmp_path: Path) -> None:
    from sidecar.transport import LogDirTransport
    from tests.logtools import publish_raw, started_replica

    sparse = BitMap64(spread(6000))
    wide = BitMap64(list(sparse)[::2]) | BitMap64(spread(3000, salt=10**7))
    dense = BitMap64(range(1000, 60_000)) | BitMap64(list(sparse)[:100])
    segments = {"sparse": sparse, "wide": wide, "dense": dense}
    log = LogDirTransport(tmp_path / "log")
    state = publish_raw(log, segments)
    exprs = [
        "sparse",
        "sparse & wide",
        "sparse | dense",
        "wide & !sparse",
        "(sparse | wide) & !dense",
    ]
    users = list(sparse)[:500] + list(wide)[-500:] + list(range(990, 1100)) + [0, HIGH]

    def _eval(expr: str) -> BitMap64:
        a, b, c = sparse, wide, dense
        return {
            "sparse": a,
            "sparse & wide": a & b,
            "sparse | dense": a | c,
            "wide & !sparse": b - a,
            "(sparse | wide) & !dense": (a | b) - c,
        }[expr]

    def check(replica) -> None:  # type: ignore[no-untyped-def]
        held = replica.engine.segments
        assert is_compact(held["sparse"].bitmap) and is_compact(held["wide"].bitmap)
        assert not is_compact(held["dense"].bitmap)
        for expr in exprs:
            want = _eval(expr)
            assert replica.count(expr).count == len(want), expr
            assert replica.audience(expr).members == want, expr
            for u in users[::7]:
                assert replica.eval(u, expr) is (u in want), (expr, u)
            leaves = view.local_many(replica, compile_expr(expr), users)
            assert leaves.answers == bytes(u in want for u in users), expr
        # a segment not held: the three-valued path restricts the compact ones to the users
        leaves = view.local_many(replica, compile_expr("(sparse | wide) & !absent"), users)
        assert leaves.answers is None and leaves.members == BitMap64()
        assert leaves.unknown == (sparse | wide) & BitMap64(users)
        for name, members in segments.items():
            for u in users:
                assert replica.contains(u, name) is (u in members)

    state_dir = tmp_path / "state"
    with started_replica(log, save=True, poll_interval=0.01, state_dir=state_dir) as replica:
        assert replica.wait_ready(20), replica.status()
        check(replica)
        # a change lands on a compact segment: rebuilt, still compact
        sparse -= BitMap64(list(sparse)[:50])
        segments["sparse"] = sparse
        publish_raw(log, segments, state)
        deadline = time.monotonic() + 20
        while replica.engine.segments["sparse"].version < 2:
            assert time.monotonic() < deadline, replica.status()
            time.sleep(0.01)
        check(replica)
    saved = checkpoint.read(state_dir)
    assert saved is not None and is_compact(saved.segments["sparse"].bitmap)
    with started_replica(log, poll_interval=0.01, state_dir=state_dir) as again:
        assert again.wait_ready(20), again.status()
        check(again)


def test_ttl_expiry_removes_members_from_a_compact_segment() -> None:
    """Membership TTL drops expired members through the engine's change path: a compact
    segment is rebuilt without them, and a delta after that still applies."""
    engine = Engine(forms=Forms(SMALL), clock_ms=lambda: 0)
    first, second = BitMap64(spread(3000)), BitMap64(spread(2000, salt=10**6))
    engine.apply_delta(Delta("t", 0, 1, first, BitMap64(), 3000, 1_000, expires_at=10_000))
    engine.apply_delta(Delta("t", 1, 2, second, BitMap64(), 5000, 2_000, expires_at=20_000))
    assert is_compact(engine.segments["t"].bitmap)
    assert engine.expire(15_000) == ["t"]
    state = engine.segments["t"]
    assert is_compact(state.bitmap) and to_bitmap(state.bitmap) == second
    assert (state.version, state.cardinality) == (2, 2000)
    assert all(x not in state.bitmap for x in list(first)[:200])
    engine.apply_delta(Delta("t", 2, 3, BitMap64(), BitMap64(list(second)[:10]), 1990, 16_000))
    state = engine.segments["t"]
    assert state.fresh and to_bitmap(state.bitmap) == second - BitMap64(list(second)[:10])


def test_a_sparse_snapshot_in_chunks_is_assembled_compact(tmp_path: Path) -> None:
    """A snapshot of ids spread over 2**64 comes in several chunks: each is kept as its ids
    (never one huge BitMap64) and the whole is compact; a dense one stays roaring."""
    from publisher import Publisher
    from sidecar.record import SnapshotChunk
    from sidecar.transport import LogDirTransport
    from tests.logtools import started_replica
    from tests.test_large_segments import _records

    big, dense = BitMap64(spread(150_000)), BitMap64(range(0, 3_000_000))
    log = LogDirTransport(tmp_path / "log")
    Publisher(log, partitions=2).publish({"big": big, "dense": dense})
    chunks = [r for r in _records(log) if isinstance(r, SnapshotChunk) and r.segment == "big"]
    assert len(chunks) > 1
    with started_replica(log, poll_interval=0.01) as replica:
        assert replica.wait_ready(30), replica.status()
        got = replica.engine.segments
        assert is_compact(got["big"].bitmap) and to_bitmap(got["big"].bitmap) == big
        assert type(got["dense"].bitmap) is BitMap64 and got["dense"].bitmap == dense


def test_assemble_takes_chunks_out_of_order_and_small_ones() -> None:
    forms = Forms(SMALL)
    ids = BitMap64(spread(1000))
    low, high = BitMap64(list(ids)[:500]), BitMap64(list(ids)[500:])
    parts = [forms.part(high), forms.part(low)]  # out of order: not ascending when joined
    assert all(type(p) is array for p in parts)
    whole = forms.assemble(parts, 3)
    assert type(whole) is BitMap64 and whole == ids
    ordered = forms.assemble([forms.part(low), forms.part(high)], 3)
    assert is_compact(ordered) and ordered.version == 3 and to_bitmap(ordered) == ids
    runs = BitMap64(range(10_000))
    assert forms.part(runs) is runs  # roaring-shaped chunks stay bitmaps
    mixed = forms.assemble([forms.part(runs), forms.part(BitMap64([2**60]))], 1)
    assert mixed == runs | BitMap64([2**60])
    assert forms.assemble([forms.part(BitMap64([5, 2**40]))], 1) == BitMap64([5, 2**40])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    clusters=st.lists(
        st.tuples(st.integers(0, HIGH - 50_000), st.integers(1, 5000), st.integers(1, 9)),
        min_size=1,
        max_size=4,
    ),
    scattered=st.sets(st.integers(0, HIGH), max_size=300),
)
def test_elias_fano_with_clusters_in_one_bucket(
    clusters: list[tuple[int, int, int]], scattered: set[int]
) -> None:
    """Clusters far apart put thousands of ids in one Elias-Fano bucket (searched by
    bisection): members, their neighbours and the scattered ids answer as the set."""
    ids = scattered | {a + i * step for a, n, step in clusters for i in range(n)}
    ids = {x for x in ids if x <= HIGH}
    seg = native.Segment.frombytes(native.encode(array("Q", sorted(ids)), 1))
    probes = [x + d for x in list(ids)[:2000] for d in (-1, 0, 1) if 0 <= x + d <= HIGH]
    for x in probes + [0, HIGH]:
        assert (x in seg) == (x in ids), (seg.kind, x)
    assert list(seg) == sorted(ids)


def test_a_damaged_elias_fano_file_is_refused(tmp_path: Path) -> None:
    data = native.encode(array("Q", sorted(spread(5000))), 1)
    assert native.Segment.frombytes(data).kind == native.KIND_ELIAS_FANO
    with pytest.raises(ValueError, match="sizes"):
        native.Segment.frombytes(data[:-8])  # a sample short
    flipped = bytearray(data)
    low_words = -(-5000 * int.from_bytes(data[32:40], "little") // 64)
    flipped[64 + 8 * low_words] ^= 0x10  # one bit of the upper bitvector
    with pytest.raises(ValueError, match="sizes"):
        native.Segment.frombytes(bytes(flipped))
    (tmp_path / "x.seg").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="sizes"):
        native.Segment(str(tmp_path / "x.seg"))
