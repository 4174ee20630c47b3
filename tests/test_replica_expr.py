"""Segment expressions on the embedded replica (`Replica.eval / count / audience`,
sidecar/replica/view.py): answers equal the truth, segments not answered locally are refused
by name, and a count or an audience taken while publishes land is exactly the truth at the
versions it reports: never a mix of two versions of one segment."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from sidecar.expr import ExprError, compile_expr
from sidecar.ids import BadRequest
from sidecar.replica import NotLocal, Replica, view
from sidecar.transport import LogDirTransport
from tests.logtools import publish_gap, publish_raw

SEGMENTS = {
    "vip": BitMap64(range(0, 1000, 2)),
    "cart": BitMap64(range(0, 1000, 3)),
    "churned": BitMap64(range(0, 1000, 5)),
    "big": BitMap64(range(2**63, 2**63 + 100)),
}


def test_eval_count_audience_equal_the_truth(replica: Replica) -> None:
    text = "(vip | cart) & !churned"

    vip, cart, churned = SEGMENTS["vip"], SEGMENTS["cart"], SEGMENTS["churned"]
    want = {u for u in range(1000) if (u in vip or u in cart) and u not in churned}
    assert all(replica.eval(u, text) is (u in want) for u in range(1000))
    n, versions = replica.count(text)
    assert n == len(want)
    assert versions == {"vip": 1, "cart": 1, "churned": 1}
    members, versions2 = replica.audience(text)
    assert set(members) == want and versions2 == versions
    assert replica.count("big | vip").count == 600
    assert replica.count("vip").count == 500
    members.clear()  # the caller's copy
    assert replica.count(text).count == len(want)


def test_a_segment_not_held_is_unknown_to_eval_and_refused_by_count(replica: Replica) -> None:
    assert replica.eval(4, "vip & nosuch") is None  # vip true, nosuch unknown
    assert replica.eval(1, "vip & nosuch") is False  # false & unknown
    assert replica.eval(4, "vip | nosuch") is True
    assert replica.eval(4, "!nosuch") is None
    with pytest.raises(NotLocal) as info:
        replica.count("vip & !nosuch & other")
    assert info.value.segments == ["nosuch", "other"]
    assert info.value.reasons == {"nosuch": "unknown", "other": "unknown"}
    with pytest.raises(NotLocal, match="nosuch"):
        replica.audience("nosuch & vip")


def test_bad_expressions_are_bad_requests(replica: Replica) -> None:
    with pytest.raises(ExprError, match="position 0: the result is unbounded"):
        replica.count("!vip")  # refused before asking what is local
    with pytest.raises(ExprError, match="position 6"):
        replica.eval(1, "vip & )")
    with pytest.raises(BadRequest, match="user"):
        replica.eval(-1, "vip")
    with pytest.raises(BadRequest, match="expr must be a string"):
        replica.count(None)  # type: ignore[arg-type]


def test_stale_dropped_and_not_held_segments_are_named(workdir: Path) -> None:
    transport = LogDirTransport(workdir / "log")
    state = publish_raw(transport, {"a": BitMap64([1]), "b": BitMap64([1, 2]), "c": BitMap64()})
    publish_raw(transport, {}, state, drop=("c",))
    publish_gap(transport, "b", state)
    with Replica(transport, segments=["a", "b", "c"], poll_interval=0.01) as r:
        assert r.wait_ready(10)
        deadline = time.monotonic() + 10
        while r.state("b") is None or r.state("b").fresh:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(NotLocal) as info:
            r.count("a & b & c & d")
        assert info.value.reasons == {"b": "stale", "c": "dropped", "d": "not_held"}
        assert r.count("a").count == 1
        assert r.eval(1, "a & b") is None and r.eval(2, "a & b") is False


def test_not_ready_is_named(workdir: Path) -> None:
    transport = LogDirTransport(workdir / "log")
    publish_raw(transport, {"a": BitMap64([1])})
    r = Replica(transport)  # never started
    with pytest.raises(NotLocal, match=r"a \(not_ready\)"):
        r.count("a")
    assert r.eval(1, "a") is None


# -- publishes landing during counts and exports -----------------------------------------------
WIDTH = 60_000
STEP = 20_000


def members_at(segment: str, version: int) -> BitMap64:
    """What `segment` holds at `version`: a window sliding by STEP per version, so each
    delta both adds and removes STEP members (a half-applied one has a different count)."""
    offset = {"a": 0, "b": 7 * STEP // 3, "c": 5 * STEP}[segment]
    start = offset + version * STEP
    bm = BitMap64(range(start, start + WIDTH))
    if segment == "c":
        bm = BitMap64(range(start, start + WIDTH, 3))
    return bm


EXPRS = ["a & b", "a | b | c", "(a | c) & !b", "a & !b & !c", "a"]


def expected(text: str, versions: dict[str, int]) -> BitMap64:
    m = {s: members_at(s, v) for s, v in versions.items()}
    return {
        "a & b": lambda: m["a"] & m["b"],
        "a | b | c": lambda: m["a"] | m["b"] | m["c"],
        "(a | c) & !b": lambda: (m["a"] | m["c"]) - m["b"],
        "a & !b & !c": lambda: m["a"] - m["b"] - m["c"],
        "a": lambda: m["a"],
    }[text]()


@pytest.fixture
def switching_fast() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave as often as they can
    yield
    sys.setswitchinterval(old)


def test_counts_and_exports_see_one_version_of_each_segment(
    workdir: Path, switching_fast: None
) -> None:
    transport = LogDirTransport(workdir / "log")
    state = publish_raw(transport, {s: members_at(s, 1) for s in "abc"})
    stop = threading.Event()
    published = [1]

    def publisher() -> None:
        v = 1
        while not stop.is_set() and v < 400:
            v += 1
            # one segment at a time, so versions of different segments drift apart too
            for s in "abc":
                publish_raw(transport, {s: members_at(s, v)}, state)
            published[0] = v

    with Replica(transport, poll_interval=0.001) as r:
        assert r.wait_ready(10)
        thread = threading.Thread(target=publisher)
        thread.start()
        seen: set[tuple[int, ...]] = set()
        checked = 0
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(seen) < 60:
                for text in EXPRS:
                    n, versions = r.count(text)
                    assert n == len(expected(text, versions)), (text, versions)
                    members, versions = r.audience(text)
                    assert members == expected(text, versions), (text, versions)
                    seen.add(tuple(sorted(versions.values())))
                    checked += 2
        finally:
            stop.set()
            thread.join(30)
    assert published[0] > 2
    assert len(seen) > 5, f"publishes did not land during the counts ({checked} checked)"


def test_eval_sees_one_version_while_publishes_land(workdir: Path, switching_fast: None) -> None:
    """Users at the edges of the sliding window change with every version: each local answer
    must be the membership at the version reported with it."""
    transport = LogDirTransport(workdir / "log")
    state = publish_raw(transport, {"a": members_at("a", 1)})
    stop = threading.Event()
    expr = compile_expr("a & !b")  # b is never published: unknown, so a is always read

    def publisher() -> None:
        v = 1
        while not stop.is_set() and v < 300:
            v += 1
            publish_raw(transport, {"a": members_at("a", v)}, state)

    with Replica(transport, poll_interval=0.001) as r:
        assert r.wait_ready(10)
        thread = threading.Thread(target=publisher)
        thread.start()
        versions_seen = set()
        try:
            while thread.is_alive():
                v = r.state("a").version  # type: ignore[union-attr]
                for user in ((v + 1) * STEP, (v + 1) * STEP - 1, v * STEP + WIDTH):
                    leaves = view.local_answers(r, expr, user)
                    version = leaves.versions["a"]
                    assert leaves.values == [user in members_at("a", version), None]
                    assert leaves.missing == [1]
                    versions_seen.add(version)
        finally:
            stop.set()
            thread.join(30)
    assert len(versions_seen) > 5


def test_counts_over_compact_segments_run_on_sorted_ids(workdir: Path) -> None:
    """Segments of ids spread over 2^64 are held compact; a count or an audience over them
    runs on their id arrays (sidecar/replica/sorted_ids.py) and equals the truth, mixed with
    a roaring segment too; a large dense roaring segment keeps the BitMap64 algebra."""
    import random

    from sidecar.replica.forms import is_compact
    from sidecar.replica.sorted_ids import SortedIds, operands

    rng = random.Random(7)
    pool = [rng.getrandbits(64) for _ in range(12_000)]
    spread = {
        "x": BitMap64(pool[:8_000]),
        "y": BitMap64(pool[4_000:]),
        "z": BitMap64(pool[2_000:6_000] + pool[9_000:10_000]),
    }
    dense = BitMap64(range(100_000)) | BitMap64(pool[:10])
    transport = LogDirTransport(workdir / "log")
    publish_raw(transport, {**spread, "small": BitMap64(pool[:3] + [5]), "dense": dense})
    x, y, z, small = spread["x"], spread["y"], spread["z"], BitMap64(pool[:3] + [5])
    truths = {
        "x & y": x & y,
        "(x | y) & !z": (x | y) - z,
        "x & !y & !z": x - y - z,
        "y | small": y | small,
        "z & !small": z - small,
        "dense & x": dense & x,
    }
    with Replica(transport, poll_interval=0.01) as r:
        assert r.wait_ready(10)
        assert all(is_compact(r.state(s).bitmap) for s in spread)  # type: ignore[union-attr]
        assert type(operands([r.state("x").bitmap, r.state("small").bitmap])[0]) is SortedIds  # type: ignore[union-attr]
        assert type(operands([r.state("dense").bitmap, r.state("x").bitmap])[0]) is BitMap64  # type: ignore[union-attr]
        for text, want in truths.items():
            assert r.count(text).count == len(want), text
            members, versions = r.audience(text)
            assert type(members) is BitMap64 and members == want, text
            assert set(versions.values()) == {1}
