"""The packed batch (`batch_packed`, sidecar/packed.py): the codec, and the server's answers
against the data and against the `batch` op, over the real socket server."""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar import packed
from sidecar.client import AsyncSidecarClient, BadRequestError, ServerError, SidecarClient
from sidecar.ids import BadRequest
from sidecar.packed import MAX_SEGMENTS, pack_batch, unpack_answers, unpack_request
from sidecar.replica.runner import Replica
from tests.logtools import SidecarThread
from tests.test_sidecar_uds import FakeFallback, Raw

MAX = 2**64 - 1
SEGMENTS = {
    "vip": BitMap64([0, 1, 2, 3, 2**32, MAX]),
    "cart:30m": BitMap64(range(100, 200)),
    "empty.seg": BitMap64(),
}
KNOWN = sorted(SEGMENTS)
#: users worth asking about: members, their neighbours, the range's ends
USERS = st.one_of(
    st.sampled_from([0, 1, 4, 99, 100, 150, 199, 200, 2**32 - 1, 2**32, 2**63, MAX - 1, MAX]),
    st.integers(0, MAX),
)
NAMES = st.sampled_from([*KNOWN, "never_published"])
_SLOW = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def truth(user: int, segment: str) -> bool | None:
    bm = SEGMENTS.get(segment)
    return None if bm is None else user in bm


# -- the codec ------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, MAX), st.text(min_size=1, max_size=8)), max_size=300))
def test_codec_round_trip(items: list[tuple[int, str]]) -> None:
    users = [u for u, _ in items]
    segs = [s for _, s in items]
    names, packed, index = pack_batch(users, segs)
    assert len(set(names)) == len(names) and set(names) == set(segs)
    got_names, got_users, positions = unpack_request(names, packed, index)
    assert list(got_users) == users
    if items:
        assert positions is not None
        assert [got_names[p] for p in positions] == segs


@given(st.lists(st.integers(0, MAX), max_size=200), st.text(min_size=1, max_size=8))
def test_codec_one_segment(users: list[int], segment: str) -> None:
    names, packed, index = pack_batch(users, segment)
    assert names == [segment] and index == b""
    got_names, got_users, positions = unpack_request(names, packed, index)
    assert list(got_users) == users and positions is None


@given(st.lists(st.integers(0, MAX), max_size=100))
def test_uint64_arrays_are_taken_as_they_are(users: list[int]) -> None:
    expected = pack_batch(users, "s")
    assert pack_batch(array("Q", users), "s") == expected
    assert pack_batch(np.array(users, dtype=np.uint64), "s") == expected
    assert pack_batch(tuple(users), "s") == expected
    assert pack_batch(iter(users), "s") == expected


@given(st.lists(st.sampled_from([0, 1, 2]), max_size=100))
def test_answers_decode(codes: list[int]) -> None:
    assert unpack_answers(bytes(codes)) == [(False, True, None)[c] for c in codes]


@pytest.mark.parametrize(
    ("users", "segments", "needle"),
    [
        ([-1], "s", "unsigned 64-bit"),
        ([2**64], "s", "unsigned 64-bit"),
        (["1"], "s", "unsigned 64-bit"),
        (b"\x00" * 8, "s", "not a string or bytes"),
        ([1, 2], ["a"], "2 users but 1 segments"),
        ([1], [["a"]], "segments must be strings"),
    ],
)
def test_client_side_bad_input(users: object, segments: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        pack_batch(users, segments)  # type: ignore[arg-type]


def test_answers_reject_garbage() -> None:
    with pytest.raises(ValueError, match="malformed"):
        unpack_answers(b"\x03")


def test_too_many_segments() -> None:
    segs = [f"s{i}" for i in range(MAX_SEGMENTS + 1)]
    with pytest.raises(ValueError, match="distinct segments"):
        pack_batch([0] * len(segs), segs)
    with pytest.raises(BadRequest, match="at most"):
        unpack_request(segs, b"", b"")


# -- the C packers (`_native.pack_u64`, `pack_index`, `answers`) against the Python path -------

_PLAIN = ("_pack_u64", "_pack_index", "_answers")
#: items the C packers leave to Python (None) or must refuse as Python does
ODD_USERS = st.one_of(
    USERS,
    st.sampled_from([-1, -(2**63), 2**63 - 1, 2**63, 2**64, 2**70, True, False, 1.0, "1", None]),
)
ODD_SEGMENTS = st.one_of(NAMES, st.text(max_size=4), st.sampled_from([1, None, b"vip", ("vip",)]))


def _python_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PLAIN:
        monkeypatch.setattr(packed, name, None)


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except ValueError as exc:
        return ("error", str(exc))


def test_the_c_packers_are_built() -> None:
    """The comparisons below mean something only when the C path is there."""
    assert all(getattr(packed, name) is not None for name in _PLAIN)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(ODD_USERS, max_size=60),
    st.one_of(st.lists(ODD_SEGMENTS, max_size=60), NAMES),
    st.sampled_from([list, tuple]),
)
def test_c_packing_equals_python(users: list[Any], segs: Any, kind: Any) -> None:
    """Same bytes, same error message; the distinct ids in any order, the index agreeing."""
    if not isinstance(segs, str) and len(segs) != len(users) and segs:
        segs = (segs * (len(users) // len(segs) + 1))[: len(users)]
    args = (kind(users), segs if isinstance(segs, str) else kind(segs))
    fast = _outcome(pack_batch, *args)
    with pytest.MonkeyPatch.context() as mp:
        _python_only(mp)
        slow = _outcome(pack_batch, *args)
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "error":
        assert fast == slow
        return
    (names, users_c, index_c), (names_py, users_py, index_py) = fast[1], slow[1]
    assert users_c == users_py and sorted(map(repr, names)) == sorted(map(repr, names_py))
    if index_c:
        got = [names[p] for p in array("H", index_c)]
        want = [names_py[p] for p in array("H", index_py)]
        assert got == want == list(args[1])


def test_c_index_keeps_first_appearance_and_equal_strings_apart_from_identity() -> None:
    """Equal ids given as different str objects are one segment; a repeated object too."""
    a, b = "seg" + str(1), "seg" + str(1)
    assert a is not b
    names, _, index = pack_batch([1, 2, 3, 4], [a, "x", b, a])
    assert names == ["seg1", "x"] and list(array("H", index)) == [0, 1, 0, 0]


def test_c_index_refuses_too_many_segments_as_python_does() -> None:
    segs = [f"s{i}" for i in range(MAX_SEGMENTS + 1)]
    with pytest.raises(ValueError, match="distinct segments"):
        pack_batch([0] * len(segs), segs)
    names, _, index = pack_batch([0] * MAX_SEGMENTS, segs[:MAX_SEGMENTS])
    assert len(names) == MAX_SEGMENTS and array("H", index)[-1] == MAX_SEGMENTS - 1


@given(st.binary(max_size=300))
def test_c_answers_equal_python(data: bytes) -> None:
    fast = _outcome(unpack_answers, data)
    with pytest.MonkeyPatch.context() as mp:
        _python_only(mp)
        assert _outcome(unpack_answers, data) == fast


def test_client_without_the_c_packers(
    monkeypatch: pytest.MonkeyPatch, client: SidecarClient
) -> None:
    """The whole call over the socket with the Python path (no C extension on the client)."""
    _python_only(monkeypatch)
    items = [(1, "vip"), (150, "cart:30m"), (2**32, "vip"), (7, "nope"), (MAX, "vip")]
    assert client.batch_packed([u for u, _ in items], [s for _, s in items]) == [
        truth(u, s) for u, s in items
    ]


# -- the server -------------------------------------------------------------------------------


@_SLOW
@given(st.lists(st.tuples(USERS, NAMES), max_size=400))
def test_answers_equal_the_data_and_the_batch_op(
    client: SidecarClient, items: list[tuple[int, str]]
) -> None:
    users = [u for u, _ in items]
    segs = [s for _, s in items]
    expected = [truth(u, s) for u, s in items]
    assert client.batch_packed(users, segs) == expected
    assert client.batch(items) == expected


@_SLOW
@given(st.lists(USERS, max_size=400), NAMES)
def test_one_segment_answers_equal_the_data(
    client: SidecarClient, users: list[int], segment: str
) -> None:
    assert client.batch_packed(users, segment) == [truth(u, segment) for u in users]


def test_wire_form(uds_server: SidecarThread) -> None:
    raw = Raw(uds_server.uds_path)
    users = array("Q", [1, 150, 4, 7]).tobytes()
    index = array("H", [0, 1, 0, 2]).tobytes()
    assert raw.call(1, "batch_packed", ["vip", "cart:30m", "nope"], users, index) == [
        1,
        0,
        b"\x01\x01\x00\x02",
    ]
    assert raw.call(2, "batch_packed", ["cart:30m"], users, b"") == [2, 0, b"\x00\x01\x00\x00"]
    assert raw.call(3, "batch_packed", [], b"", b"") == [3, 0, b""]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["vip", b"", b""], "segments must be an array"),
        ([["vip"], [1, 2], b""], "users must be bin"),
        ([["vip"], b"\x00" * 7, b""], "8 bytes per user"),
        ([["vip"], b"\x00" * 8, None], "index must be bin"),
        ([["vip", "cart:30m"], b"\x00" * 8, b""], "empty index needs exactly one segment"),
        ([["vip"], b"\x00" * 16, b"\x00\x00"], "2 bytes per user"),
        ([["vip"], b"\x00" * 8, b"\x01\x00"], "refers to segment 1"),
        ([[], b"\x00" * 8, b"\x00\x00"], "segments is empty"),
        ([["bad id!"], b"\x00" * 8, b""], "segments[0]"),
        ([["vip", 5], b"\x00" * 8, b"\x00\x00"], "segments[1]"),
        ([["vip"], b"\x00" * 8], "takes 3 arguments"),
    ],
)
def test_bad_requests_fail_whole_and_keep_the_connection(
    uds_server: SidecarThread, args: list[object], needle: str
) -> None:
    raw = Raw(uds_server.uds_path)
    rid, status, message = raw.call(7, "batch_packed", *args)
    assert (rid, status) == (7, 1)
    assert needle in message
    assert raw.call(8, "ping") == [8, 0, "pong"]


def test_raw_answers(client: SidecarClient) -> None:
    users = array("Q", [1, 150, 4, 2**32])
    assert client.batch_packed(users, ["vip", "cart:30m", "vip", "nope"], raw=True) == (
        b"\x01\x01\x00\x02"
    )
    answers = client.batch_packed(np.arange(98, 102, dtype=np.uint64), "cart:30m", raw=True)
    assert np.frombuffer(answers, np.uint8).tolist() == [0, 0, 1, 1]


def test_a_malformed_result_is_a_server_error(workdir: Path) -> None:
    """A server that answers batch_packed with something else than answer bytes."""
    import socket
    import struct
    import threading

    import msgpack

    path = str(workdir / "liar.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    answers = [[True, False], b"\x01\x07"]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for result in answers:
                (length,) = struct.unpack(">I", conn.recv(4))
                rid = msgpack.unpackb(conn.recv(length))[0]
                body = msgpack.packb([rid, 0, result])
                conn.sendall(struct.pack(">I", len(body)) + body)

    threading.Thread(target=serve, daemon=True).start()
    with SidecarClient(path, timeout=5) as liar:
        with pytest.raises(ServerError, match="malformed"):
            liar.batch_packed([1, 2], "vip")
        with pytest.raises(ServerError, match="malformed"):
            liar.batch_packed([1, 2], "vip", raw=True)
    listener.close()


def test_client_errors(client: SidecarClient) -> None:
    with pytest.raises(BadRequestError, match="unsigned 64-bit"):
        client.batch_packed([-1], "vip")
    with pytest.raises(BadRequestError, match="not a valid segment id"):
        client.batch_packed([1], "bad id!")
    assert client.batch_packed([], "vip") == []
    assert client.batch_packed([], []) == []
    assert client.ping() == "pong"


def test_async_client(uds_server: SidecarThread) -> None:
    async def main() -> None:
        async with AsyncSidecarClient(uds_server.uds_path, timeout=5) as c:
            assert await c.batch_packed([1, 150, 4], ["vip", "cart:30m", "nope"]) == [
                True,
                True,
                None,
            ]
            assert await c.batch_packed(np.array([2**32, 5], dtype=np.uint64), "vip") == [
                True,
                False,
            ]
            with pytest.raises(BadRequestError):
                await c.batch_packed([1, 2], ["vip"])

    asyncio.run(main())


# -- with a fallback ------------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeFallback:
    return FakeFallback({1: {"remote_seg": 4}, 150: {"other": 2}})


@pytest.fixture
def fb_client(replica: Replica, workdir: Path, fake: FakeFallback) -> Iterator[SidecarClient]:
    with (
        SidecarThread(replica, fake, uds_path=workdir / "f.sock", http_host=None) as s,
        SidecarClient(s.uds_path, timeout=5) as c,
    ):
        yield c


def test_fallback_answers_what_is_not_local(fb_client: SidecarClient, fake: FakeFallback) -> None:
    users = [1, 1, 150, 150, 4, 1]
    segs = ["remote_seg", "vip", "other", "remote_seg", "vip", "x"]
    assert fb_client.batch_packed(users, segs) == [True, True, True, False, False, False]
    assert sorted(fake.calls) == [1, 150]  # one call per user, none for local answers
    fake.calls.clear()
    assert fb_client.batch_packed([4, 150], "vip") == [False, False]
    assert fake.calls == []


def test_fallback_that_cannot_answer_gives_unknown(
    fb_client: SidecarClient, fake: FakeFallback
) -> None:
    fake.answer_none = True
    assert fb_client.batch_packed([1, 1], ["remote_seg", "vip"]) == [None, True]
