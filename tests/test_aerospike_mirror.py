"""Aerospike as a faithful mirror of the log (DESIGN.md "Aerospike layout"; issue 11).

The real `aerospike` client against the wire-level test server (tests/aerospike_server/), which
behaves as a real server does where it matters here: code 2 for an operate with only removes on
a missing record, TTLs with the namespace's default-ttl and a test clock, stored keys returned
by scans and queries, batch-max-requests answered with a whole-batch 151.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from publisher.aerospike_sink import AerospikeSink, AerospikeSinkError
from sidecar.aerospike_layout import AerospikeTarget, user_key
from sidecar.transport.logdir import LogDirTransport
from tests.aerospike_fixture import Mirror
from tests.aerospike_server import ThreadedAerospikeServer
from tests.test_publisher_aerospike import (
    BIG,
    PYTHON,
    ROOT,
    Truth,
    assert_aerospike_matches,
    bm,
    first_state,
    log_ends,
    publisher,
    second_state,
    write_input,
)

SET, BIN = "users", "segs"


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


def published(log_dir: Path, sink: AerospikeSink) -> Truth:
    """Two publishes (adds, removes, drops, prune) with Aerospike: the truth they leave."""
    truth = Truth()
    first = first_state()
    truth.publish(first)
    publisher(log_dir, sink).publish(first)
    desired, drop = second_state()
    truth.publish(desired, drop=drop, prune=True)
    publisher(log_dir, sink).publish(desired, drop=drop, prune=True)
    return truth


def seg_publish(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PYTHON.parent / "seg-publish"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
    )


# -- defect 1: a remove on a user with no record is a no-op --------------------------------


def test_removing_a_user_with_no_record_is_a_no_op(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    publisher(log_dir, None).publish({"a": bm(range(10)), "b": bm([3])})  # no Aerospike yet
    result = publisher(log_dir, sink).publish({"a": bm(range(1, 10)), "b": bm([3])})
    assert result.versions == {"a": 2}
    assert aerospike_server.record(SET, 0) is None
    # and mixed with adds in the same publish
    result = publisher(log_dir, sink).publish({"a": bm(range(2, 11)), "b": bm([3])})
    assert result.versions == {"a": 3}
    assert aerospike_server.record(SET, 1) is None
    assert aerospike_server.record(SET, 10) == {BIN: {"a": 3}}


# -- defect 3: never expire, whatever the namespace's default-ttl --------------------------


def test_records_never_expire_whatever_the_default_ttl(
    aerospike_server_factory: Any,
    log_dir: Path,
) -> None:
    server = aerospike_server_factory(default_ttl=3600)
    sink = AerospikeSink.connect(AerospikeTarget([(server.host, server.port)]))
    try:
        truth = Truth()
        first = first_state()
        truth.publish(first)
        publisher(log_dir, sink).publish(first)
        desired, drop = second_state()
        truth.publish(desired, drop=drop)
        publisher(log_dir, sink).publish(desired, drop=drop)  # operates on existing records
        assert {server.ttl(SET, user_key(u)) for u in truth.bins()} == {-1}
        server.advance(10 * 3600)
        assert_aerospike_matches(server, truth)
    finally:
        sink.close()


# -- defect 4: a user in no segment has no record ------------------------------------------


def test_users_who_leave_every_segment_are_deleted(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    truth = published(log_dir, sink)
    assert_aerospike_matches(aerospike_server, truth)
    records = aerospike_server.records(SET)
    assert all(bins.get(BIN) for bins in records.values())  # no record with segs = {}
    assert set(records) == {user_key(u) for u in truth.bins()}
    assert aerospike_server.record(SET, 0) is None  # was in vip_buyers and newsletter


# -- defect 5: keys are stored; who is in segment S ----------------------------------------


def test_keys_are_stored_and_members_come_from_the_index(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    sink.create_index()
    desired = first_state()
    publisher(log_dir, sink).publish(desired)
    # records() is keyed by the stored user key (digest when none was stored)
    assert all(isinstance(k, int) for k in aerospike_server.records(SET))
    for seg in ("vip_buyers", "ns:seg.v-1"):
        assert BitMap64(sink.members(seg)) == desired[seg]  # ids >= 2**63 included
    assert BitMap64(sink.members("no_such_segment")) == BitMap64()


def test_cli_members_lists_a_segment_from_aerospike(
    aerospike_server: ThreadedAerospikeServer,
    log_dir: Path,
    tmp_path: Path,
) -> None:
    desired = first_state()
    input_dir = write_input(tmp_path / "in", desired)
    address = aerospike_server.address
    proc = seg_publish(
        "--input", str(input_dir), "--log-dir", str(log_dir), "--aerospike", address,
        "--create-index", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = seg_publish("--aerospike", address, "--members", "vip_buyers")
    assert proc.returncode == 0, proc.stderr
    assert [int(line) for line in proc.stdout.split()] == list(desired["vip_buyers"])
    proc = seg_publish("--aerospike", address, "--members", "bad segment!")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


# -- defect 6: a whole-batch error is reported as that error; the batch size is an option --


def test_whole_batch_error_is_reported_in_one_line(
    mirror: Mirror,
    tmp_path: Path,
) -> None:
    aerospike_server, sink, log_dir = mirror
    aerospike_server.batch_max_requests = 100
    desired = {"a": bm(range(500))}
    with pytest.raises(AerospikeSinkError) as err:
        publisher(log_dir, sink).publish(desired)
    message = str(err.value)
    assert "151" in message and "batch" in message and "\n" not in message, message
    assert aerospike_server.command_counts()["batch_rejected"] == 1  # not retried: not transient
    assert log_ends(log_dir) == {} or not any(log_ends(log_dir).values())

    input_dir = write_input(tmp_path / "in", desired)
    args = ["--input", str(input_dir), "--log-dir", str(log_dir)]
    proc = seg_publish(*args, "--aerospike", aerospike_server.address, "--quiet")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "151" in proc.stderr, proc.stderr
    proc = seg_publish(
        *args, "--aerospike", aerospike_server.address, "--aerospike-batch-size", "100", "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    assert len(aerospike_server.records(SET)) == 500
    address = aerospike_server.address
    proc = seg_publish(*args, "--aerospike", address, "--aerospike-batch-size", "0")
    assert proc.returncode == 2 and "--aerospike-batch-size" in proc.stderr, proc.stderr


# -- defect 8: the publisher takes the sidecar's Aerospike options -------------------------


def test_publisher_takes_set_and_bin_options(
    aerospike_server_factory: Any,
    log_dir: Path,
    tmp_path: Path,
) -> None:
    server = aerospike_server_factory(namespace="segments")
    desired = {"a": bm([1, 2, BIG])}
    input_dir = write_input(tmp_path / "in", desired)
    proc = seg_publish(
        "--input", str(input_dir), "--log-dir", str(log_dir), "--aerospike", server.address,
        "--aerospike-namespace", "segments", "--aerospike-set", "members",
        "--aerospike-bin", "memb", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert server.records("users", "segments") == {}
    assert server.records("members", "segments") == {
        1: {"memb": {"a": 1}},
        2: {"memb": {"a": 1}},
        user_key(BIG): {"memb": {"a": 1}},
    }


def test_publisher_and_sidecar_have_the_same_aerospike_options() -> None:
    from publisher.cli import build_parser as publish_parser
    from sidecar.cli import build_parser as sidecar_parser

    def options(parser: Any) -> set[str]:
        return {
            o
            for a in parser._actions
            for o in a.option_strings
            if o.startswith("--aerospike") and o != "--aerospike-batch-size"
        }

    expected = {
        "--aerospike", "--aerospike-namespace", "--aerospike-set", "--aerospike-bin",
        "--aerospike-user", "--aerospike-password", "--aerospike-tls-name",
    }  # fmt: skip
    assert options(publish_parser()) == options(sidecar_parser()) == expected


# -- defect 2: --reconcile repairs Aerospike from the log ----------------------------------


def reconcile_cli(log_dir: Path, server: ThreadedAerospikeServer, *extra: str) -> Any:
    return seg_publish(
        "--reconcile", "--log-dir", str(log_dir), "--aerospike", server.address, *extra
    )


def test_reconcile_repairs_a_truncated_set(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    truth = published(log_dir, sink)
    ends = log_ends(log_dir)
    sink.client.info_all("truncate:namespace=test;set=users")
    assert aerospike_server.records(SET) == {}
    # an identical publish cannot repair it: it diffs against the log
    assert publisher(log_dir, sink).publish(dict(truth.members)).aerospike_records == 0

    proc = reconcile_cli(log_dir, aerospike_server, "--dry-run")
    assert proc.returncode == 4, proc.stderr
    assert "missing" in proc.stdout and aerospike_server.records(SET) == {}

    proc = reconcile_cli(log_dir, aerospike_server)
    assert proc.returncode == 0, proc.stderr
    assert "reconcile:" in proc.stderr  # progress
    assert_current(aerospike_server, truth)
    assert log_ends(log_dir) == ends  # nothing written to the log

    proc = reconcile_cli(log_dir, aerospike_server, "--dry-run")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


def assert_current(server: ThreadedAerospikeServer, truth: Truth) -> None:
    """Every member has an entry no newer than its segment's version, nothing else is there,
    and every key is stored (a repaired entry carries the segment's current version)."""
    records = {k: b for k, b in server.records(SET).items() if BIN in b}
    expected = {user_key(u): set(segs) for u, segs in truth.bins().items()}
    assert {k: set(b[BIN]) for k, b in records.items()} == expected
    for k, bins in records.items():
        for seg, version in bins[BIN].items():
            assert 1 <= version <= truth.versions[seg], (k, seg, version)


def test_reconcile_repairs_deleted_tampered_and_extra_records(mirror: Mirror) -> None:
    aerospike_server, sink, log_dir = mirror
    truth = published(log_dir, sink)
    members = truth.bins()
    users = sorted(members)
    # deleted records, a missing entry, an extra entry, an outdated (future) version, a user in
    # no segment with a record, an empty map, a record written without its key, another bin
    deleted = users[:20]
    for u in deleted:
        sink.client.remove(sink.target.key(u))
    u_missing, u_extra, u_future, u_keyless = users[20], users[21], users[22], users[23]
    seg_missing = next(iter(members[u_missing]))
    segs = dict(members[u_missing])
    del segs[seg_missing]
    if not segs:
        segs = {"zzz_gone": 1}
    aerospike_server.seed(SET, user_key(u_missing), {BIN: segs})
    aerospike_server.seed(SET, user_key(u_extra), {BIN: {**members[u_extra], "never_published": 3}})
    seg_future = next(iter(members[u_future]))
    aerospike_server.seed(SET, user_key(u_future), {BIN: {**members[u_future], seg_future: 99}})
    nobody = 5_000_000
    aerospike_server.seed(SET, nobody, {BIN: {"vip_buyers": 1}})
    aerospike_server.seed(SET, nobody + 1, {BIN: {}})
    sink.client.put(sink.target.key(u_keyless), {BIN: {"bogus": 1}})  # digest only, no key
    aerospike_server.seed(SET, users[24], {BIN: members[users[24]], "other": 7})
    aerospike_server.seed(SET, nobody + 2, {"not_ours": 1})  # no map bin: left alone

    proc = reconcile_cli(log_dir, aerospike_server, "--dry-run")
    assert proc.returncode == 4, proc.stderr
    report = proc.stdout
    for word in ("missing records", "extra entries", "outdated entries", "missing entries"):
        assert word in report, report
    proc = reconcile_cli(log_dir, aerospike_server)
    assert proc.returncode == 0, proc.stderr
    assert_current(aerospike_server, truth)
    assert aerospike_server.record(SET, users[24])["other"] == 7  # other bins are left alone
    assert aerospike_server.record(SET, nobody) is None
    assert aerospike_server.record(SET, nobody + 1) is None
    assert aerospike_server.record(SET, nobody + 2) == {"not_ours": 1}
    assert aerospike_server.records(SET).keys() == {user_key(u) for u in members} | {nobody + 2}
    assert reconcile_cli(log_dir, aerospike_server, "--dry-run").returncode == 0


def test_reconcile_needs_aerospike_and_takes_no_input(log_dir: Path, tmp_path: Path) -> None:
    proc = seg_publish("--reconcile", "--log-dir", str(log_dir))
    assert proc.returncode == 2 and "--aerospike" in proc.stderr, proc.stderr
    proc = seg_publish("--dry-run", "--log-dir", str(log_dir), "--input", str(tmp_path))
    assert proc.returncode == 2 and "--reconcile" in proc.stderr, proc.stderr


def test_reconcile_api_streams_and_batches(
    aerospike_server: ThreadedAerospikeServer,
    log_dir: Path,
) -> None:
    from publisher.reconcile import reconcile

    target = AerospikeTarget([(aerospike_server.host, aerospike_server.port)])
    sink = AerospikeSink.connect(target, batch_size=500)
    try:
        desired = {"big": bm(range(0, 20_000)), "odd": bm(range(1, 20_000, 2))}
        publisher(log_dir, sink).publish(desired)
        sink.client.info_all("truncate:namespace=test;set=users")
        for u in range(0, 20_000, 1000):
            aerospike_server.seed(SET, u, {BIN: {"big": 1}})  # odd missing for odd users
        lines: list[str] = []
        report = reconcile(LogDirTransport(log_dir), sink, progress=lines.append)
        assert report.missing_records == 20_000 - 20
        assert report.differs
        assert aerospike_server.command_counts()["batch"] >= (20_000 - 20) // 500
        assert len(aerospike_server.records(SET)) == 20_000
        assert aerospike_server.record(SET, 7) == {BIN: {"big": 1, "odd": 1}}
        assert lines and any("scanned" in line for line in lines)
        assert not reconcile(LogDirTransport(log_dir), sink, dry_run=True).differs
    finally:
        sink.close()


# -- defect 9: grouping users without Python per user --------------------------------------


@st.composite
def changes_strategy(draw: Any) -> list[Any]:
    from publisher.plan import Change

    ids = st.one_of(st.integers(0, 300), st.integers(2**64 - 50, 2**64 - 1))
    out = []
    for i in range(draw(st.integers(0, 70))):  # over 64 entries: masks of several words
        add = BitMap64(draw(st.lists(ids, max_size=40)))
        remove = BitMap64(draw(st.lists(ids, max_size=20))) - add
        out.append(Change(f"s{i}", i, i + 1, add, remove, len(add)))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes_strategy())
def test_grouping_is_the_exact_partition_by_operations(changes: list[Any]) -> None:
    from publisher.aerospike_sink import Entry, _entries, group_users, group_users_bitmaps

    expected: dict[int, list[Entry]] = {}
    for change in changes:
        for user in change.add:
            expected.setdefault(user, []).append(Entry(change.segment, change.version))
        for user in change.remove:
            expected.setdefault(user, []).append(Entry(change.segment, None))
    for groups in (group_users(changes), group_users_bitmaps(_entries(changes))):
        seen: dict[int, tuple[Entry, ...]] = {}
        for signature, users in groups:
            users = [int(u) for u in users]
            assert users == sorted(users) and users  # ascending, no empty group
            for user in users:
                assert user not in seen
                seen[user] = signature
        assert seen == {u: tuple(ops) for u, ops in expected.items()}
    assert len(group_users(changes)) == len(group_users_bitmaps(_entries(changes)))
