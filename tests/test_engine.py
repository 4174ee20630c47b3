"""The replica engine's version rules (sidecar/replica/engine.py, DESIGN.md "Replica
semantics"), fed LogRecords directly: no transport, no threads."""

from __future__ import annotations

import msgpack
import pytest
from pyroaring import BitMap64

from publisher.plan import SnapshotInfo, SnapshotPacing
from sidecar.record import Delta, Drop, SnapshotChunk, encode
from sidecar.replica import Engine, Health, SegmentState, segment_filter
from sidecar.replica.recovery import Snapshot, install
from sidecar.transport.base import LogRecord


class Feed:
    """Hands an engine deltas-topic records with increasing offsets."""

    def __init__(self, engine: Engine, partition: int = 0) -> None:
        self.engine = engine
        self.partition = partition
        self.offset = 0

    def raw(self, value: bytes | None, key: bytes | None = b"k") -> int:
        offset = self.offset
        self.engine.apply_record(LogRecord("deltas", self.partition, offset, key, value))
        self.offset += 1
        return offset

    def delta(
        self,
        segment: str,
        base: int,
        version: int,
        add: list[int] | BitMap64 = (),  # type: ignore[assignment]
        remove: list[int] | BitMap64 = (),  # type: ignore[assignment]
        cardinality: int | None = None,
        *,
        part: int = 0,
        parts: int = 1,
        ts: int = 1000,
    ) -> int:
        add_bm, remove_bm = BitMap64(add), BitMap64(remove)
        if cardinality is None:  # what a correct publisher would say
            current = self.engine.segments.get(segment)
            after = (current.bitmap if current else BitMap64()) | add_bm
            cardinality = len(after - remove_bm)
        rec = Delta(segment, base, version, add_bm, remove_bm, cardinality, ts, part, parts)
        return self.raw(encode(rec), segment.encode())

    def drop(self, segment: str, base: int, version: int) -> int:
        return self.raw(encode(Drop(segment, base, version, 1)), segment.encode())


@pytest.fixture
def engine() -> Engine:
    return Engine()


@pytest.fixture
def feed(engine: Engine) -> Feed:
    return Feed(engine)


def _state(engine: Engine, segment: str) -> tuple[list[int], int, int, Health]:
    s = engine.segments[segment]
    return list(s.bitmap), s.version, s.cardinality, s.health


# -- applying in order ------------------------------------------------------------------------


def test_first_delta_creates_the_segment(engine: Engine, feed: Feed) -> None:
    feed.delta("vip", 0, 1, [1, 2, 3], ts=42)
    assert _state(engine, "vip") == ([1, 2, 3], 1, 3, Health.FRESH)
    assert engine.segments["vip"].updated_ms == 42
    assert engine.version_of("vip") == 1
    assert engine.counters.applied == 1
    assert not engine.needs_resync


def test_apply_when_base_equals_the_local_version(engine: Engine, feed: Feed) -> None:
    feed.delta("vip", 0, 1, [1, 2, 3])
    feed.delta("vip", 1, 2, [10, 2**64 - 1], [2])
    feed.delta("vip", 2, 3, [], [1])
    assert _state(engine, "vip") == ([3, 10, 2**64 - 1], 3, 3, Health.FRESH)
    assert engine.counters.applied == 3
    assert engine.memberships() == 3


def test_an_empty_segment_is_a_segment(engine: Engine, feed: Feed) -> None:
    feed.delta("empty", 0, 1)
    assert _state(engine, "empty") == ([], 1, 0, Health.FRESH)
    feed.delta("empty", 1, 2, [5])
    assert _state(engine, "empty") == ([5], 2, 1, Health.FRESH)


def test_the_applied_bitmap_is_not_shared_with_the_record(engine: Engine) -> None:
    add = BitMap64([1, 2])
    engine.apply_delta(Delta("s", 0, 1, add, BitMap64(), 2, 0))
    add.add(3)
    assert list(engine.segments["s"].bitmap) == [1, 2]


def test_deltas_change_the_bitmap_in_place_and_the_state_whole(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1, 5])
    before = engine.segments["s"]
    feed.delta("s", 1, 2, [2], [5])
    after = engine.segments["s"]
    # no copy of the segment per delta: the same bitmap, changed; a new state object
    assert after.bitmap is before.bitmap and list(after.bitmap) == [1, 2]
    assert (before.version, before.cardinality) == (1, 2)
    assert (after.version, after.cardinality) == (2, 2)
    feed.delta("s", 1, 2, [9])  # a duplicate changes nothing
    feed.delta("s", 5, 6, [9])  # neither does a gap
    assert list(engine.segments["s"].bitmap) == [1, 2]


# -- duplicates -------------------------------------------------------------------------------


def test_duplicates_are_skipped(engine: Engine, feed: Feed) -> None:
    feed.delta("vip", 0, 1, [1, 2])
    feed.delta("vip", 1, 2, [3], [1])
    before = _state(engine, "vip")
    feed.delta("vip", 1, 2, [3], [1])  # the same change again
    feed.delta("vip", 0, 1, [1, 2], cardinality=2)  # an older one
    feed.delta("vip", 1, 2, [99], cardinality=7)  # a same-version record with other content
    assert _state(engine, "vip") == before
    assert engine.counters.duplicates == 3
    assert engine.counters.applied == 2
    assert engine.counters.gaps == 0
    assert not engine.needs_resync


# -- gaps ---------------------------------------------------------------------------------------


def test_gap_marks_stale_and_needs_resync(engine: Engine, feed: Feed) -> None:
    feed.delta("vip", 0, 1, [1, 2])
    feed.delta("vip", 2, 3, [5])  # version 2 is missing
    assert _state(engine, "vip") == ([1, 2], 1, 2, Health.STALE)
    assert engine.needs_resync == {"vip"}
    assert engine.counters.gaps == 1
    # while stale, even the "right" next record is not applied: only a resync heals
    feed.delta("vip", 1, 2, [3])
    assert _state(engine, "vip") == ([1, 2], 1, 2, Health.STALE)
    assert engine.counters.gaps == 2
    assert engine.counters.applied == 1
    # a resync installs a whole state: fresh again, and deltas apply on it
    engine.needs_resync.clear()
    engine.install("vip", SegmentState(BitMap64([1, 2, 3, 5]), 3, 4, 0))
    feed.delta("vip", 3, 4, [], [5])
    assert _state(engine, "vip") == ([1, 2, 3], 4, 3, Health.FRESH)


def test_gap_on_an_unknown_segment(engine: Engine, feed: Feed) -> None:
    feed.delta("new", 4, 5, [1])
    assert "new" not in engine.segments
    assert engine.needs_resync == {"new"}
    assert engine.counters.gaps == 1
    assert engine.version_of("new") == 0


def test_base_behind_with_a_newer_version_is_a_gap(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1])
    feed.delta("s", 1, 2, [2])
    feed.delta("s", 1, 3, [3])  # claims to go from 1 to 3
    assert engine.segments["s"].health is Health.STALE
    assert engine.segments["s"].version == 2


def test_other_segments_are_untouched_by_a_gap(engine: Engine, feed: Feed) -> None:
    feed.delta("a", 0, 1, [1])
    feed.delta("b", 0, 1, [2])
    feed.delta("a", 5, 6, [1])
    feed.delta("b", 1, 2, [3])
    assert engine.segments["a"].health is Health.STALE
    assert _state(engine, "b") == ([2, 3], 2, 2, Health.FRESH)
    assert engine.needs_resync == {"a"}


# -- divergence -----------------------------------------------------------------------------------


def test_cardinality_mismatch_marks_diverged(engine: Engine, feed: Feed) -> None:
    feed.delta("vip", 0, 1, [1, 2])
    feed.delta("vip", 1, 2, [3], cardinality=10)
    state = engine.segments["vip"]
    assert state.health is Health.DIVERGED
    assert not state.fresh
    assert state.version == 2
    assert engine.needs_resync == {"vip"}
    assert engine.counters.diverged == 1
    # a diverged segment takes no more deltas until a resync
    feed.delta("vip", 2, 3, [4])
    assert engine.segments["vip"].version == 2
    assert engine.segments["vip"].health is not Health.FRESH


def test_diverged_first_delta(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1, 2], cardinality=3)
    assert engine.segments["s"].health is Health.DIVERGED
    assert engine.needs_resync == {"s"}


# -- drops ----------------------------------------------------------------------------------------


def test_drop_then_republish_continues_the_version(engine: Engine, feed: Feed) -> None:
    feed.delta("vip", 0, 1, [1, 2])
    feed.delta("vip", 1, 2, [3])
    feed.drop("vip", 2, 3)
    assert "vip" not in engine.segments
    assert engine.dropped == {"vip": 3}
    assert engine.version_of("vip") == 3
    assert engine.counters.drops == 1
    assert engine.memberships() == 0
    feed.drop("vip", 2, 3)  # a duplicate drop
    assert engine.counters.duplicates == 1
    feed.delta("vip", 0, 1, [7])  # a stale first version: a duplicate, not a resurrection
    assert "vip" not in engine.segments
    feed.delta("vip", 3, 4, [9])  # republish: starts from nothing, version continues
    assert _state(engine, "vip") == ([9], 4, 1, Health.FRESH)
    assert "vip" not in engine.dropped
    feed.drop("vip", 4, 5)
    feed.delta("vip", 5, 6, [])
    assert _state(engine, "vip") == ([], 6, 0, Health.FRESH)


def test_drop_with_a_gap_marks_stale(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1])
    feed.drop("s", 3, 4)
    assert engine.segments["s"].health is Health.STALE
    assert engine.needs_resync == {"s"}
    assert "s" not in engine.dropped


def test_drop_of_a_never_seen_segment(engine: Engine, feed: Feed) -> None:
    feed.drop("ghost", 0, 1)
    assert engine.dropped == {"ghost": 1}
    assert "ghost" not in engine.segments


def test_republish_after_drop_with_a_wrong_base_is_a_gap(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1])
    feed.drop("s", 1, 2)
    feed.delta("s", 0, 1, [5])  # duplicate
    feed.delta("s", 1, 3, [5])  # base before the drop: a gap
    assert "s" not in engine.segments
    assert engine.needs_resync == {"s"}
    assert engine.counters.gaps == 1


# -- split deltas ---------------------------------------------------------------------------------


def _split(
    segment: str, base: int, target: BitMap64, old: BitMap64, parts: int
) -> list[tuple[BitMap64, BitMap64]]:
    """add/remove of the change old -> target cut into `parts` id ranges."""
    add, remove = target - old, old - target
    cuts = [0, *[(2**64 // parts) * i for i in range(1, parts)], 2**64]
    out = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        out.append(
            (
                BitMap64(x for x in add if lo <= x < hi),
                BitMap64(x for x in remove if lo <= x < hi),
            )
        )
    return out


def test_split_delta_applies_only_with_all_parts(engine: Engine, feed: Feed) -> None:
    feed.delta("big", 0, 1, [1, 2**63 + 1])
    target = BitMap64([5, 2**62 + 7, 2**63 + 9, 2**64 - 1])
    pieces = _split("big", 1, target, BitMap64([1, 2**63 + 1]), 3)
    for i in (2, 0):  # out of order
        feed.delta("big", 1, 2, pieces[i][0], pieces[i][1], len(target), part=i, parts=3)
        assert _state(engine, "big") == ([1, 2**63 + 1], 1, 2, Health.FRESH)
        assert engine.counters.applied == 1
    first_part_offset = feed.offset - 2
    assert engine.pending_offset(lambda _s: 0, 0) == first_part_offset
    assert engine.pending_offset(lambda _s: 1, 0) is None
    feed.delta("big", 1, 2, pieces[1][0], pieces[1][1], len(target), part=1, parts=3, ts=7)
    assert _state(engine, "big") == (list(target), 2, 4, Health.FRESH)
    assert engine.counters.applied == 2
    assert engine.pending_offset(lambda _s: 0, 0) is None


def test_split_parts_interleaved_with_other_segments(engine: Engine, feed: Feed) -> None:
    feed.delta("a", 0, 1, [1])
    feed.delta("c", 0, 1, [100])
    a_pieces = _split("a", 1, BitMap64([2, 2**63]), BitMap64([1]), 2)
    c_pieces = _split("c", 1, BitMap64([100, 101, 2**64 - 2]), BitMap64([100]), 2)
    feed.delta("a", 1, 2, *a_pieces[0], 2, part=0, parts=2)
    feed.delta("b", 0, 1, [50])
    feed.delta("c", 1, 2, *c_pieces[0], 3, part=0, parts=2)
    assert engine.segments["a"].version == 1
    assert engine.segments["c"].version == 1
    assert _state(engine, "b") == ([50], 1, 1, Health.FRESH)
    feed.delta("a", 1, 2, *a_pieces[1], 2, part=1, parts=2)
    assert _state(engine, "a") == ([2, 2**63], 2, 2, Health.FRESH)
    assert engine.segments["c"].version == 1
    feed.delta("b", 1, 2, [51])
    feed.delta("c", 1, 2, *c_pieces[1], 3, part=1, parts=2)
    assert _state(engine, "c") == ([100, 101, 2**64 - 2], 2, 3, Health.FRESH)
    assert _state(engine, "b") == ([50, 51], 2, 2, Health.FRESH)
    assert engine.counters.gaps == engine.counters.diverged == 0


def test_split_delta_replayed_is_skipped_part_by_part(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1], [], 2, part=0, parts=2)
    feed.delta("s", 0, 1, [2**63], [], 2, part=1, parts=2)
    assert _state(engine, "s") == ([1, 2**63], 1, 2, Health.FRESH)
    # each part of a version already applied is a duplicate record at once, not assembled
    feed.delta("s", 0, 1, [1], [], 2, part=0, parts=2)
    assert engine.counters.duplicates == 1
    feed.delta("s", 0, 1, [2**63], [], 2, part=1, parts=2)
    assert engine.counters.duplicates == 2
    assert _state(engine, "s") == ([1, 2**63], 1, 2, Health.FRESH)
    assert not engine.pending_offset(lambda _s: 0, 0)  # nothing left half-assembled


def test_split_delta_cardinality_is_checked_on_the_whole_change(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1], [], 3, part=0, parts=2)  # 3 would be wrong for part 0 alone
    feed.delta("s", 0, 1, [2**63, 2**63 + 1], [], 3, part=1, parts=2)
    assert _state(engine, "s") == ([1, 2**63, 2**63 + 1], 1, 3, Health.FRESH)
    feed.delta("s", 1, 2, [5], [], 99, part=0, parts=2)
    feed.delta("s", 1, 2, [], [], 99, part=1, parts=2)
    assert engine.segments["s"].health is Health.DIVERGED


def test_incomplete_split_then_next_version_is_a_gap(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1])
    feed.delta("s", 1, 2, [2], [], 2, part=0, parts=2)  # part 1 never comes
    feed.delta("s", 2, 3, [3], [], 3)
    assert engine.segments["s"].health is Health.STALE
    assert engine.segments["s"].version == 1
    assert engine.needs_resync == {"s"}


def test_split_parts_disagreeing_on_count_are_corrupt(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1], [], 2, part=0, parts=2)
    feed.delta("s", 0, 1, [2**63], [], 2, part=1, parts=3)
    assert "s" not in engine.segments
    assert engine.counters.corrupt == 1


def test_install_drops_a_pending_split(engine: Engine, feed: Feed) -> None:
    feed.delta("s", 0, 1, [1], [], 2, part=0, parts=2)
    engine.install("s", SegmentState(BitMap64([9]), 1, 1, 0))
    assert engine.pending_offset(lambda _s: 0, 0) is None
    feed.delta("s", 0, 1, [2**63], [], 2, part=1, parts=2)  # an orphan part: waits, harmless
    assert _state(engine, "s") == ([9], 1, 1, Health.FRESH)


# -- unknown / corrupt / tombstones ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value,counter",
    [
        (b"\xc1\xc1 not msgpack", "corrupt"),
        (msgpack.packb([1, 2, 3]), "corrupt"),
        (msgpack.packb({"format": 1, "kind": "delta", "segment": "vip"}), "corrupt"),
        (
            msgpack.packb(
                {
                    "format": 1,
                    "kind": "delta",
                    "segment": "vip",
                    "base": 1,
                    "version": 2,
                    "add": b"bad bitmap",
                    "remove": b"",
                    "cardinality": 0,
                    "ts": 0,
                }
            ),
            "corrupt",
        ),
        (msgpack.packb({"format": 2, "kind": "delta", "segment": "vip"}), "unknown"),
        (msgpack.packb({"format": 1, "kind": "rename", "segment": "vip"}), "unknown"),
        (encode(SnapshotChunk("vip", 9, 0, 1, BitMap64(), 0, 0, 0)), "unknown"),
    ],
)
def test_unknown_and_corrupt_are_counted_without_touching_state(
    engine: Engine, feed: Feed, value: bytes, counter: str
) -> None:
    feed.delta("vip", 0, 1, [1, 2])
    before = engine.segments["vip"]
    feed.raw(value)
    assert engine.segments["vip"] is before
    assert getattr(engine.counters, counter) == 1
    other = "unknown" if counter == "corrupt" else "corrupt"
    assert getattr(engine.counters, other) == 0
    assert not engine.needs_resync
    feed.delta("vip", 1, 2, [3])  # the next good record applies
    assert _state(engine, "vip") == ([1, 2, 3], 2, 3, Health.FRESH)


def test_tombstones_in_deltas_are_ignored(engine: Engine, feed: Feed) -> None:
    feed.raw(None)
    assert engine.counters == type(engine.counters)()
    assert not engine.segments


# -- --segments filter ----------------------------------------------------------------------------


def test_segment_filter_patterns() -> None:
    assert segment_filter(None)("anything")
    assert segment_filter([])("anything")
    assert segment_filter([" ", ""])("anything")
    holds = segment_filter(["vip*", " cart_abandoners_30m "])
    assert holds("vip")
    assert holds("vip_buyers")
    assert holds("cart_abandoners_30m")
    assert not holds("cart_abandoners_30m_x")
    assert not holds("VIP")  # case-sensitive, like segment ids
    assert not holds("x_vip")


def test_engine_holds_only_filtered_segments() -> None:
    engine = Engine(segment_filter(["vip*"]))
    feed = Feed(engine)
    feed.delta("vip_a", 0, 1, [1])
    feed.delta("other", 0, 1, [2])
    feed.delta("other", 5, 6, [2])  # a gap in a segment not held: no resync either
    feed.drop("other2", 0, 1)
    assert set(engine.segments) == {"vip_a"}
    assert engine.counters.ignored == 3
    assert engine.counters.gaps == 0
    assert not engine.needs_resync
    assert not engine.dropped


# -- what a writer's observer hears (the publisher's snapshot pacing) ----------------------------


def test_the_observer_hears_snapshots_and_applied_deltas() -> None:
    pacing = SnapshotPacing()
    engine = Engine(observer=pacing)
    feed = Feed(engine)
    install(engine, Snapshot("s", 3, SegmentState(BitMap64([1, 2]), 3, 2, 0), 0, chunks=2))
    assert pacing.info["s"] == SnapshotInfo(3, 2, 0)
    assert pacing.chunks("s") == 2
    feed.delta("s", 3, 4, [5, 6], [1])
    feed.delta("s", 3, 4, [5, 6], [1])  # duplicate: no churn
    assert pacing.info["s"].churn == 3
    install(engine, Snapshot("s", 5, None, 0))  # a drop marker
    assert pacing.info["s"] == SnapshotInfo(5, 1, 0)
    assert engine.version_of("s") == 5
