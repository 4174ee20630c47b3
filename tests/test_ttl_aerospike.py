"""Membership TTL in the Aerospike mirror (DESIGN.md "Freshness", "Aerospike layout"): a TTL
segment's map value is `[version, expires_at_ms]` for every member a publish lists (new and
re-affirmed), plain segments keep `version`, records never expire; `--reconcile` compares TTL
entries (an expired entry is "not a member") and clears expired entries; a sidecar that holds
only other segments, and a sidecar not ready yet, answer a TTL segment from Aerospike: a member
until its expiry, not after.

The real `aerospike` client against the wire-level test server (tests/aerospike_server/)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroaring import BitMap64

from publisher.aerospike_sink import AerospikeSink
from publisher.publish import Publisher
from publisher.reconcile import reconcile
from sidecar.aerospike_layout import AerospikeTarget, map_value, user_key
from sidecar.client import SidecarClient
from sidecar.replica import RecoveredLog
from sidecar.transport.logdir import LogDirTransport
from tests.aerospike_fixture import Mirror
from tests.aerospike_server import ThreadedAerospikeServer
from tests.logtools import free_port, sidecar_process

SET, BIN = "users", "segs"
BIG = 2**64 - 1  # wraps to a negative Aerospike key


@dataclass(slots=True)
class Change:
    """What the sink needs of a change (publisher.aerospike_sink.MapChange)."""

    segment: str
    version: int
    add: BitMap64
    remove: BitMap64 = field(default_factory=BitMap64)
    expires_at_ms: int = 0


def connect(server: ThreadedAerospikeServer) -> AerospikeSink:
    return AerospikeSink.connect(AerospikeTarget([(server.host, server.port)]))


@pytest.fixture
def sink(aerospike_server: ThreadedAerospikeServer) -> Iterator[AerospikeSink]:
    sink = connect(aerospike_server)
    try:
        yield sink
    finally:
        sink.close()


def segs(server: ThreadedAerospikeServer) -> dict[int, dict[str, Any]]:
    """{user key: the segs map} of every record."""
    return {key: bins.get(BIN) for key, bins in server.records(SET).items()}


# -- the layout ------------------------------------------------------------------------------


def test_map_value_is_the_inverse_of_map_version() -> None:
    from sidecar.aerospike_layout import map_version

    assert map_value(3) == 3 and map_version(map_value(3), 10**15) == 3
    assert map_value(3, 5_000) == [3, 5_000]
    assert map_version(map_value(3, 5_000), 4_999) == 3
    assert map_version(map_value(3, 5_000), 5_000) is None  # due at its deadline


# -- the sink --------------------------------------------------------------------------------


def test_sink_writes_version_and_expiry_for_ttl_segments(
    aerospike_server_factory: Any,
) -> None:
    server = aerospike_server_factory(default_ttl=60)  # records must not take it
    sink = connect(server)
    try:
        at = 1_900_000_000_000
        sink.apply(
            [
                Change("plain", 4, BitMap64([1, 2])),
                Change("ttl", 7, BitMap64([2, 3, BIG]), expires_at_ms=at),
            ],
            lambda *_: None,
        )
        assert segs(server) == {
            1: {"plain": 4},
            2: {"plain": 4, "ttl": [7, at]},
            3: {"ttl": [7, at]},
            user_key(BIG): {"ttl": [7, at]},
        }
        assert {server.ttl(SET, k) for k in segs(server)} == {-1}  # never expire
        # a re-affirmation rewrites the expiry (and version); users not listed keep theirs
        sink.apply([Change("ttl", 8, BitMap64([3]), expires_at_ms=at + 5_000)], lambda *_: None)
        assert segs(server)[3] == {"ttl": [8, at + 5_000]}
        assert segs(server)[2] == {"plain": 4, "ttl": [7, at]}
        # a drop of a TTL segment removes its entries like any other (empty records deleted)
        sink.apply([Change("ttl", 9, BitMap64(), BitMap64([2, 3, BIG]))], lambda *_: None)
        assert segs(server) == {1: {"plain": 4}, 2: {"plain": 4}}
    finally:
        sink.close()


def test_users_with_different_expiries_are_grouped_apart() -> None:
    from publisher.aerospike_sink import Entry, group_users

    at = 1_900_000_000_000
    groups = group_users(
        [
            Change("t", 2, BitMap64([1, 2]), expires_at_ms=at),
            Change("u", 5, BitMap64([2, 3]), expires_at_ms=at + 1_000),
            Change("p", 1, BitMap64([3])),
        ]
    )
    got = {sig: [int(u) for u in users] for sig, users in groups}
    assert got == {
        (Entry("t", 2, at),): [1],
        (Entry("t", 2, at), Entry("u", 5, at + 1_000)): [2],
        (Entry("u", 5, at + 1_000), Entry("p", 1)): [3],
    }


# -- publishes -------------------------------------------------------------------------------


def publisher(m: Mirror) -> Publisher:
    return Publisher(LogDirTransport(m.log_dir), sink=m.sink, writer_id="t", partitions=2)


def log_expiries(m: Mirror, segment: str) -> dict[int, BitMap64]:
    """The TTL segment's expiry buckets as the log holds them (deadline -> members)."""
    with RecoveredLog(LogDirTransport(m.log_dir)) as log:
        index = log.expiries_of(segment)
        return dict(index.pairs()) if index is not None else {}


def test_a_ttl_publish_writes_every_listed_member_with_the_logs_expiry(mirror: Mirror) -> None:
    before = time.time() * 1000
    first = publisher(mirror).publish(
        {"t": BitMap64([1, 2, 3]), "p": BitMap64([1])}, ttl={"t": 3600}
    )
    assert first.versions == {"t": 1, "p": 1}
    ((at1, members),) = log_expiries(mirror, "t").items()
    assert members == BitMap64([1, 2, 3]) and at1 % 1000 == 0
    assert before + 3_600_000 <= at1 <= time.time() * 1000 + 3_601_000
    expected = {1: {"p": 1, "t": [1, at1]}, 2: {"t": [1, at1]}, 3: {"t": [1, at1]}}
    assert segs(mirror.server) == expected
    # additive: 2 is re-affirmed (a later expiry), 4 added, 1 and 3 keep theirs (they lapse)
    second = publisher(mirror).publish({"t": BitMap64([2, 4])}, ttl={"t": 7200})
    assert second.versions == {"t": 2}
    at2 = max(log_expiries(mirror, "t"))
    assert at2 > at1
    assert segs(mirror.server) == {
        1: {"p": 1, "t": [1, at1]},
        2: {"t": [2, at2]},
        3: {"t": [1, at1]},
        4: {"t": [2, at2]},
    }
    # an identical republish re-affirms too (a new version and expiry, not a no-op)
    third = publisher(mirror).publish({"t": BitMap64([2, 4])}, ttl={"t": 7200})
    assert third.versions == {"t": 3}
    at3 = max(log_expiries(mirror, "t"))
    assert segs(mirror.server)[4] == {"t": [3, at3]} and at3 >= at2
    assert {mirror.server.ttl(SET, k) for k in segs(mirror.server)} == {-1}
    report = reconcile(LogDirTransport(mirror.log_dir), mirror.sink, dry_run=True)
    assert not report.differs, report.summary()
    # the segment published plain again: a full state, its members rewritten permanent (1 and
    # 4, still members in the log, removed)
    publisher(mirror).publish({"t": BitMap64([2, 3])})
    assert segs(mirror.server) == {1: {"p": 1}, 2: {"t": 4}, 3: {"t": 4}}
    assert not reconcile(LogDirTransport(mirror.log_dir), mirror.sink, dry_run=True).differs


# -- reconcile -------------------------------------------------------------------------------


def test_reconcile_compares_ttl_entries_and_clears_expired_ones(mirror: Mirror) -> None:
    publisher(mirror).publish({"t": BitMap64([1, 2, 3, 4]), "p": BitMap64([5])}, ttl={"t": 3600})
    ((at, _),) = log_expiries(mirror, "t").items()
    server = mirror.server
    past = int(time.time() * 1000) - 1_000
    server.seed(SET, 1, {BIN: {"t": 1}})  # plain value: would never lapse
    server.seed(SET, 2, {BIN: {"t": [1, at + 60_000]}})  # another expiry
    server.seed(SET, 3, {BIN: {"t": [1, past]}})  # expired in Aerospike, live in the log
    server.seed(SET, 5, {BIN: {"p": 1, "gone": [3, past]}})  # an expired entry of a non-member
    server.seed(SET, 6, {BIN: {"gone": [2, past]}})  # only expired entries
    server.seed(SET, 7, {BIN: {"gone": [2, past + 10**9]}})  # a live entry of a non-member
    log = LogDirTransport(mirror.log_dir)
    dry = reconcile(log, mirror.sink, dry_run=True)
    assert (dry.outdated_entries, dry.expired_entries, dry.extra_entries) == (3, 2, 1)
    assert dry.extra_records == 1 and dry.missing_records == 0 and dry.differs
    assert "expired entries 2" in dry.summary()
    done = reconcile(log, mirror.sink)
    assert done.outdated_entries == 3
    assert segs(server) == {
        1: {"t": [1, at]},
        2: {"t": [1, at]},
        3: {"t": [1, at]},
        4: {"t": [1, at]},
        5: {"p": 1},
    }
    assert not reconcile(log, mirror.sink, dry_run=True).differs
    # only expired entries left behind: cleared, but not a difference (exit 0 on --dry-run)
    server.seed(SET, 8, {BIN: {"t": [1, past]}})
    report = reconcile(log, mirror.sink, dry_run=True)
    assert report.expired_entries == 1 and not report.differs
    reconcile(log, mirror.sink)
    assert 8 not in segs(server)


def test_reconcile_restores_missing_ttl_records_with_their_expiries(mirror: Mirror) -> None:
    publisher(mirror).publish({"t": BitMap64([1, 2])}, ttl={"t": 3600})
    publisher(mirror).publish({"t": BitMap64([2, 3])}, ttl={"t": 7200})
    expiries = log_expiries(mirror, "t")
    at1, at2 = sorted(expiries)
    assert expiries == {at1: BitMap64([1]), at2: BitMap64([2, 3])}
    mirror.server.clear()
    report = reconcile(LogDirTransport(mirror.log_dir), mirror.sink)
    assert report.missing_records == 3
    assert segs(mirror.server) == {1: {"t": [2, at1]}, 2: {"t": [2, at2]}, 3: {"t": [2, at2]}}


def test_reconcile_treats_members_past_their_expiry_as_gone(mirror: Mirror) -> None:
    publisher(mirror).publish({"t": BitMap64([1, 2])}, ttl={"t": 1})
    publisher(mirror).publish({"t": BitMap64([2])}, ttl={"t": 3600})
    at1 = min(log_expiries(mirror, "t"))
    while time.time() * 1000 <= at1 + 50:
        time.sleep(0.05)
    log = LogDirTransport(mirror.log_dir)
    report = reconcile(log, mirror.sink, dry_run=True)  # 1 lapsed in the log and in Aerospike
    assert (report.expired_entries, report.missing_entries, report.outdated_entries) == (1, 0, 0)
    assert not report.differs
    reconcile(log, mirror.sink)
    assert set(segs(mirror.server)) == {2}


# -- the fallback, end to end ----------------------------------------------------------------


def test_a_sidecar_holding_other_segments_answers_ttl_members_from_aerospike_until_expiry(
    mirror: Mirror, tmp_path: Path
) -> None:
    ttl_s = 3
    publisher(mirror).publish(
        {"held": BitMap64([1]), "t": BitMap64([10, 11, BIG])}, ttl={"t": ttl_s}
    )
    ((at, _),) = log_expiries(mirror, "t").items()
    uds = tmp_path / "run" / "s.sock"
    with (
        sidecar_process("--log-dir", str(mirror.log_dir), "--uds", str(uds), "--segments",
                        "held", "--aerospike", mirror.server.address,
                        "--fallback-budget-ms", "500", port=free_port()),
        SidecarClient(str(uds), timeout=5) as client,
    ):  # fmt: skip
        assert_the_fallback_honours_the_expiry(client, at, "not_held")
        assert client.explain(1, "held").expires_at is None  # a plain segment, local


def test_a_sidecar_not_ready_yet_answers_ttl_members_from_aerospike_until_expiry(
    mirror: Mirror, tmp_path: Path
) -> None:
    """DESIGN.md "Replica semantics": a sidecar that is not ready answers from the fallback;
    for a TTL segment that is the stored `[version, expires_at_ms]`, a member until then and
    not after (an expired entry, still stored, is not a member)."""
    publisher(mirror).publish({"t": BitMap64([10, 11, BIG])}, ttl={"t": 3})
    ((at, _),) = log_expiries(mirror, "t").items()
    uds = tmp_path / "run" / "s.sock"
    missing = tmp_path / "not-yet"  # a log directory not created yet: never ready
    with (
        sidecar_process("--log-dir", str(missing), "--uds", str(uds), "--aerospike",
                        mirror.server.address, "--fallback-budget-ms", "500",
                        port=free_port(), ready=False),
        SidecarClient(str(uds), timeout=5) as client,
    ):  # fmt: skip
        assert client.status()["ready"] is False
        assert_the_fallback_honours_the_expiry(client, at, "not_ready")
        assert client.status()["ready"] is False


def assert_the_fallback_honours_the_expiry(client: SidecarClient, at: int, reason: str) -> None:
    """Segment "t" (10, 11 and BIG, version 1, expiring at `at`) answered by the fallback for
    `reason`: True until `at` on the sidecar's clock (the same host's), False from then on,
    while the entry is still stored."""
    deadline = time.monotonic() + 10  # the fallback connects in the background
    while client.explain(10, "t").source != "aerospike":
        assert time.monotonic() < deadline, "the fallback did not connect"
        time.sleep(0.05)
    assert time.time() * 1000 < at - 500, "too slow a machine for this TTL"
    explained = client.explain(BIG, "t")
    assert (explained.member, explained.source, explained.version) == (True, "aerospike", 1)
    assert explained.reason == reason and explained.expires_at == at  # the stored one
    assert client.check(11, "t") is True and client.check(12, "t") is False
    answers = []
    while time.time() * 1000 < at + 3_000:
        answers.append((time.time() * 1000, client.check(10, "t")))
        time.sleep(0.05)
    gone = client.explain(10, "t")  # the entry is still in Aerospike, past its expiry
    assert (gone.member, gone.source, gone.expires_at) == (False, "aerospike", None)
    assert all(member is True for t, member in answers if t < at - 50)
    assert all(member is False for t, member in answers if t >= at + 50)
    assert answers[0][1] is True and answers[-1][1] is False
