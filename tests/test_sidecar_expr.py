"""Segment expressions through the sidecar: the socket ops `eval`, `eval_many`, `count` (both
clients), the HTTP routes `/v1/eval`, `/v1/audience/count` and the streamed `/v1/audience`
(and the clients' export helper), each segment answered as `check` answers it (local, the
fallback, unknown) with the same fallback metrics, bad expressions answered 400 / status 1
with their position and never a 500, 409 for segments not held, and counts and exports equal
to the truth at the versions they report while publishes land."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.client import (
    AsyncSidecarClient,
    BadRequestError,
    NotLocalError,
    SidecarClient,
)
from sidecar.fallback.base import Fallback
from sidecar.packed import pack_users
from sidecar.replica import Replica
from sidecar.transport import LogDirTransport
from tests.logtools import SidecarThread, publish_raw

MAX = 2**64 - 1
SEGMENTS = {
    "vip": BitMap64(list(range(0, 3000, 2)) + [MAX]),
    "cart": BitMap64(range(0, 3000, 3)),
    "churned": BitMap64(range(0, 3000, 5)),
}
USERS = [*range(0, 60), 2999, MAX, MAX - 1]


def truth(user: int, text: str) -> bool:
    v, c, ch = (user in SEGMENTS[s] for s in ("vip", "cart", "churned"))
    return {
        "vip & cart": v and c,
        "(vip | cart) & !churned": (v or c) and not ch,
        "vip & !(cart | churned)": v and not (c or ch),
        "!vip | cart": (not v) or c,
    }[text]


TEXTS = ["vip & cart", "(vip | cart) & !churned", "vip & !(cart | churned)", "!vip | cart"]


class MapFallback(Fallback):
    """Our fallback interface answering from a dict (None: cannot answer), counting calls."""

    name = "map"

    def __init__(self, maps: dict[int, dict[str, int]]) -> None:
        self.maps = maps
        self.calls: list[int] = []
        self.down = False

    async def segments_of(self, user: int) -> dict[str, int] | None:
        self.calls.append(user)
        if self.down:
            return None
        return self.maps.get(user, {})


@pytest.fixture
def fallback() -> MapFallback:
    # "remote" is not held by the replica: only the fallback knows it
    return MapFallback({u: {"remote": 7} for u in range(0, 3000, 7)})


@pytest.fixture
def sidecar(replica: Replica, workdir: Path, fallback: MapFallback) -> Iterator[SidecarThread]:
    with SidecarThread(replica, fallback, uds_path=workdir / "s.sock") as s:
        yield s


@pytest.fixture
def sc(sidecar: SidecarThread) -> Iterator[SidecarClient]:
    with SidecarClient(sidecar.uds_path, timeout=10, http=sidecar.http_url) as c:
        yield c


def get(server: SidecarThread, target: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.sidecar.http_port, timeout=10)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(server: SidecarThread, target: str) -> tuple[int, dict]:
    status, _, body = get(server, target)
    return status, json.loads(body)


# -- socket ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_eval_over_the_socket_is_the_truth(sc: SidecarClient, text: str) -> None:
    assert [sc.eval(u, text) for u in USERS] == [truth(u, text) for u in USERS]
    assert sc.eval_many(USERS, text) == [truth(u, text) for u in USERS]
    assert sc.eval_many(USERS, text, raw=True) == bytes(truth(u, text) for u in USERS)
    assert sc.eval_many([], text) == []


def test_unknown_leaves_follow_kleene_without_a_fallback(sidecar_server: SidecarThread) -> None:
    """No fallback: segments not held are unknown."""
    with SidecarClient(sidecar_server.uds_path, timeout=10) as c:
        assert c.eval(2, "vip & nosuch") is None  # true & unknown
        assert c.eval(1, "vip & nosuch") is False  # false & unknown
        assert c.eval(2, "vip | nosuch") is True
        assert c.eval(1, "vip | nosuch") is None
        assert c.eval(1, "!nosuch") is None
        assert c.eval_many([1, 2, 3], "vip & !nosuch") == [False, None, False]
        assert c.eval_many([1, 2, 3], "vip | nosuch", raw=True) == b"\x02\x01\x02"


def test_segments_not_held_are_asked_of_the_fallback_once_and_only_if_needed(
    sidecar: SidecarThread, sc: SidecarClient, fallback: MapFallback
) -> None:
    # 14: vip, remote; 21: remote, not vip; 7: remote, not vip; 4: vip, not remote
    assert sc.eval(14, "vip & remote") is True
    assert sc.eval(4, "vip & remote") is False
    assert fallback.calls == [14, 4]
    assert sc.eval(21, "vip & remote & cart") is False  # vip false locally: no call
    assert sc.eval(3, "cart | remote") is True  # cart true locally: no call
    assert fallback.calls == [14, 4]
    assert sc.eval(7, "remote & !vip & !nosuch") is True  # one call for both unknowns
    assert fallback.calls == [14, 4, 7]
    metrics = sidecar.sidecar.metrics
    ok_before = metrics.fallback_calls["ok"]
    users = [0, 2, 4, 7, 14, 21, 28, 35]
    got = sc.eval_many(users, "vip & remote")
    assert got == [u % 2 == 0 and u % 7 == 0 for u in users]
    # only the users that vip does not decide: the even ones
    assert sorted(fallback.calls[3:]) == [0, 2, 4, 14, 28]
    assert metrics.fallback_calls["ok"] == ok_before + 5
    fallback.down = True
    assert sc.eval(14, "vip & remote") is None
    assert sc.eval(21, "vip & remote") is False
    assert sc.eval_many([14, 21], "vip & remote") == [None, False]
    assert metrics.fallback_calls["none"] >= 2
    # requests are counted by the source of their answer, as checks are
    counts = sc.status()["requests"]["uds"]
    assert counts["eval"] == {"aerospike": 3, "local": 3, "none": 1}
    assert counts["eval_many"] == {"aerospike": 1, "none": 1}


def test_eval_answers_each_segment_as_check_does(sc: SidecarClient, fallback: MapFallback) -> None:
    for user in (0, 7, 14, 15, 2999):
        for seg in ("vip", "remote", "nosuch"):
            assert sc.eval(user, seg) is sc.check(user, seg), (user, seg)


def test_count_over_the_socket(sc: SidecarClient) -> None:
    for text in TEXTS[:3]:
        n, versions = sc.count(text)
        assert n == sum(truth(u, text) for u in SEGMENTS["vip"] | SEGMENTS["cart"])
        assert versions == {s: 1 for s in ("vip", "cart", "churned") if s in text}
    with pytest.raises(BadRequestError, match="position 0: the result is unbounded"):
        sc.count("!vip | cart")
    with pytest.raises(BadRequestError, match=r"not answered locally: remote \(unknown\)"):
        sc.count("vip & remote")


@pytest.mark.parametrize(
    "text,position",
    [("vip &", 5), ("vip & (cart", 6), ("vip cart", 4), ("vip & $", 6), ("", 0)],
)
def test_syntax_errors_name_the_position(sc: SidecarClient, text: str, position: int) -> None:
    for call in (
        lambda: sc.eval(1, text),
        lambda: sc.eval_many([1], text),
        lambda: sc.count(text),
    ):
        with pytest.raises(BadRequestError, match=f"at position {position}:"):
            call()


def test_limits_and_bad_arguments(sc: SidecarClient) -> None:
    refs = " | ".join(["vip"] * 64)
    assert sc.eval(2, refs) is True
    with pytest.raises(BadRequestError, match="more than 64 segment references"):
        sc.eval(2, refs + " | cart")
    with pytest.raises(BadRequestError, match="at most 1,024"):
        sc.eval(2, "vip" + " " * 1022)
    with pytest.raises(BadRequestError, match="expr must be a string"):
        sc.call("eval", 1, 5)
    with pytest.raises(BadRequestError, match="user"):
        sc.call("eval", -1, "vip")
    with pytest.raises(BadRequestError, match="users must be bin"):
        sc.call("eval_many", [1, 2], "vip")
    with pytest.raises(BadRequestError, match="8 bytes per user"):
        sc.call("eval_many", b"1234", "vip")
    with pytest.raises(BadRequestError, match="count takes 1 argument"):
        sc.call("count", "vip", "cart")
    with pytest.raises(BadRequestError):
        sc.eval_many([-1], "vip")  # refused by the client before sending
    assert sc.ping() == "pong"  # the connection survived all of it


def test_async_client(sidecar: SidecarThread) -> None:
    async def main() -> None:
        async with AsyncSidecarClient(sidecar.uds_path, timeout=10, http=sidecar.http_url) as c:
            text = TEXTS[1]
            answers = await asyncio.gather(*(c.eval(u, text) for u in USERS))
            assert answers == [truth(u, text) for u in USERS]
            assert await c.eval_many(USERS, text) == answers
            n, versions = await c.count("vip & cart")
            assert n == len(SEGMENTS["vip"] & SEGMENTS["cart"]) and versions["vip"] == 1
            async with c.audience("vip & cart", after=10, limit=4) as export:
                assert export.versions == {"vip": 1, "cart": 1}
                assert [u async for u in export] == [12, 18, 24, 30]
            with pytest.raises(NotLocalError) as info:
                async with c.audience("vip & remote"):
                    pass
            assert info.value.segments == ["remote"]
            with pytest.raises(BadRequestError, match="position 0"):
                await c.count("!vip")

    asyncio.run(main())


# -- HTTP --------------------------------------------------------------------------------------
def test_http_eval(sidecar: SidecarThread) -> None:
    status, doc = get_json(sidecar, "/v1/eval?user=14&expr=" + quote("vip & remote & !cart"))
    assert status == 200
    assert doc == {
        "user": 14,
        "expr": "vip & remote & !cart",
        "member": True,
        "source": "aerospike",
        "versions": {"vip": 1, "remote": 7, "cart": 1},
    }
    status, doc = get_json(sidecar, f"/v1/eval?user={MAX}&expr=vip")
    assert (status, doc["member"], doc["source"]) == (200, True, "local")


def test_http_count_and_audience(sidecar: SidecarThread) -> None:
    text = "(vip | cart) & !churned"
    want = sorted(u for u in SEGMENTS["vip"] | SEGMENTS["cart"] if truth(u, text))
    status, doc = get_json(sidecar, "/v1/audience/count?expr=" + quote(text))
    assert (status, doc) == (
        200,
        {"expr": text, "count": len(want), "versions": {"vip": 1, "cart": 1, "churned": 1}},
    )
    status, headers, body = get(sidecar, "/v1/audience?expr=" + quote(text))
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert json.loads(headers["Seg-Versions"]) == {"vip": 1, "cart": 1, "churned": 1}
    assert int(headers["Seg-Count"]) == len(want)
    assert [int(line) for line in body.decode().splitlines()] == want
    # paging with limit and after walks the same list
    pages: list[int] = []
    after = None
    while True:
        target = "/v1/audience?limit=100&expr=" + quote(text)
        if after is not None:
            target += f"&after={after}"
        page = [int(x) for x in get(sidecar, target)[2].split()]
        if not page:
            break
        assert len(page) <= 100
        pages += page
        after = page[-1]
    assert pages == want


def test_client_export_helper(sc: SidecarClient) -> None:
    with sc.audience("vip & !cart") as export:
        assert export.versions == {"vip": 1, "cart": 1}
        got = list(export)
    assert got == sorted(SEGMENTS["vip"] - SEGMENTS["cart"])
    assert export.count == len(got)
    with sc.audience("vip", after=MAX - 1) as export:
        assert list(export) == [MAX]
    with sc.audience("vip", limit=0) as export:
        assert list(export) == []
    with pytest.raises(NotLocalError) as info:
        sc.audience("vip & remote & nosuch")
    assert info.value.segments == ["nosuch", "remote"]
    with pytest.raises(BadRequestError, match="position 4"):
        sc.audience("vip !cart")


@pytest.mark.parametrize(
    "target,status,words",
    [
        ("/v1/audience/count?expr=" + quote("vip & remote"), 409, "remote"),
        ("/v1/audience?expr=" + quote("nosuch | vip"), 409, "nosuch"),
        ("/v1/audience/count?expr=" + quote("!vip"), 400, "position 0"),
        ("/v1/audience?expr=" + quote("vip & !cart | !churned"), 400, "position 14"),
        ("/v1/audience?expr=" + quote("vip &"), 400, "position 5"),
        ("/v1/eval?user=1&expr=" + quote("(vip"), 400, "position 0"),
        ("/v1/eval?user=-1&expr=vip", 400, "user"),
        ("/v1/eval?user=1", 400, "expr"),
        ("/v1/audience/count", 400, "expr"),
        ("/v1/audience?expr=vip&limit=-1", 400, "limit"),
        ("/v1/audience?expr=vip&limit=x", 400, "limit"),
        ("/v1/audience?expr=vip&after=" + str(2**64), 400, "after"),
        ("/v1/audience?expr=" + "a" * 1025, 400, "1,024"),
    ],
)
def test_http_errors(sidecar: SidecarThread, target: str, status: int, words: str) -> None:
    got, doc = get_json(sidecar, target)
    assert got == status, doc
    assert words in doc["error"]
    if status == 409:
        assert words in doc["segments"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet="vipcartchurned!&|() $_-", max_size=40))
def test_any_expression_is_never_a_500(sidecar: SidecarThread, text: str) -> None:
    for route in ("/v1/eval?user=2&expr=", "/v1/audience/count?expr=", "/v1/audience?expr="):
        status, _, body = get(sidecar, route + quote(text))
        assert status in (200, 400, 409), (route, text, body)
        if status == 400:
            assert b"position" in body or b"segment" in body


def test_a_large_audience_is_streamed_in_chunks(workdir: Path) -> None:
    big = BitMap64(range(0, 3_000_000, 3))
    transport = LogDirTransport(workdir / "big")
    publish_raw(transport, {"big": big, "odd": BitMap64(range(1, 3_000_000, 2))})
    with Replica(transport, poll_interval=0.01) as r:
        assert r.wait_ready(30)
        with SidecarThread(r, uds_path=workdir / "g.sock") as s:
            conn = http.client.HTTPConnection("127.0.0.1", s.sidecar.http_port, timeout=30)
            conn.request("GET", "/v1/audience?expr=" + quote("big & !odd"))
            resp = conn.getresponse()
            assert resp.getheader("Transfer-Encoding") == "chunked"
            reads = 0
            count = 0
            last = -1
            rest = b""
            while chunk := resp.read1(1 << 16):
                reads += 1
                data = rest + chunk
                cut = data.rfind(b"\n") + 1
                for line in data[:cut].split():
                    user = int(line)
                    assert user > last
                    last = user
                    count += 1
                rest = data[cut:]
            conn.close()
    assert count == len(big) // 2 and last == 2_999_994
    assert reads > 10


# -- one view while publishes land --------------------------------------------------------------
WIDTH, STEP = 30_000, 10_000


def window(segment: str, version: int) -> BitMap64:
    start = {"a": 0, "b": 4 * STEP // 3}[segment] + version * STEP
    return BitMap64(range(start, start + WIDTH))


def test_http_counts_and_exports_while_publishes_land(workdir: Path) -> None:
    transport = LogDirTransport(workdir / "moving")
    state = publish_raw(transport, {"a": window("a", 1), "b": window("b", 1)})
    stop = threading.Event()

    def publisher() -> None:
        v = 1
        while not stop.is_set() and v < 200:
            v += 1
            for s in "ab":
                publish_raw(transport, {s: window(s, v)}, state)

    with Replica(transport, poll_interval=0.001) as r:
        assert r.wait_ready(10)
        with SidecarThread(r, uds_path=workdir / "m.sock") as s:
            thread = threading.Thread(target=publisher)
            thread.start()
            seen = set()
            try:
                with SidecarClient(s.uds_path, timeout=10, http=s.http_url) as c:
                    deadline = time.monotonic() + 20
                    while thread.is_alive() and time.monotonic() < deadline:
                        n, versions = c.count("a & !b")
                        assert n == len(window("a", versions["a"]) - window("b", versions["b"]))
                        with c.audience("a | b") as export:
                            got = BitMap64(export)
                            v = export.versions
                        assert got == window("a", v["a"]) | window("b", v["b"]), v
                        seen.add((v["a"], v["b"]))
            finally:
                stop.set()
                thread.join(30)
    assert len(seen) > 3


def test_eval_many_users_packed_like_batch_packed(sc: SidecarClient) -> None:
    from array import array

    users = array("Q", USERS)
    assert sc.eval_many(users, "vip") == [u in SEGMENTS["vip"] for u in USERS]
    assert sc.call("eval_many", pack_users(USERS), "cart") == bytes(
        u in SEGMENTS["cart"] for u in USERS
    )
