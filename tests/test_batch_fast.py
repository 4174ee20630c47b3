"""The socket server's `batch_packed` in C (`_native.FastBatch`, sidecar/server/uds.py): it
answers a frame exactly when every segment is answered from memory (a ready replica, fresh
segments not past their max age, names already validated) with the bytes the Python path
writes and the same stats, and leaves everything else (unknown or stale segments, a replica
not ready, empty batches, malformed frames, other ops) to Python without changing anything.
An extension built before it leaves every batch to Python, with a warning."""

from __future__ import annotations

import asyncio
import logging
import struct
import types
from array import array
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

import sidecar.shm as shm
from sidecar.packed import MAX_SEGMENTS, UNKNOWN, pack_batch
from sidecar.protocol import BAD_REQUEST, OK, batch_packed_layout, encode_request
from sidecar.replica.state import SegmentState
from sidecar.server.metrics import OK_KEYS
from sidecar.server.queries import Queries
from sidecar.server.results import LOCAL
from sidecar.server.uds import UdsServer, _Connection
from sidecar.shm import native_or_none
from tests.test_batch_native import HIGH, SHAPES, STATES, MapFallback, _form, _replica, spread
from tests.test_native_abi import _install, loader  # noqa: F401  (loader: a fixture)
from tests.test_uds_fast import Transport

KEY = OK_KEYS[LOCAL]
#: users worth asking about: the ends of the id range and their neighbours, and any
USERS = st.one_of(
    st.sampled_from([0, 1, 2**32, 2**63 - 1, 2**63, HIGH - 1, HIGH]), st.integers(0, HIGH)
)


def _server(tmp: Path, segments: dict[str, tuple[str, set[int], bool]], ready: bool) -> Any:
    uds = UdsServer(Queries(_replica(tmp, segments, ready)), tmp / "s.sock")
    assert uds.fast_batch is not None
    return uds


def _stats(uds: Any) -> tuple[dict[Any, int], int]:
    stats = uds.handlers["batch_packed"][2]
    return dict(stats.counts), sum(stats.latency.counts)


def _python(uds: Any, frame: bytes) -> bytes:
    """The Python path's response to `frame` (no fallback: always synchronous)."""
    conn = _Connection(uds)
    conn.transport = Transport()  # type: ignore[assignment]
    conn.fast = conn.fast_batch = None
    conn.data_received(frame)
    assert len(conn.transport.out) == 1  # type: ignore[attr-defined]
    return conn.transport.out[0]  # type: ignore[attr-defined,no-any-return]


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _head(kind: str, n: int, width: int) -> bytes:
    """A msgpack header for `n` items or bytes, at least `width` bytes wide (0: shortest), as
    other encoders may write it."""
    if kind == "array":
        if width == 0 and n < 16:
            return bytes([0x90 | n])
        if width <= 2 and n < 2**16:
            return b"\xdc" + n.to_bytes(2, "big")
        return b"\xdd" + n.to_bytes(4, "big")
    if kind == "str" and width == 0 and n < 32:
        return bytes([0xA0 | n])
    codes = {"str": (0xD9, 0xDA, 0xDB), "bin": (0xC4, 0xC5, 0xC6)}[kind]
    for code, w in zip(codes, (1, 2, 4), strict=True):
        if w >= width and n < 2 ** (8 * w):
            return bytes([code]) + n.to_bytes(w, "big")
    raise AssertionError("too long")


def encode(rid: int, segs: list[str], users: bytes, index: bytes, widths: tuple[int, ...]) -> bytes:
    """`[rid, "batch_packed", segs, users, index]` with its headers at the given widths."""
    head, op, _, _ = batch_packed_layout()
    body = head + msgpack.packb(rid) + op + _head("array", len(segs), widths[0])
    for s in segs:
        raw = s.encode()
        body += _head("str", len(raw), widths[1]) + raw
    body += _head("bin", len(users), widths[2]) + users
    body += _head("bin", len(index), widths[3]) + index
    return _frame(body)


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    segments: dict[str, tuple[str, set[int], bool]] = {}
    for i in range(draw(st.integers(1, 5))):
        state = draw(st.sampled_from(["fresh"] * 4 + list(STATES)))
        segments[f"out{i}" if state == "out" else f"s{i}"] = (
            state, draw(SHAPES), draw(st.booleans())
        )  # fmt: skip
    names = sorted(segments)
    requests = []
    for _ in range(draw(st.integers(1, 4))):
        asked = draw(st.lists(st.sampled_from([*names, "never_published"]), min_size=1, max_size=4))
        items: list[tuple[int, int]] = []
        for _ in range(draw(st.integers(0, 60))):
            j = draw(st.integers(0, len(asked) - 1))
            members = sorted(segments.get(asked[j], ("", set(), False))[1])
            if members and draw(st.booleans()):  # a member, or its neighbour
                user = members[draw(st.integers(0, len(members) - 1))]
                user = min(HIGH, user + draw(st.integers(0, 1)))
            else:
                user = draw(USERS)
            items.append((user, j))
        if items and draw(st.booleans()):  # duplicates
            items += draw(st.lists(st.sampled_from(items), max_size=10))
        one = len(asked) == 1 and draw(st.booleans())  # an empty index
        widths = tuple(draw(st.sampled_from([0, 0, 1, 2, 4])) for _ in range(4))
        requests.append((draw(st.integers(0, HIGH)), asked, items, one, widths))
    return {"segments": segments, "ready": draw(st.booleans()), "requests": requests}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
def test_c_answers_exactly_what_python_and_the_model_answer(
    tmp_path_factory: pytest.TempPathFactory, case: dict[str, Any]
) -> None:
    segments = case["segments"]
    uds = _server(tmp_path_factory.mktemp("fb"), segments, case["ready"])

    def here(seg: str) -> bool:
        return case["ready"] and segments.get(seg, ("",))[0] == "fresh"

    for rid, asked, items, one, widths in case["requests"]:
        users = array("Q", [u for u, _ in items]).tobytes()
        index = b"" if one else array("H", [j for _, j in items]).tobytes()
        frame = encode(rid, asked, users, index, widths)
        local = all(here(s) for s in asked)
        model = bytes(  # the fallback-less server: unknown where not answered from memory
            (u in segments[asked[j]][1]) if here(asked[j]) else UNKNOWN for u, j in items
        )
        for _ in range(2):  # the names are valid once Python has seen them
            validated = all(s in uds.valid_names for s in asked)
            before = _stats(uds)
            got = uds.fast_batch(frame)
            if got is None:
                assert _stats(uds) == before  # nothing changed
                assert not (validated and local and items), (asked, items)
                want = _python(uds, frame)
                assert msgpack.unpackb(want[4:]) == [rid, OK, model]
                continue
            assert validated and local and items
            counts, timed = _stats(uds)
            assert counts[KEY] == before[0][KEY] + 1 and timed == before[1] + 1
            assert got == _python(uds, frame)
            assert msgpack.unpackb(got[4:]) == [rid, OK, model]


def _good(uds: Any) -> None:
    for name in ("s0", "s1"):
        uds.queries.names.check(name)


MALFORMED = {
    "empty": b"",
    "short header": b"\x00\x00",
    "partial": encode(1, ["s0"], b"\x01" + b"\x00" * 7, b"", (0,) * 4)[:-1],
    "two frames": encode(1, ["s0"], b"\x01" + b"\x00" * 7, b"", (0,) * 4) * 2,
    "a byte after": _frame(encode(1, ["s0"], b"\x00" * 8, b"", (0,) * 4)[4:] + b"\xc0"),
    "users not 8 bytes each": encode(1, ["s0"], b"\x00" * 7, b"", (0,) * 4),
    "users as str": _frame(msgpack.packb([1, "batch_packed", ["s0"], "x" * 8, b""])),
    "index too short": encode(1, ["s0", "s1"], b"\x00" * 16, b"\x00\x00", (0,) * 4),
    "no index, two segments": encode(1, ["s0", "s1"], b"\x00" * 8, b"", (0,) * 4),
    "index past the segments": encode(1, ["s0", "s1"], b"\x00" * 8, b"\x02\x00", (0,) * 4),
    "no segments": encode(1, [], b"\x00" * 8, b"", (0,) * 4),
    "a segment not a str": _frame(msgpack.packb([1, "batch_packed", [5], b"\x00" * 8, b""])),
    "a segment id not valid": encode(1, ["bad id!"], b"\x00" * 8, b"", (0,) * 4),
    "segment not UTF-8": _frame(
        b"\x95\x01"
        + batch_packed_layout()[1]
        + b"\x91\xa2\xff\xfe\xc4\x08"
        + bytes(8)
        + b"\xc4\x00"
    ),
    "a negative id": _frame(msgpack.packb([-1, "batch_packed", ["s0"], b"\x00" * 8, b""])),
    "four arguments": _frame(msgpack.packb([1, "batch_packed", ["s0"], b"\x00" * 8, b"", 1])),
    "a check": encode_request(1, "check", (1, "s0"), 1 << 20),
    "cut in the users": encode(1, ["s0"], b"\x00" * 16, b"", (0,) * 4)[:-6],
    "over the frame limit": b"\xff\xff\xff\xff" + b"x" * 8,
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_frames_it_does_not_take_are_pythons(tmp_path: Path, name: str) -> None:
    """Nothing changed by the C path; a bad request gets Python's one-line error."""
    uds = _server(tmp_path, {"s0": ("fresh", {1}, False), "s1": ("fresh", {2}, True)}, True)
    _good(uds)
    frame = MALFORMED[name]
    before = _stats(uds), set(uds.valid_names)
    assert uds.fast_batch(frame) is None
    assert (_stats(uds), set(uds.valid_names)) == before
    if name in ("empty", "short header", "partial", "cut in the users", "over the frame limit"):
        return  # not a whole frame: the connection buffers it (or closes, oversize)
    if name == "two frames":
        return
    resp = msgpack.unpackb(_python(uds, frame)[4:])
    if name in ("a check",):
        assert resp[1] == OK
        return
    assert resp[1] != OK and "\n" not in resp[2], resp
    if name not in ("a negative id", "four arguments", "segment not UTF-8", "users as str"):
        assert resp[1] == BAD_REQUEST


def test_an_empty_batch_is_pythons(tmp_path: Path) -> None:
    uds = _server(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    _good(uds)
    for frame in (
        encode(3, ["s0"], b"", b"", (0,) * 4),
        encode_request(3, "batch_packed", pack_batch([], []), 1 << 20),
    ):
        assert uds.fast_batch(frame) is None
        assert msgpack.unpackb(_python(uds, frame)[4:]) == [3, OK, b""]


def test_too_many_segments_are_pythons(tmp_path: Path) -> None:
    uds = _server(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    _good(uds)
    segs = ["s0"] * (MAX_SEGMENTS + 1)
    frame = encode(1, segs, b"\x00" * 8, b"\x00\x00", (0,) * 4)
    assert uds.fast_batch(frame) is None
    resp = msgpack.unpackb(_python(uds, frame)[4:])
    assert resp[1] == BAD_REQUEST and "at most" in resp[2]


def test_a_state_swapped_between_batches_is_read_anew(tmp_path: Path) -> None:
    """The C path keeps nothing of a segment between frames: a new state (another form,
    other members), a stale one and a replica reset are all seen by the next batch."""
    uds = _server(tmp_path, {"s0": ("fresh", {1, HIGH}, False)}, True)
    _good(uds)
    engine = uds.replica.engine
    users = [1, 2, HIGH, 7]
    frame = encode_request(9, "batch_packed", pack_batch(users, "s0"), 1 << 20)

    def answers() -> Any:
        got = uds.fast_batch(frame)
        return None if got is None else msgpack.unpackb(got[4:])[2]

    assert answers() == b"\x01\x00\x01\x00"
    big = spread(5000, 3) | {2, 7}
    engine.segments["s0"] = SegmentState(_form(big, True), 3, len(big), 0)  # compact now
    assert answers() == bytes(u in big for u in users)
    engine.segments["s0"] = SegmentState(BitMap64([7]), 4, 1, 0)
    assert answers() == b"\x00\x00\x00\x01"
    uds.replica.aged.add("s0")  # past its max age: Python's (unknown, no fallback)
    assert answers() is None
    assert msgpack.unpackb(_python(uds, frame)[4:])[2] == bytes([UNKNOWN] * 4)
    uds.replica.aged.discard("s0")
    assert answers() == b"\x00\x00\x00\x01"
    engine.segments.clear()  # dropped
    assert answers() is None


def test_a_segment_not_held_goes_to_the_fallback(tmp_path: Path) -> None:
    """One segment not answered locally sends the whole frame through Python, which asks
    the fallback for those users only and answers the others from memory."""
    segs = {"s0": ("fresh", {1, 2}, False), "s1": ("stale", {3}, False)}
    uds = UdsServer(
        Queries(_replica(tmp_path, segs, True), MapFallback({3: {"s1": 1}, 4: {}})),
        tmp_path / "s.sock",
    )
    _good(uds)
    frame = encode_request(
        5, "batch_packed", pack_batch([1, 3, 4, 2, 9], ["s0", "s1", "s1", "s0", "s1"]), 1 << 20
    )
    assert uds.fast_batch(frame) is None

    async def go() -> list[bytes]:
        conn = _Connection(uds)
        conn.transport = Transport()  # type: ignore[assignment]
        conn.data_received(frame)
        await asyncio.gather(*conn.tasks)
        return conn.transport.out  # type: ignore[attr-defined,no-any-return]

    out = asyncio.run(go())
    assert [msgpack.unpackb(o[4:]) for o in out] == [[5, OK, b"\x01\x01\x00\x01\x02"]]
    assert sorted(uds.queries.fallback.calls) == [3, 4, 9]  # type: ignore[attr-defined]


def test_a_connection_answers_batches_in_c_and_in_order(tmp_path: Path) -> None:
    uds = _server(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    conn = _Connection(uds)
    conn.transport = Transport()  # type: ignore[assignment]
    frame = encode_request(3, "batch_packed", pack_batch([1, 2], "s0"), 1 << 20)
    for _ in range(3):  # the first validates the name (Python), the others are C's
        conn.data_received(frame)
    assert conn.transport.out == [_python(uds, frame)] * 3  # type: ignore[attr-defined]
    assert uds.handlers["batch_packed"][2].counts[KEY] == 4  # _python's too
    from sidecar.server.uds import _Slot

    conn.pending.append(_Slot())  # a response owed: the next one queues behind it
    conn.data_received(frame)
    assert len(conn.transport.out) == 3 and conn.pending[1].data == _python(uds, frame)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("loader")
def test_an_older_build_answers_in_python_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A build of another `_native.c` (one from before FastBatch: the loader's one ABI check,
    sidecar.shm.native) is refused with one warning; batch_packed is then Python's."""
    real = native_or_none()
    older = types.ModuleType("sidecar.shm._native")
    older.__dict__.update(real.__dict__)
    del older.FastBatch  # type: ignore[attr-defined]
    older.SOURCE_HASH = "an older source"  # type: ignore[attr-defined]
    monkeypatch.setattr(shm, "_loaded", None)
    _install(monkeypatch, older)
    with caplog.at_level(logging.WARNING, logger="sidecar.shm"):
        uds = UdsServer(
            Queries(_replica(tmp_path, {"s0": ("fresh", {1}, False)}, True)), tmp_path / "s"
        )
    assert uds.fast_batch is None
    assert [r for r in caplog.records if "an older source" in r.getMessage()]
    conn = _Connection(uds)
    conn.transport = Transport()  # type: ignore[assignment]
    frame = encode_request(4, "batch_packed", pack_batch([1, 2], "s0"), 1 << 20)
    conn.data_received(frame)
    conn.data_received(frame)
    got = [msgpack.unpackb(o[4:]) for o in conn.transport.out]  # type: ignore[attr-defined]
    assert got == [[4, OK, b"\x01\x00"]] * 2
    assert uds.handlers["batch_packed"][2].counts[KEY] == 2


def test_the_encoding_is_protocols(tmp_path: Path) -> None:
    """The C path writes the bytes `protocol.batch_packed_layout` gives it, and records with
    the callable and key it is given."""
    uds = _server(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    _good(uds)
    head, op, resp_head, _ = batch_packed_layout()
    seen: list[Any] = []
    fast = native_or_none().FastBatch(  # type: ignore[union-attr]
        uds.valid_names, uds.replica.native_local, lambda k, s: seen.append((k, s)), "k",
        1 << 20, MAX_SEGMENTS, (head, op, resp_head, b"\x07"),
    )  # fmt: skip
    frame = encode_request(7, "batch_packed", pack_batch([1, 2], "s0"), 1 << 20)
    assert fast.answer(frame) == b"\x00\x00\x00\x07\x93\x07\x07\xc4\x02\x01\x00"
    assert len(seen) == 1 and seen[0][0] == "k" and 0 <= seen[0][1] < 1
    with pytest.raises(TypeError):  # the rule is the replica's LocalCheck, nothing else
        native_or_none().FastBatch(  # type: ignore[union-attr]
            uds.valid_names, uds.replica, print, "k", 1 << 20, MAX_SEGMENTS, batch_packed_layout()
        )
    with pytest.raises(ValueError):
        native_or_none().FastBatch(  # type: ignore[union-attr]
            uds.valid_names, uds.replica.native_local, print, "k", 1 << 20, MAX_SEGMENTS,
            (head, b"x" * 40, resp_head, b"\x00"),
        )  # fmt: skip


def test_a_large_batch_over_the_real_sizes(tmp_path: Path) -> None:
    """Widths past the one-byte headers: 70,000 answers (bin32), 300 segments (array16)."""
    segs = {f"s{i}": ("fresh", spread(200, i), i % 2 == 0) for i in range(300)}
    uds = _server(tmp_path, segs, True)
    names = sorted(segs)
    for n in names:
        uds.queries.names.check(n)
    firsts = {n: sorted(segs[n][1]) for n in names}
    items = [
        (firsts[names[i % 300]][i % 200] + (i % 3 == 0), names[i % 300]) for i in range(70_000)
    ]
    users, seg_of = [u for u, _ in items], [s for _, s in items]
    frame = encode_request(11, "batch_packed", pack_batch(users, seg_of), 1 << 20)
    got = uds.fast_batch(frame)
    assert got is not None and got == _python(uds, frame)
    assert msgpack.unpackb(got[4:]) == [11, OK, bytes(u in segs[s][1] for u, s in items)]
