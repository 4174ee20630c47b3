"""The Unix-socket server, protocol v1 (DESIGN.md "Interfaces"): every op, every error path,
pipelining, many connections, socket file safety, and the fallback semantics of
"Replica semantics", over a real replica of a log directory."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pyroaring import BitMap64

from sidecar.fallback.base import Fallback
from sidecar.replica.runner import Replica
from sidecar.server.uds import SocketPathError
from sidecar.transport.logdir import LogDirTransport
from tests.logtools import LogState, SidecarThread, publish_gap, publish_raw, started_replica

MAX = 2**64 - 1
SEGMENTS = {
    "vip": BitMap64([1, 2, 3, MAX]),
    "cart:30m": BitMap64(range(100, 200)),
    "empty.seg": BitMap64(),
}


class FakeFallback(Fallback):
    """Our own fallback interface, answering from a dict and counting calls."""

    name = "fake"

    def __init__(self, maps: dict[int, dict[str, int]] | None = None, delay: float = 0.0):
        self.maps = maps or {}
        self.delay = delay
        self.calls: list[int] = []
        self.answer_none = False
        self.fail = False

    async def segments_of(self, user: int) -> dict[str, int] | None:
        self.calls.append(user)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        if self.answer_none:
            return None
        return dict(self.maps.get(user, {}))


class Raw:
    """A bare protocol connection for byte-level tests."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + body

    def req(self, *items: Any) -> None:
        self.send(self.frame(msgpack.packb(list(items))))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> list[Any]:
        (length,) = struct.unpack(">I", self._read(4))
        return msgpack.unpackb(self._read(length), strict_map_key=False)

    def call(self, *items: Any) -> list[Any]:
        self.req(*items)
        return self.recv()

    def is_closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(sidecar_server: SidecarThread) -> Iterator[Raw]:
    r = Raw(sidecar_server.uds_path)
    yield r
    r.close()


def _wait(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# -- every op ------------------------------------------


def test_ping(raw: Raw) -> None:
    assert raw.call(1, "ping") == [1, 0, "pong"]


def test_check(raw: Raw) -> None:
    assert raw.call(2, "check", 1, "vip") == [2, 0, True]
    assert raw.call(3, "check", 4, "vip") == [3, 0, False]
    assert raw.call(4, "check", MAX, "vip") == [4, 0, True]
    assert raw.call(5, "check", 150, "cart:30m") == [5, 0, True]
    assert raw.call(6, "check", 1, "empty.seg") == [6, 0, False]
    # unknown segment, no fallback configured: unknown (nil), not an error
    assert raw.call(7, "check", 1, "never_published") == [7, 0, None]


def test_check_many(raw: Raw) -> None:
    resp = raw.call(8, "check_many", 150, ["vip", "cart:30m", "nope", "empty.seg"])
    assert resp == [8, 0, [False, True, None, False]]
    assert raw.call(9, "check_many", 1, []) == [9, 0, []]


def test_batch(raw: Raw) -> None:
    pairs = [[1, "vip"], [150, "cart:30m"], [4, "vip"], [1, "nope"], [MAX, "vip"]]
    assert raw.call(10, "batch", pairs) == [10, 0, [True, True, False, None, True]]
    assert raw.call(11, "batch", []) == [11, 0, []]
    big = [[u, "cart:30m"] for u in range(0, 1000)]
    result = raw.call(12, "batch", big)[2]
    assert result == [100 <= u < 200 for u in range(1000)]


def test_segments(raw: Raw) -> None:
    assert raw.call(13, "segments", 150) == [13, 0, ["cart:30m"]]
    assert raw.call(14, "segments", 1) == [14, 0, ["vip"]]
    assert raw.call(15, "segments", 5) == [15, 0, []]


def test_explain(raw: Raw, logstate: LogState) -> None:
    rid, status, result = raw.call(16, "explain", 1, "vip")
    assert (rid, status) == (16, 0)
    assert result["member"] is True and result["source"] == "local"
    assert result["version"] == logstate.segments["vip"][0]
    assert result["age_ms"] >= 0 and result["reason"] is None
    _, _, unknown = raw.call(17, "explain", 1, "nope")
    assert unknown["member"] is None and unknown["source"] == "none"
    assert unknown["reason"] == "unknown"


def test_status(raw: Raw) -> None:
    _, status, result = raw.call(18, "status")
    assert status == 0
    assert result["ready"] is True
    assert result["segments"] == 3
    assert result["memberships"] == 104
    assert set(result["lag"]) == {0, 1} and all(v == 0 for v in result["lag"].values())
    assert result["protocol"] == 1
    assert result["connections"] >= 1


def test_answers_follow_new_publishes(raw: Raw, workdir: Path, logstate: LogState) -> None:
    publish_raw(LogDirTransport(workdir / "log"), {"vip": BitMap64([7])}, logstate)
    _wait(lambda: raw.call(1, "check", 7, "vip")[2] is True)
    assert raw.call(2, "check", 1, "vip")[2] is False
    publish_raw(LogDirTransport(workdir / "log"), {}, logstate, drop=("vip",))
    _wait(lambda: raw.call(3, "check", 7, "vip")[2] is None)  # dropped: unknown


# -- errors ------------------------------------------


def test_request_id_extremes(raw: Raw) -> None:
    assert raw.call(0, "ping") == [0, 0, "pong"]
    assert raw.call(MAX, "ping") == [MAX, 0, "pong"]


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"",  # empty frame
        b"\x92\x01",  # truncated array
        b"\x91\x01\x01",  # trailing bytes
        b"\xa2\xff\xfe",  # invalid utf-8 string
        b"not msgpack at all \xff",
    ],
)
def test_non_msgpack_body_keeps_connection_open(raw: Raw, body: bytes) -> None:
    raw.send(raw.frame(body))
    rid, status, message = raw.recv()
    assert rid is None and status == 1 and "msgpack" in message
    assert raw.call(5, "ping") == [5, 0, "pong"]


@pytest.mark.parametrize(
    "request_",
    [
        {"id": 1},  # a map
        5,  # a scalar
        [],  # empty array
        ["x", "ping"],  # string id
        [-1, "ping"],  # negative id
        [True, "ping"],  # bool id
        [1.0, "ping"],  # float id
        [None, "ping"],  # nil id
    ],
)
def test_request_without_usable_id(raw: Raw, request_: Any) -> None:
    raw.send(raw.frame(msgpack.packb(request_)))
    rid, status, message = raw.recv()
    assert rid is None and status == 1 and message
    assert raw.call(6, "ping") == [6, 0, "pong"]


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        ([1], "op is missing"),
        ([1, 5], "op must be a string"),
        ([1, "check", 1], "check takes 2 arguments"),
        ([1, "check", 1, "vip", 3], "check takes 2 arguments"),
        ([1, "ping", 1], "ping takes no arguments"),
        ([1, "batch"], "batch takes 1 argument"),
        ([1, "check", True, "vip"], "user"),
        ([1, "check", False, "vip"], "bool"),
        ([1, "check", -1, "vip"], "user"),
        ([1, "check", -(2**63), "vip"], "user"),
        ([1, "check", 1.0, "vip"], "float"),
        ([1, "check", 1.8446744073709552e19, "vip"], "user"),  # 2**64 as a float
        ([1, "check", "1", "vip"], "str"),
        ([1, "check", None, "vip"], "user"),
        ([1, "check", 1, ""], "segment"),
        ([1, "check", 1, "-starts-with-dash"], "segment"),
        ([1, "check", 1, "a" * 129], "segment"),
        ([1, "check", 1, "has space"], "segment"),
        ([1, "check", 1, "sl/ash"], "segment"),
        ([1, "check", 1, 5], "segment"),
        ([1, "check", 1, b"vip"], "segment"),
        ([1, "check", 1, ["vip"]], "segment"),
        ([1, "check_many", 1, "vip"], "list"),
        ([1, "check_many", 1, ["vip", "bad seg"]], "segments[1]"),
        ([1, "check_many", True, ["vip"]], "user"),
        ([1, "batch", "x"], "list"),
        ([1, "batch", [[1, "vip"], [2]]], "batch item 1"),
        ([1, "batch", [[1, "vip"], [2, "vip", 3]]], "batch item 1"),
        ([1, "batch", [[1, "vip"], 7]], "batch item 1"),
        ([1, "batch", [[1, "vip"], {2: 0, "vip": 1}]], "batch item 1"),  # a map, not a pair
        ([1, "batch", [[1, "vip"], "ab"]], "batch item 1"),
        ([1, "batch", [[1, "vip"], [-2, "vip"]]], "batch item 1 user"),
        ([1, "batch", [[1, "vip"], [True, "vip"]]], "batch item 1 user"),
        ([1, "batch", [[1, "vip"], [2, "bad seg"]]], "batch item 1 segment"),
        ([1, "batch", [[1, "vip"], [2, ["vip"]]]], "batch item 1 segment"),
        ([1, "batch", [[1, "vip"], [2, {"a": 1}]]], "batch item 1 segment"),
        ([1, "segments", "1"], "user"),
        ([1, "explain", 1, "bad seg"], "segment"),
    ],
)
def test_bad_request(raw: Raw, request_: list[Any], needle: str) -> None:
    rid, status, message = raw.call(*request_)
    assert (rid, status) == (1, 1), message
    assert needle in message
    assert raw.call(2, "ping") == [2, 0, "pong"]  # still serving, same connection


def test_unknown_op(raw: Raw) -> None:
    rid, status, message = raw.call(3, "frobnicate", 1)
    assert (rid, status) == (3, 2)
    assert "frobnicate" in message
    assert raw.call(4, "ping") == [4, 0, "pong"]


def test_oversize_frame_closes_only_that_connection(
    sidecar_server: SidecarThread, raw: Raw
) -> None:
    other = Raw(sidecar_server.uds_path)
    try:
        raw.send(struct.pack(">I", (1 << 20) + 1))
        rid, status, message = raw.recv()
        assert rid is None and status == 1 and "limit" in message
        assert raw.is_closed()
        assert other.call(1, "ping") == [1, 0, "pong"]
        fresh = Raw(sidecar_server.uds_path)
        assert fresh.call(2, "check", 1, "vip") == [2, 0, True]
        fresh.close()
    finally:
        other.close()


def test_framing_garbage(sidecar_server: SidecarThread) -> None:
    conn = Raw(sidecar_server.uds_path)
    conn.send(b"\x00\x00\x00\x05hello")  # a frame whose body is not a request
    assert conn.recv()[:2] == [None, 1]
    assert conn.call(1, "ping") == [1, 0, "pong"]
    conn.send(b"\xff\xff\xff\xff garbage garbage")  # a 4 GiB length: over the limit
    assert conn.recv()[:2] == [None, 1]
    assert conn.is_closed()
    conn.close()
    again = Raw(sidecar_server.uds_path)
    assert again.call(2, "ping") == [2, 0, "pong"]
    again.close()


def test_frame_split_byte_by_byte(raw: Raw) -> None:
    data = raw.frame(msgpack.packb([42, "check", 150, "cart:30m"]))
    for i in range(len(data)):
        raw.send(data[i : i + 1])
        time.sleep(0.001)
    assert raw.recv() == [42, 0, True]


def test_frame_of_exactly_the_limit_is_accepted(raw: Raw) -> None:
    limit = 1 << 20
    n = (limit - 13) // 6  # [9, "batch", array32 of [1, "vip"]]: 13 + 6 bytes per pair
    pairs: list[list[Any]] = [[1, "vip"]] * (n - 1)
    pairs.append([1, "vip" + "x" * ((limit - 13) % 6)])  # pad to exactly the limit
    body = msgpack.packb([9, "batch", pairs])
    assert len(body) == limit
    raw.send(raw.frame(body))
    rid, status, result = raw.recv()
    assert (rid, status) == (9, 0) and len(result) == n
    assert all(result[:-1]) and result[-1] is None


def test_internal_error_is_status_3_without_details(
    sidecar_server: SidecarThread, raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise ZeroDivisionError("secret detail")

    sidecar_server.queries.status = broken  # type: ignore[method-assign]
    rid, status, message = raw.call(7, "status")
    assert (rid, status) == (7, 3)
    assert "secret" not in message and "Traceback" not in message
    assert raw.call(8, "ping") == [8, 0, "pong"]


# -- pipelining and connections ------------------------------------------


def test_pipelining_100_requests_in_one_write(raw: Raw) -> None:
    frames = []
    expected = []
    for i in range(100):
        if i % 3 == 0:
            frames.append(raw.frame(msgpack.packb([i, "check", 100 + i, "cart:30m"])))
            expected.append([i, 0, True])
        elif i % 3 == 1:
            frames.append(raw.frame(msgpack.packb([i, "ping"])))
            expected.append([i, 0, "pong"])
        else:
            frames.append(raw.frame(msgpack.packb([i, "check", 1, "bad seg"])))
            expected.append([i, 1, None])
    raw.send(b"".join(frames))
    got = [raw.recv() for _ in range(100)]
    assert [g[0] for g in got] == list(range(100))
    for g, e in zip(got, expected, strict=True):
        assert g[1] == e[1]
        if e[1] == 0:
            assert g == e


def test_many_idle_connections(sidecar_server: SidecarThread) -> None:
    idle = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sidecar_server.uds_path)
            idle.append(s)
        active = Raw(sidecar_server.uds_path)
        for i in range(50):
            assert active.call(i, "check", 1, "vip") == [i, 0, True]
        assert active.call(99, "status")[2]["connections"] >= 301
        active.close()
    finally:
        for s in idle:
            s.close()
    _wait(lambda: len(sidecar_server.sidecar.uds.connections) == 0)  # type: ignore[union-attr]


def test_client_that_disconnects_mid_frame(sidecar_server: SidecarThread) -> None:
    conn = Raw(sidecar_server.uds_path)
    conn.send(struct.pack(">I", 100) + b"\x93")
    conn.close()
    other = Raw(sidecar_server.uds_path)
    assert other.call(1, "ping") == [1, 0, "pong"]
    other.close()


# -- the socket file ------------------------------------------


def test_socket_file_mode_and_cleanup(replica: Replica, workdir: Path) -> None:
    path = workdir / "sub" / "s.sock"
    with SidecarThread(replica, uds_path=path, http_host=None) as s:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
        assert Raw(s.uds_path).call(1, "ping")[2] == "pong"
    assert not path.exists()


def test_socket_mode_is_configurable(replica: Replica, workdir: Path) -> None:
    path = workdir / "s.sock"
    with SidecarThread(replica, uds_path=path, http_host=None, socket_mode=0o600):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_world_writable_parent_is_refused(replica: Replica, workdir: Path) -> None:
    open_dir = workdir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(SocketPathError, match="world-writable"):
        SidecarThread(replica, uds_path=open_dir / "s.sock", http_host=None)
    sticky = workdir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others cannot remove or replace our socket
    with SidecarThread(replica, uds_path=sticky / "s.sock", http_host=None):
        assert (sticky / "s.sock").exists()


def test_stale_socket_is_replaced_live_one_refused(replica: Replica, workdir: Path) -> None:
    path = workdir / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with SidecarThread(replica, uds_path=path, http_host=None) as s:
        assert Raw(s.uds_path).call(1, "ping")[2] == "pong"
        with pytest.raises(SocketPathError, match="another server"):
            SidecarThread(replica, uds_path=path, http_host=None)
        assert Raw(s.uds_path).call(2, "ping")[2] == "pong"  # the live one is untouched


def test_non_socket_path_is_refused(replica: Replica, workdir: Path) -> None:
    path = workdir / "file.sock"
    path.write_text("important")
    with pytest.raises(SocketPathError, match="not a socket"):
        SidecarThread(replica, uds_path=path, http_host=None)
    assert path.read_text() == "important"


# -- fallback semantics ------------------------------------------


@pytest.fixture
def fake() -> FakeFallback:
    return FakeFallback({1: {"remote_seg": 4, "vip": 9}, 150: {"other": 2}})


@pytest.fixture
def fb_server(replica: Replica, workdir: Path, fake: FakeFallback) -> Iterator[SidecarThread]:
    with SidecarThread(replica, fake, uds_path=workdir / "f.sock", http_host=None) as s:
        yield s


def test_unknown_segment_asks_the_fallback(fb_server: SidecarThread, fake: FakeFallback) -> None:
    raw = Raw(fb_server.uds_path)
    assert raw.call(1, "check", 1, "remote_seg") == [1, 0, True]
    assert raw.call(2, "check", 2, "remote_seg") == [2, 0, False]
    _, _, explained = raw.call(3, "explain", 1, "remote_seg")
    assert explained["source"] == "aerospike" and explained["member"] is True
    assert explained["version"] == 4 and explained["reason"] == "unknown"
    assert fake.calls == [1, 2, 1]


def test_fresh_local_not_member_does_not_call_fallback(
    fb_server: SidecarThread, fake: FakeFallback
) -> None:
    raw = Raw(fb_server.uds_path)
    assert raw.call(1, "check", 4, "vip") == [1, 0, False]
    assert raw.call(2, "check", 1, "vip") == [2, 0, True]
    assert raw.call(3, "batch", [[4, "vip"], [150, "cart:30m"]]) == [3, 0, [False, True]]
    assert raw.call(4, "check_many", 4, ["vip", "cart:30m"]) == [4, 0, [False, False]]
    assert raw.call(5, "segments", 150) == [5, 0, ["cart:30m"]]  # full, ready, healthy
    _, _, explained = raw.call(6, "explain", 4, "vip")
    assert explained["source"] == "local" and explained["member"] is False
    assert fake.calls == []


def test_fallback_that_cannot_answer_gives_unknown(
    fb_server: SidecarThread, fake: FakeFallback
) -> None:
    fake.answer_none = True
    raw = Raw(fb_server.uds_path)
    assert raw.call(1, "check", 1, "remote_seg") == [1, 0, None]
    _, _, explained = raw.call(2, "explain", 1, "remote_seg")
    assert explained["source"] == "none" and explained["member"] is None
    fake.answer_none = False
    fake.fail = True  # an exception is "cannot answer" too, never an error to the client
    assert raw.call(3, "check", 1, "remote_seg") == [3, 0, None]
    assert raw.call(4, "check", 1, "vip") == [4, 0, True]


def test_slow_fallback_is_cut_by_the_deadline(fb_server: SidecarThread, fake: FakeFallback) -> None:
    fb_server.queries.fallback_timeout = 0.05
    fake.delay = 5.0
    raw = Raw(fb_server.uds_path)
    started = time.monotonic()
    assert raw.call(1, "check", 1, "remote_seg") == [1, 0, None]
    assert time.monotonic() - started < 2.0


def test_one_fallback_call_per_user_per_request(
    fb_server: SidecarThread, fake: FakeFallback
) -> None:
    raw = Raw(fb_server.uds_path)
    pairs = [[1, "remote_seg"], [1, "x"], [150, "other"], [1, "vip"], [150, "y"], [4, "vip"]]
    assert raw.call(1, "batch", pairs) == [1, 0, [True, False, True, True, False, False]]
    assert sorted(fake.calls) == [1, 150]
    fake.calls.clear()
    resp = raw.call(2, "check_many", 1, ["remote_seg", "vip", "nope", "x"])
    assert resp == [2, 0, [True, True, False, False]]
    assert fake.calls == [1]


def test_fallback_responses_keep_request_order(
    fb_server: SidecarThread, fake: FakeFallback
) -> None:
    fake.delay = 0.05
    raw = Raw(fb_server.uds_path)
    frames = []
    for i in range(30):
        if i % 2:
            frames.append(raw.frame(msgpack.packb([i, "check", 1, "remote_seg"])))
        else:
            frames.append(raw.frame(msgpack.packb([i, "check", 1, "vip"])))
    raw.send(b"".join(frames))
    got = [raw.recv() for _ in range(30)]
    assert [g[0] for g in got] == list(range(30))
    assert all(g[1:] == [0, True] for g in got)


def test_not_ready_replica_uses_fallback(workdir: Path, fake: FakeFallback) -> None:
    # A log directory that does not exist yet: the replica waits and is never ready.
    with started_replica(LogDirTransport(workdir / "missing")) as waiting:
        with SidecarThread(waiting, fake, uds_path=workdir / "n.sock", http_host=None) as s:
            raw = Raw(s.uds_path)
            assert raw.call(1, "check", 1, "vip") == [1, 0, True]  # from the fallback map
            assert raw.call(2, "check", 2, "vip") == [2, 0, False]
            _, _, explained = raw.call(3, "explain", 1, "vip")
            assert explained["reason"] == "not_ready" and explained["source"] == "aerospike"
            assert raw.call(4, "segments", 1) == [4, 0, ["remote_seg", "vip"]]
            assert raw.call(5, "status")[2]["ready"] is False
            assert len(fake.calls) == 4
        with SidecarThread(waiting, None, uds_path=workdir / "m.sock", http_host=None) as s:
            assert Raw(s.uds_path).call(1, "check", 1, "vip") == [1, 0, None]


def test_stale_segment_uses_fallback(
    fb_server: SidecarThread, fake: FakeFallback, workdir: Path, logstate: LogState
) -> None:
    raw = Raw(fb_server.uds_path)
    publish_gap(LogDirTransport(workdir / "log"), "vip", logstate)
    _wait(lambda: raw.call(0, "explain", 4, "vip")[2]["reason"] == "stale")
    fake.calls.clear()
    assert raw.call(1, "check", 1, "vip") == [1, 0, True]  # the fallback's map says so
    assert raw.call(2, "check", 150, "cart:30m") == [2, 0, True]  # healthy: local
    assert fake.calls == [1]
    # segments: with an unhealthy segment the fallback fills what the replica cannot answer
    assert raw.call(3, "segments", 1) == [3, 0, ["remote_seg", "vip"]]


def test_partial_replica_asks_fallback_for_other_segments(
    workdir: Path, logstate: LogState, fake: FakeFallback
) -> None:
    with started_replica(LogDirTransport(workdir / "log"), segments=["cart*"]) as partial:
        assert partial.wait_ready(10)
        with SidecarThread(partial, fake, uds_path=workdir / "p.sock", http_host=None) as s:
            raw = Raw(s.uds_path)
            assert raw.call(1, "check", 150, "cart:30m") == [1, 0, True]
            assert fake.calls == []
            assert raw.call(2, "check", 1, "vip") == [2, 0, True]  # not held: fallback
            assert fake.calls == [1]
            _, _, explained = raw.call(3, "explain", 1, "vip")
            assert explained["reason"] == "not_held"
            assert raw.call(4, "segments", 150) == [4, 0, ["cart:30m", "other"]]


def test_metrics_count_requests(sidecar_server: SidecarThread, raw: Raw) -> None:
    raw.call(1, "check", 1, "vip")
    raw.call(2, "check", 1, "bad seg")
    raw.call(3, "nope")
    text = sidecar_server.sidecar.metrics.render().decode()
    assert 'seg_requests_total{op="check",result="ok",source="local",transport="uds"} 1.0' in text
    assert 'seg_errors_total{kind="unknown_op",transport="uds"} 1.0' in text
    assert 'seg_errors_total{kind="bad_request",transport="uds"} 1.0' in text
    assert 'seg_request_duration_seconds_count{op="check",transport="uds"}' in text
    assert "seg_replica_memberships 104.0" in text
    assert 'seg_replica_records_total{outcome="applied"} 3.0' in text


def test_every_check_is_counted_and_one_in_16_local_checks_is_timed(
    sidecar_server: SidecarThread, raw: Raw
) -> None:
    def timed() -> float:
        text = sidecar_server.sidecar.metrics.render().decode()
        line = 'seg_request_duration_seconds_count{op="check",transport="uds"} '
        return float(text.split(line)[1].split()[0])

    # the first check sees the replica ready and the segment id valid; the rest use that
    assert raw.call(0, "check", 1, "cart:30m") == [0, 0, False]
    before = timed()
    for i in range(1, 161):
        assert raw.call(i, "check", 150 + i % 2, "cart:30m") == [i, 0, True]
    assert timed() - before == 10  # 160 local checks, whatever the counter's phase
    assert raw.call(999, "check", 1, "never_published") == [999, 0, None]  # not local: timed
    assert timed() - before == 11
    text = sidecar_server.sidecar.metrics.render().decode()
    local = 'seg_requests_total{op="check",result="ok",source="local",transport="uds"}'
    assert f"{local} 161.0" in text  # every check counted
    assert 'seg_requests_total{op="check",result="ok",source="none",transport="uds"} 1.0' in text
