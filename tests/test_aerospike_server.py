"""The wire-level Aerospike test server, checked two ways.

1. Capture replay: every request frame of tests/vectors/aerospike-wire-capture.txt (real aerospike
   19.3.0 client <-> real Aerospike CE 8.1.2) is sent on a raw socket, in capture order, to a
   fresh server, and the response is compared field by field with the captured one.
2. The real ``aerospike`` client against the server: round trips, map operations, batches,
   fault knobs and a hypothesis model test of map put / remove-by-key.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aerospike
import pytest
from aerospike import exception as ae
from aerospike_helpers.operations import map_operations as mo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import aerospike_fixture
from tests.aerospike_fixture import client_config
from tests.aerospike_server import ThreadedAerospikeServer, msgpack_codec, wire

# The fixtures, bound here because only the root conftest may use pytest_plugins.
aerospike_server = aerospike_fixture.aerospike_server
aerospike_server_factory = aerospike_fixture.aerospike_server_factory
aerospike_client = aerospike_fixture.aerospike_client


def _find_capture() -> Path:
    """The capture is kept in the repository (tests/vectors/), a copy of the one in shared/."""
    return Path(__file__).resolve().parent / "vectors" / "aerospike-wire-capture.txt"


CAPTURE = _find_capture()
CAPTURE_NODE_ID = "BB901000000FC02"
SET = "users"


# ---------------------------------------------------------------------------------------
# capture parsing


@dataclass
class Exchange:
    number: int
    conn: int
    title: str
    request: bytes = b""
    responses: list[bytes] = field(default_factory=list)


_EXCHANGE_RE = re.compile(r"^\s*(?:info )?exchange #(\d+)(?: on conn (\d+)| conn=(\d+))")
_FRAME_RE = re.compile(r"^\s*\[(request|response)\s+#\d+\]")
_HEADER_RE = re.compile(r"proto header \(8 bytes\): ([0-9a-f]{16})")
_HEX_LINE_RE = re.compile(r"^\s*([0-9a-f]+)\s*$")
_CALL_RE = re.compile(r"^CALL: (.*)$")


def parse_capture(text: str) -> dict[int, Exchange]:
    """Exchanges with their raw request and response frames (first full listing wins)."""
    exchanges: dict[int, Exchange] = {}
    current: Exchange | None = None
    call = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := _CALL_RE.match(line):
            call = m.group(1)
        elif m := _EXCHANGE_RE.match(line):
            number = int(m.group(1))
            conn = int(m.group(2) or m.group(3))
            known = number in exchanges
            current = None if known else Exchange(number, conn, call)
            if current is not None:
                exchanges[number] = current
        elif current is not None and (m := _FRAME_RE.match(line)):
            kind = m.group(1)
            header = _HEADER_RE.search(lines[i + 1])
            assert header, f"no proto header after line {i + 1}"
            j = i + 3  # skip the "body (N bytes):" line
            body = []
            while j < len(lines) and (h := _HEX_LINE_RE.match(lines[j])):
                body.append(h.group(1))
                j += 1
            raw = bytes.fromhex(header.group(1) + "".join(body))
            if kind == "request":
                current.request = raw
            else:
                current.responses.append(raw)
            i = j
            continue
        i += 1
    return {n: e for n, e in exchanges.items() if e.request}


@pytest.fixture(scope="module")
def capture() -> dict[int, Exchange]:
    if not CAPTURE.exists():
        pytest.fail(f"capture file missing: {CAPTURE}")
    return parse_capture(CAPTURE.read_text())


# ---------------------------------------------------------------------------------------
# raw-socket replay


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf.extend(chunk)
    return bytes(buf)


def read_response(sock: socket.socket, request: bytes) -> list[bytes]:
    """Read one response: one frame, or for a batch every frame up to the LAST one."""
    _, ptype, _ = wire.parse_proto_header(request[:8])
    is_batch = ptype == wire.TYPE_MSG and request[9] & wire.INFO1_BATCH
    frames = []
    while True:
        header = _recv_exact(sock, 8)
        _, _, size = wire.parse_proto_header(header)
        frames.append(header + _recv_exact(sock, size))
        if not is_batch:
            return frames
        msgs = wire.parse_msgs(frames[-1][8:])
        if msgs and msgs[-1].info3 & wire.INFO3_LAST:
            return frames


@pytest.fixture(scope="module")
def replayed(capture: dict[int, Exchange]) -> dict[int, list[bytes]]:
    """Replay every captured request, in order, against one fresh server."""
    return replay(capture)


def replay(capture: dict[int, Exchange], **server_options: Any) -> dict[int, list[bytes]]:
    server = ThreadedAerospikeServer(node_id=CAPTURE_NODE_ID, **server_options).start()
    socks: dict[int, socket.socket] = {}
    try:
        out: dict[int, list[bytes]] = {}
        for number in sorted(capture):
            ex = capture[number]
            if ex.conn not in socks:
                socks[ex.conn] = socket.create_connection(("127.0.0.1", server.port), 5)
            sock = socks[ex.conn]
            sock.sendall(ex.request)
            out[number] = read_response(sock, ex.request)
        return out
    finally:
        for sock in socks.values():
            sock.close()
        server.stop()


# ---------------------------------------------------------------------------------------
# field-by-field comparison
#
# Compared: proto version and type; every as_msg header field except record_ttl; every
# field; every op's type, particle type, flags, bin name and value (integers as numbers,
# maps/lists as decoded msgpack *with key order*, and the raw value bytes); the number of
# frames. Info responses: the command echo and value of every line.
# Ignored: as_msg record_ttl (a void time: depends on the namespace default-ttl and the
# clock), the proto body size (follows from the fields compared), and in info the port
# inside "peers-clear-std" (the real server's 3000 vs this server's ephemeral port).

IGNORED_MSG_FIELDS = frozenset({"record_ttl"})


def _value(op: wire.Op) -> Any:
    if op.particle_type == wire.PT_INTEGER:
        return wire.decode_particle(op.particle_type, op.value).value
    if op.particle_type in (wire.PT_MAP, wire.PT_LIST):
        decoded = msgpack_codec.unpackb(op.value)
        return list(decoded.items()) if isinstance(decoded, dict) else decoded
    return op.value


def describe_msg(msg: wire.AsMsg) -> dict[str, Any]:
    out = {
        "info1": msg.info1,
        "info2": msg.info2,
        "info3": msg.info3,
        "info4": msg.info4,
        "result_code": msg.result_code,
        "generation": msg.generation,
        "record_ttl": msg.record_ttl,
        "transaction_ttl": msg.transaction_ttl,
        "fields": msg.fields,
        "ops": [
            {
                "op": o.op,
                "particle_type": o.particle_type,
                "flags": o.flags,
                "name": o.name,
                "value": _value(o),
                "raw": o.value,
            }
            for o in msg.ops
        ],
    }
    return {k: v for k, v in out.items() if k not in IGNORED_MSG_FIELDS}


def describe_info(body: bytes) -> list[tuple[str, str]]:
    lines = []
    for line in body.decode().split("\n"):
        if not line:
            continue
        cmd, _, value = line.partition("\t")
        if cmd == "peers-clear-std":
            gen, _, rest = value.partition(",")
            value = f"{gen},<port>,{rest.partition(',')[2]}"
        lines.append((cmd, value))
    return lines


def describe_frames(frames: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for raw in frames:
        version, ptype, size = wire.parse_proto_header(raw[:8])
        assert size == len(raw) - 8
        body = raw[8:]
        entry: dict[str, Any] = {"version": version, "type": ptype}
        if ptype == wire.TYPE_INFO:
            entry["info"] = describe_info(body)
        else:
            entry["msgs"] = [describe_msg(m) for m in wire.parse_msgs(body)]
        out.append(entry)
    return out


REQUIRED_EXCHANGES = {
    1: "node / partition-generation / build",
    2: "user-agent-set",
    3: "peers-clear-std",
    4: "partition-generation / replicas",
    5: "tend loop: node / peers-generation / partition-generation",
    9: "put map bin",
    10: "get map bin",
    11: "operate map_put + map_remove_by_key",
    12: "get after operate",
    13: "get missing key",
    14: "put second record",
    15: "batch_operate, missing key created",
    16: "batch_operate update-only, missing key NOT_FOUND",
    17: "batch_read with a missing key",
    18: "info namespaces on the data connection",
}


def test_capture_parser_finds_every_exchange(capture: dict[int, Exchange]) -> None:
    assert set(REQUIRED_EXCHANGES) <= set(capture)
    for number in REQUIRED_EXCHANGES:
        ex = capture[number]
        _, ptype, size = wire.parse_proto_header(ex.request[:8])
        assert size == len(ex.request) - 8, number
        assert ex.responses, number
    # batches answer with a row frame and a separate LAST frame
    assert [len(capture[n].responses) for n in (15, 16, 17)] == [2, 2, 2]


@pytest.mark.parametrize(
    "number",
    sorted(REQUIRED_EXCHANGES),
    ids=[f"#{n} {t}" for n, t in sorted(REQUIRED_EXCHANGES.items())],
)
def test_replay_matches_capture(
    number: int, capture: dict[int, Exchange], replayed: dict[int, list[bytes]]
) -> None:
    expected = describe_frames(capture[number].responses)
    actual = describe_frames(replayed[number])
    assert actual == expected


def test_replay_values_are_byte_identical(
    capture: dict[int, Exchange], replayed: dict[int, list[bytes]]
) -> None:
    """Stronger than the field comparison: whole data-response frames match byte for byte
    (record_ttl is 0 on both sides since the capture's namespace has no default TTL)."""
    for number in (9, 10, 11, 12, 13, 14, 15, 16, 17):
        assert replayed[number] == capture[number].responses, number


def test_replay_with_a_default_ttl_changes_only_void_times(capture: dict[int, Exchange]) -> None:
    """The captured requests (written without a TTL) against a namespace with default-ttl 3600:
    every answer is the captured one except the void time of the records written, which is
    now + 3600 s in Aerospike's epoch (2010-01-01), as a real server with that default answers.
    """
    from tests.aerospike_server.store import CITRUSLEAF_EPOCH

    got = replay(capture, default_ttl=3600)
    expected_void = time.time() - CITRUSLEAF_EPOCH + 3600
    voids = set()
    for number, ex in capture.items():
        assert describe_frames(got[number]) == describe_frames(ex.responses), number
        for raw in got[number]:
            _, ptype, _ = wire.parse_proto_header(raw[:8])
            if ptype == wire.TYPE_MSG:
                voids |= {m.record_ttl for m in wire.parse_msgs(raw[8:]) if m.generation}
    assert voids and all(abs(v - expected_void) < 60 for v in voids), voids


def test_replay_over_batch_max_requests_answers_the_last_frame_with_151(
    capture: dict[int, Exchange],
) -> None:
    """The captured 3-key batch_operate against a server whose batch-max-requests is 2: one
    frame, the captured LAST frame with result 151 (BATCH_MAX_REQUESTS_EXCEEDED) and no rows."""
    got = replay(capture, batch_max_requests=2)
    for number in (15, 16, 17):  # the captured batches, 3 keys each
        last = describe_frames(capture[number].responses[-1:])
        last[0]["msgs"][0]["result_code"] = 151
        assert describe_frames(got[number]) == last, number


# ---------------------------------------------------------------------------------------
# the real client


def key(user: int) -> tuple[str, str, int]:
    return ("test", SET, user)


def test_put_get_round_trip(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(42), {"segs": {"a": 1, "b": 2}})
    (_, _, _, digest), meta, bins = aerospike_client.get(key(42))
    assert bins == {"segs": {"a": 1, "b": 2}}
    assert meta["gen"] == 1
    assert bytes(digest) == aerospike_server.digest_of(SET, 42)
    assert aerospike_server.digest_of(SET, 42) == bytes(aerospike.calc_digest("test", SET, 42))
    assert aerospike_server.record(SET, 42) == {"segs": {"a": 1, "b": 2}}
    assert aerospike_server.records(SET) == {aerospike_server.digest_of(SET, 42): bins}
    _, _, selected = aerospike_client.select(key(42), ["segs", "absent"])
    assert selected == {"segs": {"a": 1, "b": 2}}
    counts = aerospike_server.command_counts()
    assert counts["put"] == 1 and counts["get"] == 2


def test_scalar_bins_and_sent_user_key(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    bins = {
        "i": -7,
        "s": "héllo",
        "f": 1.5,
        "b": bytearray(b"\x00\x01"),
        "l": [1, "x"],
        "t": True,
        "m": {"k": {"nested": [1.25]}},
    }
    aerospike_client.put(("test", SET, "alice"), bins, policy={"key": aerospike.POLICY_KEY_SEND})
    _, _, got = aerospike_client.get(("test", SET, "alice"))
    assert got == {**bins, "b": b"\x00\x01"}
    assert list(aerospike_server.records(SET)) == ["alice"]


def test_operate_map_put_and_remove(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(7), {"segs": {"vip": 3, "churn": 1}})
    _, meta, bins = aerospike_client.operate(
        key(7),
        [
            mo.map_put("segs", "new", 4),
            mo.map_remove_by_key("segs", "churn", aerospike.MAP_RETURN_NONE),
        ],
    )
    assert meta["gen"] == 2
    assert bins == {"segs": None}  # the client collapses [size, null] like with a real server
    assert aerospike_server.record(SET, 7) == {"segs": {"new": 4, "vip": 3}}
    _, _, ordered = aerospike_client.operate_ordered(
        key(7),
        [
            mo.map_put_items("segs", {"x": 1, "y": 2}),
            mo.map_remove_by_key_list("segs", ["x", "absent"], aerospike.MAP_RETURN_KEY),
            mo.map_get_by_key("segs", "vip", aerospike.MAP_RETURN_VALUE),
            mo.map_size("segs"),
            mo.map_increment("segs", "vip", 5),
        ],
    )
    assert ordered == [("segs", 4), ("segs", ["x"]), ("segs", 3), ("segs", 3), ("segs", 8)]
    assert aerospike_server.record(SET, 7) == {"segs": {"new": 4, "vip": 8, "y": 2}}


def test_operate_on_missing_record(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.operate(key(1), [mo.map_put("segs", "a", 1)])
    assert aerospike_server.record(SET, 1) == {"segs": {"a": 1}}
    # a remove on a record that does not exist creates nothing: NOT_FOUND, as a real server
    with pytest.raises(ae.RecordNotFound):
        aerospike_client.operate(
            key(2), [mo.map_remove_by_key("segs", "a", aerospike.MAP_RETURN_NONE)]
        )
    assert aerospike_server.record(SET, 2) is None


def test_get_missing_key_raises_record_not_found(aerospike_client: Any) -> None:
    with pytest.raises(ae.RecordNotFound):
        aerospike_client.get(key(99999))
    _, meta = aerospike_client.exists(key(99999))
    assert meta is None


def test_remove_and_exists(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(5), {"segs": {"a": 1}})
    _, meta = aerospike_client.exists(key(5))
    assert meta["gen"] == 1
    aerospike_client.remove(key(5))
    assert aerospike_server.record(SET, 5) is None
    with pytest.raises(ae.RecordNotFound):
        aerospike_client.remove(key(5))


def test_batch_operate_thousand_keys(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    keys = [key(i) for i in range(1000)]
    aerospike_client.put(key(3), {"segs": {"old": 1}})
    result = aerospike_client.batch_operate(keys, [mo.map_put("segs", "batch", 7)])
    assert result.result == 0
    assert [r.result for r in result.batch_records] == [0] * 1000
    assert result.batch_records[3].record[2] == {"segs": 2}
    records = aerospike_server.records(SET)
    assert len(records) == 1000
    assert aerospike_server.record(SET, 3) == {"segs": {"batch": 7, "old": 1}}
    assert aerospike_server.record(SET, 999) == {"segs": {"batch": 7}}
    counts = aerospike_server.command_counts()
    assert counts["batch"] == 1 and counts["batch_rows"] == 1000


def test_batch_operate_update_only_leaves_missing_keys(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    result = aerospike_client.batch_operate(
        [key(1), key(2)],
        [mo.map_put("segs", "b", 2)],
        policy_batch_write={"exists": aerospike.POLICY_EXISTS_UPDATE},
    )
    assert [r.result for r in result.batch_records] == [0, 2]
    assert aerospike_server.record(SET, 1) == {"segs": {"a": 1, "b": 2}}
    assert aerospike_server.record(SET, 2) is None


def test_batch_read_and_remove(aerospike_client: Any) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    result = aerospike_client.batch_read([key(1), key(2)])
    assert [(r.result, r.record and r.record[2]) for r in result.batch_records] == [
        (0, {"segs": {"a": 1}}),
        (2, None),
    ]
    result = aerospike_client.batch_read([key(1), key(2)], ["segs"])
    assert result.batch_records[0].record[2] == {"segs": {"a": 1}}
    removed = aerospike_client.batch_remove([key(1), key(2)])
    assert [r.result for r in removed.batch_records] == [0, 2]


def test_info_sindex_and_query(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    assert list(aerospike_client.info_all("namespaces").values())[0][1] == "test\n"
    for user in range(30):
        aerospike_client.put(key(user), {"segs": {"seg_a" if user % 3 == 0 else "seg_b": 1}})
    query = aerospike_client.query("test", SET)
    query.where(aerospike.predicates.contains("segs", aerospike.INDEX_TYPE_MAPKEYS, "seg_a"))
    with pytest.raises(ae.IndexNotFound):  # like a real server: no index, no query
        query.results()
    aerospike_client.index_map_keys_create("test", SET, "segs", aerospike.INDEX_STRING, "segs_keys")
    listing = list(aerospike_client.info_all("sindex-list:ns=test").values())[0][1]
    assert "indexname=segs_keys" in listing and "indextype=mapkeys" in listing
    query = aerospike_client.query("test", SET)
    query.where(aerospike.predicates.contains("segs", aerospike.INDEX_TYPE_MAPKEYS, "seg_a"))
    digests = {bytes(rec[0][3]) for rec in query.results()}
    assert digests == {aerospike_server.digest_of(SET, u) for u in range(0, 30, 3)}
    assert len(aerospike_client.scan("test", SET).results()) == 30
    assert aerospike_server.unknown_info_commands == {}


def test_info_truncate_unknown_and_raw_socket(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    # client.truncate() holds the GIL in 19.3.0 and so cannot be served by an in-process
    # server thread; the same info command through info_all works.
    answer = aerospike_client.info_all("truncate:namespace=test;set=users")
    assert list(answer.values())[0][1] == "ok\n"
    assert aerospike_server.records(SET) == {}
    with socket.create_connection(("127.0.0.1", aerospike_server.port), 5) as sock:
        request = wire.frame(wire.TYPE_INFO, b"no-such-command\nnode\n")
        sock.sendall(request)
        (body,) = read_response(sock, request)
    assert describe_info(body[8:]) == [
        ("no-such-command", ""),
        ("node", aerospike_server.server.node_id),
    ]
    assert aerospike_server.unknown_info_commands == {"no-such-command": 1}


def test_other_namespace(aerospike_server_factory: Any) -> None:
    server = aerospike_server_factory(namespace="segments")
    client = aerospike.client(client_config(server)).connect()
    try:
        client.put(("segments", SET, 1), {"segs": {"a": 1}})
        assert server.record(SET, 1) == {"segs": {"a": 1}}
        with pytest.raises(ae.AerospikeError):
            client.put(("test", SET, 1), {"segs": {"a": 1}})
    finally:
        client.close()


def test_compressed_requests_are_decompressed(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    big = {"segs": {f"segment_{i}": i for i in range(300)}}
    aerospike_client.put(key(1), big, policy={"compress": True})
    assert aerospike_server.command_counts()["compressed"] >= 1
    assert aerospike_client.get(key(1), policy={"compress": True})[2] == big


# -- fault knobs ------------------------------------------------------------------------


def test_latency_knob_times_out_fast(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    aerospike_server.latency_s = 1.0  # far past the 5 ms budget: a wait would show
    start = time.monotonic()
    with pytest.raises(ae.TimeoutError):
        aerospike_client.get(key(1), policy={"total_timeout": 5})
    assert time.monotonic() - start < 0.5  # not a speed check (a loaded machine)
    aerospike_server.latency_s = 0.0
    assert aerospike_client.get(key(1))[2] == {"segs": {"a": 1}}


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        (14, ae.RecordBusy),
        (8, ae.ServerFull),
        (22, ae.ForbiddenError),
        (1, ae.ServerError),
        (9, ae.TimeoutError),
    ],
)
def test_error_code_knob(
    aerospike_server: ThreadedAerospikeServer,
    aerospike_client: Any,
    code: int,
    exc: type[Exception],
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    aerospike_server.error_code = code
    with pytest.raises(exc):
        aerospike_client.get(key(1))
    with pytest.raises(exc):
        aerospike_client.operate(key(1), [mo.map_put("segs", "b", 2)])
    batch = aerospike_client.batch_operate([key(1)], [mo.map_put("segs", "b", 2)])
    assert batch.result != 0
    # the row carries the code, except a timeout, which leaves a write row "no response"
    assert batch.batch_records[0].result == (code if code != 9 else -15)
    aerospike_server.error_code = None
    assert aerospike_server.record(SET, 1) == {"segs": {"a": 1}}


def test_error_times_knob_turns_the_error_off_after_n_commands(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    aerospike_server.error_times = 2
    aerospike_server.error_code = 14
    for _ in range(2):
        with pytest.raises(ae.RecordBusy):
            aerospike_client.get(key(1))
    assert aerospike_client.get(key(1))[2] == {"segs": {"a": 1}}
    assert aerospike_server.error_code is None and aerospike_server.error_times is None
    assert aerospike_server.command_counts()["error_injected"] == 2


def test_drop_connections_knob(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    aerospike_server.drop_connections = True
    start = time.monotonic()
    with pytest.raises(ae.AerospikeError):
        aerospike_client.get(key(1))
    assert time.monotonic() - start < 1.0
    assert aerospike_server.command_counts()["dropped"] >= 1
    aerospike_server.drop_connections = False
    assert aerospike_client.get(key(1))[2] == {"segs": {"a": 1}}


def _wait_until_ok(call: Any, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while True:
        try:
            call()
            return time.monotonic() - start
        except ae.AerospikeError:
            if time.monotonic() - start > timeout:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("downtime", [0.0, 1.0])
def test_down_fails_fast_and_up_recovers(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any, downtime: float
) -> None:
    """A short outage keeps the node (calls fail with ConnectionError); a longer one makes the
    client drop it after a few failed tends (InvalidNodeError). Both recover after up()."""
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    port = aerospike_server.port
    aerospike_server.down()
    time.sleep(downtime)
    start = time.monotonic()
    with pytest.raises((ae.ConnectionError, ae.InvalidNodeError, ae.TimeoutError)):
        aerospike_client.get(key(1))
    assert time.monotonic() - start < 1.5
    aerospike_server.up()
    assert aerospike_server.port == port
    assert _wait_until_ok(lambda: aerospike_client.get(key(1))) < 3.0
    assert aerospike_client.get(key(1))[2] == {"segs": {"a": 1}}


def test_down_refuses_new_clients(aerospike_server: ThreadedAerospikeServer) -> None:
    aerospike_server.down()
    with pytest.raises(ae.AerospikeError):
        aerospike.client(client_config(aerospike_server)).connect()
    aerospike_server.up()
    client = aerospike.client(client_config(aerospike_server)).connect()
    client.close()


# -- model test -------------------------------------------------------------------------

_segment = st.sampled_from([f"seg_{i}" for i in range(8)])
_step = st.one_of(
    st.tuples(st.just("put"), _segment, st.integers(min_value=1, max_value=2**40)),
    st.tuples(st.just("remove"), _segment, st.just(0)),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(_step, max_size=25), user=st.integers(min_value=0, max_value=2**63 - 1))
def test_map_ops_match_dict_model(
    aerospike_server: ThreadedAerospikeServer,
    aerospike_client: Any,
    steps: list[tuple[str, str, int]],
    user: int,
) -> None:
    aerospike_server.clear()
    model: dict[str, int] = {}
    existed = False
    for action, segment, version in steps:
        if action == "put":
            aerospike_client.operate(key(user), [mo.map_put("segs", segment, version)])
            model[segment] = version
            existed = True
        elif existed:
            aerospike_client.operate(
                key(user), [mo.map_remove_by_key("segs", segment, aerospike.MAP_RETURN_NONE)]
            )
            model.pop(segment, None)
        else:
            with pytest.raises(ae.RecordNotFound):
                aerospike_client.operate(
                    key(user), [mo.map_remove_by_key("segs", segment, aerospike.MAP_RETURN_NONE)]
                )
    stored = aerospike_server.record(SET, user)
    if not existed:
        assert stored is None
        return
    assert stored == {"segs": model}
    assert aerospike_client.get(key(user))[2] == {"segs": model}


# ---------------------------------------------------------------------------------------
# what a real server does that the product depends on (DESIGN.md "Aerospike layout")


def test_default_ttl_applies_when_the_client_sends_none(
    aerospike_server_factory: Any,
) -> None:
    server = aerospike_server_factory(default_ttl=3600)
    client = aerospike.client(client_config(server)).connect()
    try:
        client.put(key(1), {"segs": {"a": 1}})  # no ttl: the namespace's default-ttl
        client.put(key(2), {"segs": {"a": 1}}, policy={"ttl": aerospike.TTL_NEVER_EXPIRE})
        client.put(key(3), {"segs": {"a": 1}}, policy={"ttl": 60})
        _, meta = client.exists(key(1))
        assert 3590 <= meta["ttl"] <= 3600
        assert 3590 <= server.ttl(SET, 1) <= 3600
        assert server.ttl(SET, 2) == -1
        assert 50 <= server.ttl(SET, 3) <= 60
        info = list(client.info_all("namespace/test").values())[0][1]
        assert "default-ttl=3600" in info
        # a batch_operate with the never-expire TTL, and one without (default-ttl)
        client.batch_operate([key(4)], [mo.map_put("segs", "a", 1)], ttl=aerospike.TTL_NEVER_EXPIRE)
        client.batch_operate([key(5)], [mo.map_put("segs", "a", 1)])
        assert server.ttl(SET, 4) == -1
        assert 3590 <= server.ttl(SET, 5) <= 3600
        # a later write without a TTL resets it to the default; "don't update" keeps it
        client.operate(
            key(2), [mo.map_put("segs", "b", 2)], policy={"ttl": aerospike.TTL_DONT_UPDATE}
        )
        assert server.ttl(SET, 2) == -1
        client.operate(key(2), [mo.map_put("segs", "b", 2)])
        assert 3590 <= server.ttl(SET, 2) <= 3600
    finally:
        client.close()


def test_records_expire_on_the_test_clock(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}}, policy={"ttl": 100})
    aerospike_client.put(key(2), {"segs": {"a": 1}}, policy={"ttl": aerospike.TTL_NEVER_EXPIRE})
    # Void times are whole seconds of the wall clock, which runs on meanwhile: 99 s on, the
    # record was already gone whenever the put landed late in a second (or the machine was
    # slow). 98 s leaves it a second of slack; 100 s is past it however the second fell.
    aerospike_server.advance(98)
    assert aerospike_client.get(key(1))[2] == {"segs": {"a": 1}}
    aerospike_server.advance(2)
    with pytest.raises(ae.RecordNotFound):
        aerospike_client.get(key(1))
    assert aerospike_server.record(SET, 1) is None
    assert len(aerospike_client.scan("test", SET).results()) == 1
    # an expired record is gone: an operate with only removes is NOT_FOUND, a put starts over
    with pytest.raises(ae.RecordNotFound):
        aerospike_client.operate(
            key(1), [mo.map_remove_by_key("segs", "a", aerospike.MAP_RETURN_NONE)]
        )
    aerospike_client.operate(key(1), [mo.map_put("segs", "b", 1)])
    assert aerospike_client.get(key(1))[1]["gen"] == 1
    aerospike_server.advance(10**6)
    assert aerospike_client.get(key(2))[2] == {"segs": {"a": 1}}


def test_batch_operate_of_only_removes_on_missing_records_is_not_found(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1, "b": 2}})
    result = aerospike_client.batch_operate(
        [key(1), key(2)], [mo.map_remove_by_key("segs", "a", aerospike.MAP_RETURN_NONE)]
    )
    assert [r.result for r in result.batch_records] == [0, 2]
    assert aerospike_server.record(SET, 2) is None
    # removing the last entry leaves an empty map (the record stays), as a real server does
    aerospike_client.operate(key(1), [mo.map_remove_by_key("segs", "b", aerospike.MAP_RETURN_NONE)])
    assert aerospike_server.record(SET, 1) == {"segs": {}}


def test_scans_and_queries_return_stored_keys_else_none(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    send = {"key": aerospike.POLICY_KEY_SEND}
    aerospike_client.put(key(1), {"segs": {"a": 1}}, policy=send)
    aerospike_client.put(key(2), {"segs": {"a": 1}})
    aerospike_client.batch_operate(
        [key(3), key(-5)], [mo.map_put("segs", "a", 1)], policy_batch_write=send
    )
    keys = {rec[0][2] for rec in aerospike_client.scan("test", SET).results()}
    assert keys == {1, None, 3, -5}
    aerospike_client.index_map_keys_create("test", SET, "segs", aerospike.INDEX_STRING, "ix")
    query = aerospike_client.query("test", SET)
    query.where(aerospike.predicates.contains("segs", aerospike.INDEX_TYPE_MAPKEYS, "a"))
    assert {rec[0][2] for rec in query.results()} == {1, None, 3, -5}
    streamed: list[Any] = []
    aerospike_client.query("test", SET).foreach(lambda rec: streamed.append(rec[0][2]))
    assert sorted(streamed, key=str) == sorted([1, None, 3, -5], key=str)


def test_over_batch_max_requests_the_whole_batch_fails_with_151(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_server.batch_max_requests = 100
    result = aerospike_client.batch_operate(
        [key(i) for i in range(101)], [mo.map_put("segs", "a", 1)]
    )
    assert result.result == 151  # what a real server over batch-max-requests answers
    assert {r.result for r in result.batch_records} == {-15}
    assert aerospike_server.records(SET) == {}
    result = aerospike_client.batch_operate(
        [key(i) for i in range(100)], [mo.map_put("segs", "a", 1)]
    )
    assert result.result == 0 and len(aerospike_server.records(SET)) == 100


def test_truncate_set_keeps_other_sets(
    aerospike_server: ThreadedAerospikeServer, aerospike_client: Any
) -> None:
    aerospike_client.put(key(1), {"segs": {"a": 1}})
    aerospike_client.put(("test", "other", 1), {"x": 1})
    answer = aerospike_client.info_all("truncate:namespace=test;set=users")
    assert list(answer.values())[0][1] == "ok\n"
    assert aerospike_server.records(SET) == {}
    assert len(aerospike_server.records("other")) == 1
    with pytest.raises(ae.RecordNotFound):
        aerospike_client.get(key(1))
