"""The publisher's Aerospike writes (publisher/aerospike_sink.py, publisher/publish.py) against
the wire-level Aerospike test server, with the real `aerospike` client, and the log directory.

The truth is kept by an independent model (`Truth`), not by the product's planner: a
segment's version grows by one per change (drops included), and a user's `segs` bin maps each
segment the user is in to the version of the publish that added the user to it (unchanged
memberships are not rewritten when other members of the segment change).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aerospike
import pytest
from aerospike import predicates
from pyroaring import BitMap64

from publisher.aerospike_sink import AerospikeSink, AerospikeSinkError
from publisher.publish import FAULT_ENV, FAULT_POINTS, Publisher, PublishResult
from sidecar.aerospike_layout import user_key
from sidecar.record import Delta, Drop, decode
from sidecar.replica import Replica
from sidecar.replica.forms import to_bitmap
from sidecar.transport.base import TOPICS
from sidecar.transport.logdir import LogDirTransport
from tests.aerospike_fixture import Mirror
from tests.aerospike_server import ThreadedAerospikeServer

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)
SET, BIN = "users", "segs"
BIG = 2**63  # ids at and above wrap to negative Aerospike keys


# -- the truth -----------------------------------------------------------------------------


class Truth:
    """What the log and Aerospike must hold after a sequence of publishes."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}  # every segment ever published, dropped ones too
        self.members: dict[str, BitMap64] = {}  # live segments
        self.added_at: dict[tuple[int, str], int] = {}
        self.users: set[int] = set()  # every user ever in a segment

    def publish(
        self, desired: Mapping[str, BitMap64], drop: Iterable[str] = (), prune: bool = False
    ) -> dict[str, int]:
        """Apply one publish; returns {segment: new version} of the changed segments."""
        changed: dict[str, int] = {}
        to_drop = set(drop) | ((set(self.members) - set(desired)) if prune else set())
        for seg, target in desired.items():
            old = self.members.get(seg)
            if old is not None and old == target:
                continue
            old = old if old is not None else BitMap64()
            version = self.versions.get(seg, 0) + 1
            for user in target - old:
                self.added_at[(user, seg)] = version
            for user in old - target:
                del self.added_at[(user, seg)]
            self.members[seg] = BitMap64(target)
            self.versions[seg] = changed[seg] = version
            self.users |= set(target)
        for seg in sorted(to_drop):
            if seg not in self.members:
                continue
            for user in self.members.pop(seg):
                del self.added_at[(user, seg)]
            self.versions[seg] += 1
            changed[seg] = self.versions[seg]
        return changed

    def bins(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for (user, seg), version in self.added_at.items():
            out.setdefault(user, {})[seg] = version
        return out


def truth_users_of(segments: Mapping[str, BitMap64]) -> BitMap64:
    return BitMap64.union(BitMap64(), *segments.values())


def touched_users(changes: Iterable[tuple[BitMap64, BitMap64]]) -> int:
    users = BitMap64()
    for old, new in changes:
        users |= old ^ new
    return len(users)


# -- inspection helpers --------------------------------------------------------------------


def stored_bins(server: ThreadedAerospikeServer) -> dict[Any, dict[str, int]]:
    """{stored user key: segs} of every record of set `users` (keys are stored)."""
    return {key: bins.get(BIN) for key, bins in server.records(SET).items()}


def assert_aerospike_matches(server: ThreadedAerospikeServer, truth: Truth) -> None:
    """Each member's record holds exactly its segments at the versions that added it; users
    in no segment have no record (DESIGN.md "Aerospike layout")."""
    expected = {user_key(user): segs for user, segs in truth.bins().items()}
    actual = stored_bins(server)
    if actual != expected:
        wrong = [
            (k, actual.get(k), expected.get(k))
            for k in set(actual) | set(expected)
            if actual.get(k) != expected.get(k)
        ]
        pytest.fail(f"{len(wrong)} user records differ (key, actual, expected): {wrong[:10]}")


def data_commands(server: ThreadedAerospikeServer) -> dict[str, int]:
    return {k: v for k, v in server.command_counts().items() if not k.startswith("info:")}


def written_rows(server: ThreadedAerospikeServer) -> int:
    """Record writes served (a one-key batch goes out as a single-record operate)."""
    counts = server.command_counts()
    return counts["batch_rows"] + counts["operate"]


def log_ends(log_dir: Path) -> dict[tuple[str, int], int]:
    with LogDirTransport(log_dir).reader() as reader:
        return {
            (topic, p): reader.watermarks(topic, p)[1]
            for topic in TOPICS
            for p in range(reader.partitions)
        }


def log_state(log_dir: Path) -> tuple[dict[tuple[str, int], int], int]:
    return log_ends(log_dir), (log_dir / "log").stat().st_size


def delta_versions(log_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """(base, version) of every change record in `deltas`, per segment, in log order
    (the parts of a split delta counted once)."""
    out: dict[str, list[tuple[int, int]]] = {}
    ends = log_ends(log_dir)
    with LogDirTransport(log_dir).reader() as reader:
        reader.assign({("deltas", p): 0 for p in range(reader.partitions)})
        seen = 0
        total = sum(end for (topic, _), end in ends.items() if topic == "deltas")
        deadline = time.monotonic() + 30
        while seen < total:
            assert time.monotonic() < deadline
            for rec in reader.poll(0.1):
                seen += 1
                value = decode(rec.value)
                if isinstance(value, Delta) and value.part > 0:
                    continue
                assert isinstance(value, Delta | Drop)
                out.setdefault(value.segment, []).append((value.base, value.version))
    return out


def assert_log_matches(log_dir: Path, truth: Truth) -> None:
    """A cold replica of the log answers every (user, segment) as the truth does, at the
    truth's versions; the log holds each version of each segment exactly once."""
    replica = Replica(LogDirTransport(log_dir), poll_interval=0.01).start()
    try:
        assert replica.wait_ready(30), replica.status()
        assert replica.status()["unhealthy"] == []
        for seg, version in truth.versions.items():
            state = replica.state(seg)
            if seg in truth.members:
                assert state is not None, seg
                assert state.version == version, (seg, state.version, version)
                assert to_bitmap(state.bitmap) == truth.members[seg], seg
            else:
                assert state is None, f"{seg} was dropped"
        assert set(replica.engine.segments) == set(truth.members)
        for seg in truth.versions:
            members = truth.members.get(seg)
            for user in truth.users:
                expected = None if members is None else user in members
                assert replica.contains(user, seg) is expected, (user, seg)
    finally:
        replica.stop(save=False)
    for seg, steps in delta_versions(log_dir).items():
        assert [v for _, v in steps] == list(range(1, truth.versions[seg] + 1)), (seg, steps)
        assert all(base == version - 1 for base, version in steps), (seg, steps)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


def publisher(log_dir: Path, sink: AerospikeSink | None) -> Publisher:
    return Publisher(LogDirTransport(log_dir), sink=sink, writer_id="test-publisher")


def bm(*parts: Iterable[int]) -> BitMap64:
    out = BitMap64()
    for part in parts:
        out.update(part)
    return out


def first_state() -> dict[str, BitMap64]:
    return {
        "vip_buyers": bm(range(0, 300), [BIG, BIG + 7, 2**64 - 1]),
        "cart_abandoners_30m": bm(range(200, 700)),
        "newsletter": bm(range(0, 1000, 3)),
        "churn_risk": bm(range(900, 1200)),
        "ns:seg.v-1": bm([5, 500, BIG + 7]),
    }


def second_state() -> tuple[dict[str, BitMap64], list[str]]:
    """Adds and removes (vip_buyers, ns:seg.v-1), unchanged (cart_abandoners_30m), a new
    segment (winback); newsletter dropped with drop=, churn_risk absent (gone with prune)."""
    first = first_state()
    desired = {
        "vip_buyers": bm(range(100, 400), [BIG, 2**64 - 2]),
        "cart_abandoners_30m": first["cart_abandoners_30m"],
        "ns:seg.v-1": bm([5, 6, BIG + 8]),
        "winback": bm(range(1100, 1300), [BIG + 7]),
    }
    return desired, ["newsletter"]


# -- publishing ------------------------------------------------------------------------------


def test_first_publish_writes_each_users_segments(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    truth = Truth()
    desired = first_state()
    versions = truth.publish(desired)
    result = publisher(log_dir, sink).publish(desired)
    assert result.versions == versions == dict.fromkeys(desired, 1)
    assert result.aerospike_records == len(truth.bins())
    assert written_rows(aerospike_server) == len(truth.bins())
    assert_aerospike_matches(aerospike_server, truth)
    assert_log_matches(log_dir, truth)
    # ids >= 2**63 are stored under their wrapped (negative) key
    assert aerospike_server.record(SET, -1) == {BIN: {"vip_buyers": 1}}
    assert aerospike_server.record(SET, user_key(BIG + 7)) == {
        BIN: {"vip_buyers": 1, "ns:seg.v-1": 1}
    }


def test_second_publish_updates_bins_exactly(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    truth = Truth()
    pub = publisher(log_dir, sink)
    first = first_state()
    truth.publish(first)
    pub.publish(first)

    desired, drop = second_state()
    versions = truth.publish(desired, drop=drop, prune=True)
    assert versions == {
        "vip_buyers": 2,
        "ns:seg.v-1": 2,
        "winback": 1,
        "newsletter": 2,
        "churn_risk": 2,
    }
    rows = written_rows(aerospike_server)
    before = set(truth_users_of(first))
    result = pub.publish(desired, drop=drop, prune=True)
    assert result.versions == versions
    assert result.drops == 2
    changed_users = touched_users(
        [(first.get(s, BitMap64()), desired.get(s, BitMap64())) for s in versions]
    )
    assert result.aerospike_records == changed_users
    left_everything = len(before - set(truth.bins()))
    assert left_everything > 0 and sink.deleted == left_everything
    # one row per changed user, one delete per user who left every segment
    assert written_rows(aerospike_server) - rows == changed_users + left_everything
    assert_aerospike_matches(aerospike_server, truth)
    assert_log_matches(log_dir, truth)
    # removed keys are gone, kept memberships keep the version that added them
    assert aerospike_server.record(SET, 0) is None  # was vip_buyers + newsletter: deleted
    assert aerospike_server.record(SET, 250)[BIN] == {"vip_buyers": 1, "cart_abandoners_30m": 1}
    assert aerospike_server.record(SET, 350)[BIN] == {"vip_buyers": 2, "cart_abandoners_30m": 1}
    assert aerospike_server.record(SET, user_key(BIG + 7))[BIN] == {"winback": 1}

    # A dropped segment published again continues at its next version.
    again = {**desired, "newsletter": bm([1, 2, 3])}
    versions = truth.publish(again)
    assert versions == {"newsletter": 3}
    assert pub.publish(again).versions == versions
    assert aerospike_server.record(SET, 2)[BIN] == {"newsletter": 3}
    assert_aerospike_matches(aerospike_server, truth)
    assert_log_matches(log_dir, truth)


def test_identical_republish_writes_nothing(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    pub = publisher(log_dir, sink)
    desired = first_state()
    pub.publish(desired)
    counts, log = data_commands(aerospike_server), log_state(log_dir)
    for _ in range(2):
        result = pub.publish({k: BitMap64(v) for k, v in desired.items()})
        assert result.versions == {}
        assert result.aerospike_records == 0
        assert result.records == 0
    assert data_commands(aerospike_server) == counts
    assert log_state(log_dir) == log
    # the same with a subset of the segments (the rest stays as it is without --prune)
    assert publisher(log_dir, sink).publish({"newsletter": desired["newsletter"]}).versions == {}
    assert data_commands(aerospike_server) == counts
    assert log_state(log_dir) == log


def test_users_in_several_changed_segments_get_one_write(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    pub = publisher(log_dir, sink)
    truth = Truth()
    shared = range(1, 101)
    desired = {
        "a": bm(shared, range(1000, 1010)),
        "b": bm(shared, [2000]),
        "c": bm(shared, range(3000, 3200)),
    }
    truth.publish(desired)
    result = pub.publish(desired)
    users = len(truth.bins())
    assert users == 100 + 10 + 1 + 200
    assert result.aerospike_records == users
    assert written_rows(aerospike_server) == users
    for user in shared:
        assert aerospike_server.generation(SET, user) == 1  # one write with three map puts
        assert aerospike_server.record(SET, user)[BIN] == {"a": 1, "b": 1, "c": 1}

    # Mixed operations in one row: user 1 leaves a, stays in b, joins d; one write each.
    desired2 = {**desired, "a": desired["a"] - bm([1, 2]), "d": bm([1, 2, 5000])}
    truth.publish(desired2)
    rows = written_rows(aerospike_server)
    result = pub.publish(desired2)
    assert result.aerospike_records == 3
    assert written_rows(aerospike_server) - rows == 3
    assert aerospike_server.generation(SET, 1) == 2
    assert aerospike_server.record(SET, 1)[BIN] == {"b": 1, "c": 1, "d": 1}
    assert_aerospike_matches(aerospike_server, truth)


def test_create_index_and_mapkeys_query(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    sink.create_index()
    sink.create_index()  # idempotent
    assert [(ix.bin, ix.index_type) for ix in aerospike_server.sindexes.values()] == [
        (BIN, "mapkeys")
    ]
    desired = first_state()
    publisher(log_dir, sink).publish(desired)
    for seg in ("vip_buyers", "ns:seg.v-1"):
        query = sink.client.query("test", SET)
        query.where(predicates.contains(BIN, aerospike.INDEX_TYPE_MAPKEYS, seg))
        found = {bytes(key[3]) for key, _meta, _bins in query.results()}
        assert found == {aerospike_server.digest_of(SET, user_key(u)) for u in desired[seg]}


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("users", [1, 400], ids=["operate", "batch"])
def test_transient_error_is_retried(
    mirror: Mirror,
    users: int,
) -> None:
    aerospike_server, sink, log_dir = mirror
    truth = Truth()
    desired = {"a": bm(range(users))}
    truth.publish(desired)
    # KEY_BUSY for the first attempt only, cleared by the server itself (a watcher thread
    # clearing it could miss the retry's 50 ms backoff on a loaded machine)
    aerospike_server.error_times = 1
    aerospike_server.error_code = 14
    result = publisher(log_dir, sink).publish(desired)
    assert aerospike_server.command_counts()["error_injected"] == 1
    assert result.aerospike_records == users
    assert_aerospike_matches(aerospike_server, truth)
    assert_log_matches(log_dir, truth)


@pytest.mark.parametrize("code", [8, 14], ids=["permanent", "transient-forever"])
@pytest.mark.parametrize("users", [1, 400], ids=["operate", "batch"])
def test_failed_aerospike_write_aborts_before_the_log(
    mirror: Mirror, code: int, users: int
) -> None:
    aerospike_server, sink, log_dir = mirror
    pub = publisher(log_dir, sink)
    truth = Truth()
    first = {"a": bm([10**6]), "b": bm([10**6 + 1])}
    truth.publish(first)
    pub.publish(first)
    log = log_state(log_dir)
    desired = {"a": bm(range(users), [10**6]), "b": first["b"]}  # adds only: one group
    aerospike_server.error_code = code
    with pytest.raises(AerospikeSinkError):
        pub.publish(desired)
    assert log_state(log_dir) == log  # aborted before the transaction
    attempts = aerospike_server.command_counts()["error_injected"]
    if code == 14:
        assert attempts == sink.retries + 1
    aerospike_server.error_code = None
    assert_log_matches(log_dir, truth)
    # The same publish once Aerospike is healthy: both stores converge.
    truth.publish(desired)
    assert pub.publish(desired).versions == {"a": 2}
    assert_aerospike_matches(aerospike_server, truth)
    assert_log_matches(log_dir, truth)


# -- crashes ---------------------------------------------------------------------------------

_CRASH_SCRIPT = """
import sys
from publisher.aerospike_sink import AerospikeSink
from publisher.publish import Publisher
from publisher.segment_set import read_segment_set
from sidecar.aerospike_layout import AerospikeTarget
from sidecar.transport.logdir import LogDirTransport

input_dir, log_dir, address, *drop = sys.argv[1:]
sink = AerospikeSink.connect(AerospikeTarget.at(address))
desired = read_segment_set(input_dir).segments
Publisher(LogDirTransport(log_dir), sink=sink, writer_id="test-publisher").publish(
    desired, prune=True, drop=drop
)
print("survived")
"""


def write_input(path: Path, segments: Mapping[str, BitMap64]) -> Path:
    from compute.segment_set import write_segment_set

    write_segment_set(path, segments, dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    return path


def test_fault_points_are_the_documented_ones() -> None:
    assert FAULT_POINTS == ("after-recover", "after-aerospike", "mid-transaction", "after-commit")


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_crash_then_rerun_converges(mirror: Mirror, tmp_path: Path, point: str) -> None:
    aerospike_server, sink, log_dir = mirror
    pub = publisher(log_dir, sink)
    truth = Truth()
    first = first_state()
    before = truth.publish(first)
    pub.publish(first)
    bins_before = stored_bins(aerospike_server)
    log_before = log_state(log_dir)

    desired, drop = second_state()
    input_dir = write_input(tmp_path / "input", desired)
    proc = subprocess.run(
        [str(PYTHON), "-c", _CRASH_SCRIPT, str(input_dir), str(log_dir)]
        + [aerospike_server.address, *drop],
        env={**os.environ, FAULT_ENV: point, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert "survived" not in proc.stdout

    expected = Truth()
    expected.publish(first)
    changed = expected.publish(desired, drop=drop, prune=True)
    # What the crash left behind: Aerospike is written before the log commits.
    if point == "after-recover":
        assert stored_bins(aerospike_server) == bins_before
    else:
        assert_aerospike_matches(aerospike_server, expected)
    if point == "after-commit":
        assert log_state(log_dir) != log_before
    else:
        assert log_state(log_dir) == log_before
        assert_log_matches(log_dir, truth)  # readers still see the previous publish

    # Re-running the same publish, without the fault, repairs both stores.
    result: PublishResult = pub.publish(desired, drop=drop, prune=True)
    truth.publish(desired, drop=drop, prune=True)
    if point == "after-commit":
        assert result.versions == {}
        assert result.aerospike_records == 0
    else:
        assert result.versions == changed
    assert changed == {seg: before.get(seg, 0) + 1 for seg in changed}
    assert_aerospike_matches(aerospike_server, truth)
    assert_log_matches(log_dir, truth)
    for seg, version in changed.items():
        assert truth.versions[seg] == version


# -- the command line ------------------------------------------------------------------------


def test_cli_reports_aerospike_records(
    aerospike_server: ThreadedAerospikeServer,
    log_dir: Path,
    tmp_path: Path,
) -> None:
    truth = Truth()
    segments = first_state()
    truth.publish(segments)
    input_dir = write_input(tmp_path / "input", segments)
    cmd = [
        str(PYTHON.parent / "seg-publish"),
        "--input",
        str(input_dir),
        "--log-dir",
        str(log_dir),
        "--aerospike",
        aerospike_server.address,
        "--create-index",
        "--quiet",
    ]

    def run() -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        return proc.stdout

    out = run()
    users = len(truth.bins())
    assert users > 1000  # the summary prints thousands separators
    assert f"aerospike records {users:,}," in out, out
    assert "segments changed 5," in out
    assert len(aerospike_server.sindexes) == 1
    assert_aerospike_matches(aerospike_server, truth)
    assert_log_matches(log_dir, truth)

    out = run()  # identical input: nothing to write
    assert "aerospike records 0," in out, out
    assert "segments changed 0," in out


# -- throughput (printed, not asserted) -------------------------------------------------------


def test_write_throughput_against_test_server(
    mirror: Mirror,
    capsys: pytest.CaptureFixture[str],
) -> None:
    aerospike_server, sink, log_dir = mirror
    users = 100_000
    desired = {
        "all_users": bm(range(users)),
        "even": bm(range(0, users, 2)),
        "tenth": bm(range(0, users, 10)),
    }
    pub = publisher(log_dir, sink)
    writes: list[tuple[float, int]] = []

    class Timed:
        def apply(self, changes: Any, progress: Any) -> int:
            started = time.perf_counter()
            written = sink.apply(changes, progress)
            writes.append((time.perf_counter() - started, written))
            return written

    pub.sink = Timed()
    result = pub.publish(desired)
    ((seconds, written),) = writes
    assert written == result.aerospike_records == users
    assert aerospike_server.record(SET, 10)[BIN] == {"all_users": 1, "even": 1, "tenth": 1}
    assert aerospike_server.record(SET, 99_999)[BIN] == {"all_users": 1}
    with capsys.disabled():
        print(
            f"\nAerospike write throughput against the wire-level test server "
            f"(in-process Python double, not a real Aerospike): {written:,} user records "
            f"in {seconds:.2f} s = {written / seconds:,.0f} records/s "
            f"(whole publish {result.seconds:.2f} s)"
        )
