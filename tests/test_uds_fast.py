"""The socket server's check in C (`_native.FastCheck`, sidecar/server/uds.py): it answers a
frame exactly when the inline Python path would, with the same bytes and the same counts, and
leaves everything else (other ops, other encodings, bad requests, several or partial frames,
the request the latency sampler picks) to Python without changing anything."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from sidecar.partitioner import partition_for
from sidecar.protocol import check_layout, encode_request, encode_response
from sidecar.record import Heartbeat, delta_key, encode
from sidecar.replica import Replica, SegmentState, recovery
from sidecar.replica.engine import Engine
from sidecar.replica.expiry import ExpiryIndex
from sidecar.server.metrics import OK_KEYS
from sidecar.server.queries import Queries
from sidecar.server.results import LOCAL
from sidecar.server.uds import LATENCY_SAMPLE_MASK, UdsServer, _Connection
from sidecar.transport.logdir import LogDirTransport
from tests.logtools import publish_raw
from tests.test_batch_native import HIGH, SHAPES, STATES, _replica

KEY = OK_KEYS[LOCAL]


class Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass


def _server(tmp: Path, segments: dict[str, tuple[str, set[int], bool]], ready: bool) -> Any:
    uds = UdsServer(Queries(_replica(tmp, segments, ready)), tmp / "s.sock")
    assert uds.fast_check is not None
    for name in segments:  # the names the general path has validated, as after a first ask
        uds.queries.names.check(name)
    return uds


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _uint(v: int, width: int) -> bytes:
    """msgpack uint of `width` bytes (0: the shortest), as other encoders may write it."""
    if width == 0:
        return msgpack.packb(v)
    code = {1: 0xCC, 2: 0xCD, 4: 0xCE, 8: 0xCF}[width]
    return bytes([code]) + v.to_bytes(width, "big")


@st.composite
def requests(draw: st.DrawFn, names: list[str]) -> bytes:
    """A frame: mostly checks in the client's encoding, some in encodings the C path leaves
    to Python (str8 op, array16, wider ints), some not checks at all."""
    rid = draw(st.one_of(st.integers(0, 300), st.integers(0, HIGH), st.integers(-5, -1)))
    user: Any = draw(
        st.one_of(
            st.integers(0, HIGH), st.sampled_from([0, 1, HIGH]), st.integers(-3, -1), st.booleans()
        )
    )
    seg: Any = draw(
        st.one_of(
            st.sampled_from(names),
            st.just("nosuch"),
            st.just("bad id!"),
            st.integers(-(2**63), HIGH),
        )
    )
    shape = draw(st.sampled_from(["client"] * 6 + ["wide", "str8", "array16", "ping", "extra"]))
    if shape == "client":
        return encode_request(rid, "check", (user, seg), 1 << 20)
    if shape == "ping":
        return encode_request(rid, "ping", (), 1 << 20)
    if shape == "extra":  # five elements
        return encode_request(rid, "check", (user, seg, 1), 1 << 20)
    if type(user) is not int or user < 0 or rid < 0 or type(seg) is not str:
        return encode_request(rid, "check", (user, seg), 1 << 20)
    if shape == "wide":
        body = (
            b"\x94"
            + _uint(rid, draw(st.sampled_from([0, 8])))
            + b"\xa5check"
            + _uint(user, draw(st.sampled_from([0, 8])))
            + msgpack.packb(seg)
        )
        return _frame(body)
    if shape == "str8":
        return _frame(b"\x94" + msgpack.packb(rid) + b"\xd9\x05check" + msgpack.packb(user)
                      + msgpack.packb(seg))  # fmt: skip
    return _frame(b"\xdc\x00\x04" + msgpack.packb(rid) + b"\xa5check" + msgpack.packb(user)
                  + msgpack.packb(seg))  # fmt: skip


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    segments = {
        f"s{i}": (draw(st.sampled_from([s for s in STATES if s != "out"])), draw(SHAPES),
                  draw(st.booleans()))
        for i in range(draw(st.integers(1, 4)))
    }  # fmt: skip
    frames = draw(st.lists(requests(sorted(segments)), min_size=1, max_size=8))
    return {"segments": segments, "ready": draw(st.booleans()), "frames": frames}


def _python(uds: Any, frame: bytes) -> tuple[bytes, bool]:
    """The Python path's response to `frame` and whether its inline path answered it
    (counted, not timed)."""
    conn = _Connection(uds)
    conn.transport = Transport()  # type: ignore[assignment]
    conn.fast = None
    stats = uds.handlers["check"][2]
    counted, timed = stats.counts[KEY], sum(stats.latency.counts)
    uds.untimed = 0
    conn.data_received(frame)
    inline = stats.counts[KEY] == counted + 1 and sum(stats.latency.counts) == timed
    assert len(conn.transport.out) == 1  # type: ignore[attr-defined]
    return conn.transport.out[0], inline  # type: ignore[attr-defined]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
def test_c_answers_exactly_what_the_inline_path_answers(
    tmp_path_factory: pytest.TempPathFactory, case: dict[str, Any]
) -> None:
    uds = _server(tmp_path_factory.mktemp("f"), case["segments"], case["ready"])
    counts = uds.handlers["check"][2].counts
    for frame in case["frames"]:
        want, inline = _python(uds, frame)
        uds.untimed = 0
        before = counts[KEY]
        got = uds.fast_check(frame)
        if got is None:
            assert counts[KEY] == before and uds.untimed == 0
            # what C leaves to Python is never an inline answer in the client's encoding
            assert not (inline and _client_encoded(frame)), frame
        else:
            assert inline, frame
            assert got == want
            assert counts[KEY] == before + 1 and uds.untimed == 1


def _client_encoded(frame: bytes) -> bool:
    req = msgpack.unpackb(frame[4:])
    return encode_request(req[0], req[1], req[2:], 1 << 20) == frame


def test_the_sampled_request_is_left_to_python(tmp_path: Path) -> None:
    uds = _server(tmp_path, {"s0": ("fresh", {1, 2}, False)}, True)
    frame = encode_request(7, "check", (1, "s0"), 1 << 20)
    uds.untimed = LATENCY_SAMPLE_MASK  # the next request wraps to 0: timed
    assert uds.fast_check(frame) is None and uds.untimed == LATENCY_SAMPLE_MASK
    uds.untimed = LATENCY_SAMPLE_MASK - 1
    assert uds.fast_check(frame) == encode_response(7, 0, True)
    assert uds.untimed == LATENCY_SAMPLE_MASK


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00\x00",
        encode_request(1, "check", (1, "s0"), 1 << 20)[:-1],  # partial
        encode_request(1, "check", (1, "s0"), 1 << 20) * 2,  # two frames
        _frame(b"\x94\x01\xa5check\x01\xa2s0\xc0"),  # a byte after the request
        _frame(b"\x94\x01\xa5check\x01\xa3s0"),  # a string cut short
        _frame(b"\x94\x01\xa5check\x01\xa2\xff\xfe"),  # not UTF-8
        _frame(b"\x94\x01\xa5chec"),
        b"\xff\xff\xff\xff" + b"x" * 8,  # over the frame limit
    ],
)
def test_frames_it_does_not_take(tmp_path: Path, frame: bytes) -> None:
    uds = _server(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    before = dict(uds.handlers["check"][2].counts)
    assert uds.fast_check(frame) is None
    assert uds.handlers["check"][2].counts == before and uds.untimed == 0


def test_a_connection_with_responses_owed_keeps_its_order(tmp_path: Path) -> None:
    """While a fallback response is owed, a check answered from memory queues behind it."""
    uds = _server(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    conn = _Connection(uds)
    conn.transport = Transport()  # type: ignore[assignment]
    frame = encode_request(3, "check", (1, "s0"), 1 << 20)
    conn.data_received(frame)
    assert conn.transport.out == [encode_response(3, 0, True)]  # type: ignore[attr-defined]
    from sidecar.server.uds import _Slot

    conn.pending.append(_Slot())
    conn.data_received(frame)
    assert len(conn.transport.out) == 1 and len(conn.pending) == 2  # type: ignore[attr-defined]
    assert conn.pending[1].data == encode_response(3, 0, True)


def test_without_the_extension_python_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidecar.server.uds as uds_module

    monkeypatch.setattr(uds_module, "native_or_none", lambda: None)
    uds = UdsServer(
        Queries(_replica(tmp_path, {"s0": ("fresh", {1}, False)}, True)), tmp_path / "s"
    )
    assert uds.fast_check is None
    conn = _Connection(uds)
    conn.transport = Transport()  # type: ignore[assignment]
    for rid in range(LATENCY_SAMPLE_MASK + 2):  # every path: inline, and the sampled one
        conn.data_received(encode_request(rid, "check", (1, "s0"), 1 << 20))
    assert conn.transport.out == [  # type: ignore[attr-defined]
        encode_response(rid, 0, True) for rid in range(LATENCY_SAMPLE_MASK + 2)
    ]
    stats = uds.handlers["check"][2]
    # timed: the first (its name not validated yet: the general path) and the sampled one
    assert stats.counts[KEY] == LATENCY_SAMPLE_MASK + 2 and sum(stats.latency.counts) == 2


def test_a_state_swapped_in_under_a_serving_replica_is_not_answered_past_its_max_age(
    tmp_path: Path,
) -> None:
    """A serving replica whose log got a new identity bootstraps aside and adopts the new
    state (`Engine.adopt`). A segment the new log says is past its max age (heard long ago)
    is stale from the swap on, on every check path, not only after the next poll."""
    old = LogDirTransport(tmp_path / "old")
    publish_raw(old, {"s0": BitMap64([1, 2])})
    new = LogDirTransport(tmp_path / "new")
    state = publish_raw(new, {"s0": BitMap64([1, 2])})
    with new.writer("test-publisher") as w, w.transaction():  # a 1 s max age, heard at 0
        beat = encode(Heartbeat("s0", state.segments["s0"][0], 1, 0))
        w.append("deltas", partition_for("s0", w.partitions), delta_key("s0"), beat)
    replica = Replica(old)
    reader = old.reader()
    recovery.bootstrap(reader, replica.engine)
    reader.close()
    replica.ready = True
    uds = UdsServer(Queries(replica), tmp_path / "s.sock")
    uds.queries.names.check("s0")
    frame = encode_request(7, "check", (1, "s0"), 1 << 20)
    assert replica.contains(1, "s0") is True
    assert uds.fast_check is not None and uds.fast_check(frame) == encode_response(7, 0, True)
    reader = new.reader()
    replica._bootstrap_again(reader, new.identity())
    reader.close()
    assert replica.local("s0") == "stale_age"
    assert replica.contains(1, "s0") is None
    assert uds.fast_check(frame) is None
    want, inline = _python(uds, frame)
    assert want == encode_response(7, 0, None) and not inline


def test_the_encoding_is_protocols(tmp_path: Path) -> None:
    """The C path writes the bytes `protocol.check_layout` gives it and owns none itself."""
    from sidecar.shm import native_or_none

    uds = _server(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    head, op, resp_head, no, yes = check_layout()
    fast = native_or_none().FastCheck(  # type: ignore[union-attr]
        uds.valid_names, uds.replica.native_local, {}, KEY, 1 << 20, LATENCY_SAMPLE_MASK,
        (head, op, resp_head, b"\x07\xc2", b"\x07\xc3"),
    )  # fmt: skip
    frame = encode_request(7, "check", (1, "s0"), 1 << 20)
    assert fast.answer(frame) == b"\x00\x00\x00\x04\x93\x07\x07\xc3"
    with pytest.raises(TypeError):  # the rule is the replica's LocalCheck, nothing else
        native_or_none().FastCheck(  # type: ignore[union-attr]
            uds.valid_names, uds.replica, {}, KEY, 1 << 20, 15, check_layout()
        )


def test_adopt_drops_the_memberships_that_expired_while_the_state_was_built(
    tmp_path: Path,
) -> None:
    """`Engine.adopt` takes a state built aside (a bootstrap that may take minutes): a TTL
    member whose deadline passed meanwhile is gone at the swap, on every check path, not at
    the next `expire` (the replica thread's next poll)."""
    replica = _replica(tmp_path, {"s0": ("fresh", {1}, False)}, True)
    uds = UdsServer(Queries(replica), tmp_path / "s.sock")
    uds.queries.names.check("s0")
    fresh = Engine(replica.holds, clock_ms=replica.engine.clock_ms)
    fresh.install(
        "s0", SegmentState(BitMap64([1, 2]), 3, 2, 0), expiries=ExpiryIndex({1: BitMap64([2])})
    )  # user 2's membership expired at 1 ms past the epoch
    replica.engine.adopt(fresh)
    assert replica.contains(1, "s0") is True and replica.contains(2, "s0") is False
    assert replica.engine.segments["s0"].cardinality == 1
    frame = encode_request(7, "check", (2, "s0"), 1 << 20)
    assert uds.fast_check is not None and uds.fast_check(frame) == encode_response(7, 0, False)
