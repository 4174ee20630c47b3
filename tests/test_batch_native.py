"""`batch_packed`'s one C call (`_native.lookup`, reached through `forms.batch_lookup`) against
the truth, a Python set per segment: every form a segment can be held in (roaring, and the
compact form's three kinds), segments in every state (fresh, stale, diverged, past their max
age, dropped, unknown, not held, a replica not ready), with and without a fallback that
answers for some users and not others. The Python pass (`_batch_packed_python`, used without
the C extension) must answer the same."""

from __future__ import annotations

import asyncio
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64, FrozenBitMap64

from sidecar.fallback.base import Fallback
from sidecar.ids import BadRequest
from sidecar.packed import UNKNOWN, pack_batch
from sidecar.replica import Replica
from sidecar.replica.state import Health, SegmentState
from sidecar.server.queries import Queries
from sidecar.server.results import AEROSPIKE, LOCAL, NONE, settle
from sidecar.transport.logdir import LogDirTransport
from tests.test_shared_replica import native

HIGH = 2**64 - 1
#: what a segment is, as the replica sees it; "out" segments are outside a partial replica's
#: --segments (not held)
STATES = ("fresh", "stale", "diverged", "aged", "dropped", "unknown", "out")


def spread(n: int, salt: int) -> set[int]:
    return {((i + salt) * 0x9E3779B97F4A7C15) % 2**64 for i in range(n)}


#: member sets of every shape: the compact form's kinds are Elias-Fano (spread over 2^64),
#: containers (dense), sorted ids (a few)
SHAPES = st.one_of(
    st.builds(spread, st.integers(0, 3000), st.integers(0, 10**6)),
    st.tuples(st.integers(0, HIGH - 80_000), st.integers(0, 70_000)).map(
        lambda t: set(range(t[0], t[0] + t[1]))
    ),
    st.sets(st.integers(0, HIGH), max_size=50),
    st.sets(st.integers(0, 2**32), max_size=300),
)


class MapFallback(Fallback):
    """Answers a user's map from a dict; None (cannot answer) for users not in it."""

    name = "maps"

    def __init__(self, maps: dict[int, dict[str, int]]) -> None:
        self.maps = maps
        self.calls: list[int] = []

    async def segments_of(self, user: int) -> dict[str, int] | None:
        self.calls.append(user)
        found = self.maps.get(user)
        return dict(found) if found is not None else None


def _form(members: set[int], compact: bool) -> Any:
    ids = array("Q", sorted(members))
    if compact:
        return native.Segment.frombytes(native.encode(ids, 1))
    return BitMap64(ids)


def _replica(tmp: Any, segments: dict[str, tuple[str, set[int], bool]], ready: bool) -> Replica:
    """A replica (not started) holding `segments`: name -> (state, members, compact)."""
    replica = Replica(LogDirTransport(tmp / "log"), segments=["s*"])
    engine = replica.engine
    for name, (state, members, compact) in segments.items():
        if state in ("unknown", "out"):
            continue
        if state == "dropped":
            engine.dropped[name] = 3
            continue
        health = {"stale": Health.STALE, "diverged": Health.DIVERGED}.get(state, Health.FRESH)
        # set directly: install() would choose the form itself
        engine.segments[name] = SegmentState(_form(members, compact), 2, len(members), 0, health)
        if state == "aged":
            replica.aged.add(name)
    replica.ready = ready
    return replica


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    n_segments = draw(st.integers(1, 6))
    segments: dict[str, tuple[str, set[int], bool]] = {}
    for i in range(n_segments):
        state = draw(st.sampled_from(STATES))
        name = f"out{i}" if state == "out" else f"s{i}"
        segments[name] = (state, draw(SHAPES), draw(st.booleans()))
    names = sorted(segments)
    items: list[tuple[int, str]] = []
    for _ in range(draw(st.integers(0, 120))):
        seg = draw(st.sampled_from(names))
        members = sorted(segments[seg][1])
        if members and draw(st.booleans()):
            user = members[draw(st.integers(0, len(members) - 1))]
        else:
            user = draw(st.one_of(st.integers(0, HIGH), st.sampled_from([0, 1, HIGH, 2**32])))
        items.append((user, seg))
    users = sorted({u for u, _ in items})
    maps: dict[int, dict[str, int]] | None = None
    if draw(st.booleans()):  # a fallback, answering for some users
        maps = {}
        for u in users:
            if draw(st.booleans()):
                maps[u] = {s: 1 for s in names if draw(st.booleans())}
    return {
        "segments": segments,
        "ready": draw(st.booleans()),
        "items": items,
        "one": draw(st.booleans()),  # the same checks as one request per segment
        "maps": maps,
    }


def expected(case: dict[str, Any], items: list[tuple[int, str]]) -> tuple[bytes, str, set[int]]:
    """(answers, source, users the fallback is asked about), from the model."""
    out = bytearray()
    asked: set[int] = set()
    source = LOCAL
    maps = case["maps"]
    for user, seg in items:
        state, members, _ = case["segments"][seg]
        if case["ready"] and state == "fresh":
            out.append(user in members)
            continue
        if maps is None:
            out.append(UNKNOWN)
            source = NONE
            continue
        asked.add(user)
        found = maps.get(user)
        if found is None:
            out.append(UNKNOWN)
            source = NONE
        else:
            out.append(seg in found)
            if source == LOCAL:
                source = AEROSPIKE
    return bytes(out), source, asked


def answer(q: Queries, items: list[tuple[int, str]], one: str | None) -> tuple[bytes, str]:
    if one is not None:
        args = pack_batch([u for u, _ in items], one)
    else:
        args = pack_batch([u for u, _ in items], [s for _, s in items])
    return asyncio.run(settle(q.batch_packed(*args)))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
def test_native_batch_answers_as_the_model(tmp_path_factory: Any, case: dict[str, Any]) -> None:
    replica = _replica(tmp_path_factory.mktemp("b"), case["segments"], case["ready"])
    requests: list[tuple[list[tuple[int, str]], str | None]] = [(case["items"], None)]
    if case["one"]:
        requests = [([it for it in case["items"] if it[1] == seg], seg) for seg in case["segments"]]
    for items, one in requests:
        want, source, asked = expected(case, items)
        for native_path in (True, False):
            fb = MapFallback(case["maps"]) if case["maps"] is not None else None
            q = Queries(replica, fb)
            assert (q._lookup is not None) is True
            if not native_path:
                q._lookup = None
            got, got_source = answer(q, items, one)
            assert type(got) is bytes
            assert (got, got_source) == (want, source if items else LOCAL), native_path
            if fb is not None:  # one call per user that needed it, none for local answers
                assert sorted(fb.calls) == sorted(asked)


def test_lookup_takes_every_kind_of_member() -> None:
    """Segments and BitMap64s are searched in C; None is the unknown byte; anything else
    (a set, a FrozenBitMap64) is asked through `in`."""
    a = spread(5000, 1)
    dense = set(range(2**40, 2**40 + 70_000))
    members = [
        _form(a, True),
        _form(dense, True),
        _form({5, HIGH}, True),
        BitMap64(a),
        None,
        {7, 9},
        FrozenBitMap64(dense),
    ]
    kinds = {m.kind for m in members[:3]}
    assert kinds == {native.KIND_ELIAS_FANO, native.KIND_CONTAINERS, native.KIND_SORTED}
    truth = [a, dense, {5, HIGH}, a, None, {7, 9}, dense]
    probes = [*sorted(a)[:50], *sorted(dense)[::5000], 5, 7, 9, HIGH, 0, 2**40 - 1, 2**40 + 70_000]
    users, index = [], []
    for j in range(len(members)):
        for u in probes:
            users.append(u)
            index.append(j)
    got = native.lookup(members, array("Q", users).tobytes(), array("H", index).tobytes(), 2)
    want = bytes(
        2 if truth[j] is None else u in truth[j] for u, j in zip(users, index, strict=True)
    )
    assert got == want
    assert native.roaring_native()  # this pyroaring's BitMap64 is searched in C
    one = native.lookup([members[0]], array("Q", probes).tobytes(), b"", 2)
    assert one == bytes(u in a for u in probes)


def test_lookup_refuses_what_does_not_fit() -> None:
    users = array("Q", [1, 2]).tobytes()
    with pytest.raises(IndexError):
        native.lookup([BitMap64([1])], users, array("H", [0, 1]).tobytes(), 2)
    with pytest.raises(ValueError, match="do not agree"):
        native.lookup([BitMap64([1])], users, b"\x00\x00", 2)
    with pytest.raises(ValueError, match="do not agree"):
        native.lookup([], users, b"", 2)
    with pytest.raises(TypeError):
        native.lookup([5], users, b"", 2)  # `1 in 5`
    assert native.lookup([], b"", b"", 2) == b""


def test_a_bad_index_is_still_reported_first(tmp_path: Any) -> None:
    """Validation order is as before the C call: an index past the segments is named even
    when a segment id is bad too, and a bad id alone says which."""
    q = Queries(_replica(tmp_path, {"s0": ("fresh", {1}, False)}, True))
    users = array("Q", [1]).tobytes()
    with pytest.raises(BadRequest, match="refers to segment 3"):
        q.batch_packed(["bad id!"], users, b"\x03\x00")
    with pytest.raises(BadRequest, match="refers to segment 1"):
        q.batch_packed(["s0"], users, b"\x01\x00")
    with pytest.raises(BadRequest, match=r"segments\[0\]"):
        q.batch_packed(["bad id!"], users, b"")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sets(st.integers(0, 2**34), max_size=40), min_size=2, max_size=5),
    st.lists(st.tuples(st.integers(0, 2**34), st.integers(0, 4)), max_size=200),
)
def test_grouped_lookups_answer_in_request_order(
    sets: list[set[int]], items: list[tuple[int, int]]
) -> None:
    """`lookup` runs a batch's items grouped by segment: the answers still land at the items'
    own places, members taken from the sets or not, and an index past the segments (here
    any position >= len(sets)) is an IndexError, whatever the order."""
    members: list[Any] = [BitMap64(s) if i % 2 else _form(s, True) for i, s in enumerate(sets)]
    users = array("Q", [u for u, _ in items]).tobytes()
    index = array("H", [j for _, j in items]).tobytes()
    if any(j >= len(sets) for _, j in items):
        with pytest.raises(IndexError):
            native.lookup(members, users, index, UNKNOWN)
        return
    assert native.lookup(members, users, index, UNKNOWN) == bytes([u in sets[j] for u, j in items])


def test_a_bad_index_is_reported_with_many_segments(tmp_path: Any) -> None:
    segs = {"s0": ("fresh", {1}, False), "s1": ("fresh", {2}, True)}
    q = Queries(_replica(tmp_path, segs, True))
    users = array("Q", [1, 2, 3]).tobytes()
    with pytest.raises(BadRequest, match="refers to segment 2"):
        q.batch_packed(["s0", "s1"], users, array("H", [0, 1, 2]).tobytes())
    got = q.batch_packed(["s0", "s1"], users, array("H", [0, 1, 1]).tobytes())
    assert got == (b"\x01\x01\x00", LOCAL)
