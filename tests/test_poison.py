"""Poison records written straight into both topics (tests/poison.py), for a replica that
reads them while tailing, one that starts after them, and the publisher, on both transports.

The promise: a record that cannot be applied is skipped and counted by reason
(`seg_replica_skipped_records`), never a crash, never a segment under an invalid id, and the
valid records around it are applied exactly.
"""

from __future__ import annotations

import time
import urllib.request

from pyroaring import BitMap64

from publisher import Publisher
from sidecar.replica import Replica
from sidecar.replica.forms import to_bitmap
from sidecar.transport.base import Transport
from tests.logtools import SidecarThread, get_json, ready_replica
from tests.poison import POISON_SEGMENTS, expected_skips, inject

PARTITIONS = 2
WAIT = 60

TRUTH1 = {"a": BitMap64([1, 2, 3]), "b": BitMap64(range(100, 200)), "c": BitMap64([2**64 - 1])}
TRUTH2 = {"a": BitMap64([2, 3, 4]), "b": BitMap64(range(150, 260)), "c": BitMap64([7])}


def publish(transport: Transport, desired: dict[str, BitMap64]) -> dict[str, int]:
    writer = getattr(transport, "prefix", "logdir") + "-pub"
    pub = Publisher(transport, writer_id=writer, partitions=PARTITIONS)
    return pub.publish(desired).versions


def settled(replica: Replica, truth: dict[str, BitMap64], version: int) -> None:
    """Wait until the replica holds `truth` at `version` (the poison segments aside)."""
    deadline = time.monotonic() + WAIT
    while True:
        held = {
            s: (st.version, to_bitmap(st.bitmap))
            for s, st in list(replica.engine.segments.items())
            if s not in POISON_SEGMENTS
        }
        if (
            held == {s: (version, bm) for s, bm in truth.items()}
            and not replica.engine.needs_resync
        ):
            return
        assert time.monotonic() < deadline, replica.status()
        time.sleep(0.02)


def assert_poison_handled(replica: Replica, *, snapshots_read: bool) -> None:
    skipped = replica.engine.counters.skipped
    topics = ("deltas", "snapshots") if snapshots_read else ("deltas",)
    for reason, count in expected_skips(topics).items():
        assert skipped.get(reason, 0) >= count, (reason, skipped)
    segments = replica.engine.segments
    for name, health in POISON_SEGMENTS.items():
        assert segments[name].health.value == health
        assert replica.contains(1, name) is None  # never answered locally
    assert set(segments) == set(TRUTH1) | set(POISON_SEGMENTS)
    assert replica.error is None


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_a_fresh_replica_skips_and_counts_poison(transport: Transport) -> None:
    publish(transport, TRUTH1)
    inject(transport, partitions=PARTITIONS)
    publish(transport, TRUTH2)
    with ready_replica(transport, WAIT) as replica:
        settled(replica, TRUTH2, 2)
        assert_poison_handled(replica, snapshots_read=True)
        with SidecarThread(replica, uds_path=None, http_host="127.0.0.1") as s:
            listed = [d["segment"] for d in get_json(s.http_url + "/v1/segments")[1]["segments"]]
            assert sorted(listed) == sorted([*TRUTH1, *POISON_SEGMENTS])
            metrics = http_text(s.http_url + "/metrics")
            assert 'seg_replica_skipped_records_total{reason="bad_segment"}' in metrics
            status = get_json(s.http_url + "/v1/status")[1]
            assert status["skipped"]["bad_segment"] >= 2


def test_a_tailing_replica_skips_poison_and_applies_what_follows(transport: Transport) -> None:
    publish(transport, TRUTH1)
    with ready_replica(transport, WAIT) as replica:
        settled(replica, TRUTH1, 1)
        inject(transport, partitions=PARTITIONS)
        assert publish(transport, TRUTH2) == {"a": 2, "b": 2, "c": 2}
        settled(replica, TRUTH2, 2)
        assert_poison_handled(replica, snapshots_read=False)


def test_the_publisher_publishes_through_poison(transport: Transport) -> None:
    publish(transport, TRUTH1)
    inject(transport, partitions=PARTITIONS)
    assert publish(transport, TRUTH2) == {"a": 2, "b": 2, "c": 2}
    assert publish(transport, TRUTH2) == {}  # it recovered the exact state past the poison
    # the poison segment "liar" is diverged in the log: the publisher replaces it
    assert publish(transport, {**TRUTH2, "liar": BitMap64([9])}) == {"liar": 2}
    with ready_replica(transport, WAIT) as replica:
        deadline = time.monotonic() + WAIT
        while not (replica.state("liar") and replica.state("liar").fresh):  # type: ignore[union-attr]
            assert time.monotonic() < deadline, replica.status()
            time.sleep(0.02)
        assert list(replica.state("liar").bitmap) == [9]  # type: ignore[union-attr]
