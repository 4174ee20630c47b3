"""A 20M-member segment: chunked snapshots and split deltas, written in one transaction and
assembled by a cold replica and a tailing one, on the log directory and on real Kafka."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from publisher import Publisher
from sidecar.record import Delta, SnapshotChunk, decode
from sidecar.replica import Replica
from sidecar.replica.forms import to_bitmap
from sidecar.transport import LogDirTransport, Transport
from tests.logtools import started_replica


@pytest.fixture(params=["logdir", pytest.param("kafka", marks=pytest.mark.kafka)])
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    if request.param == "logdir":
        yield LogDirTransport(tmp_path / "log")
    else:
        from sidecar.transport.kafka import KafkaTransport

        yield KafkaTransport(
            request.getfixturevalue("kafka_bootstrap"), request.getfixturevalue("topic_prefix")
        )


def _records(transport: Transport) -> list[object]:
    out: list[object] = []
    with transport.reader() as reader:
        ends = {}
        for topic in ("deltas", "snapshots"):
            for p in range(reader.partitions):
                low, end = reader.watermarks(topic, p)  # type: ignore[arg-type]
                ends[(topic, p)] = (low, end)
        reader.assign({tp: low for tp, (low, _) in ends.items()})  # type: ignore[misc]
        while any(reader.position(*tp) < end for tp, (_, end) in ends.items()):  # type: ignore[arg-type]
            for rec in reader.poll(0.5):
                if rec.value is not None:
                    out.append(decode(rec.value, snapshots=rec.topic == "snapshots"))
    return out


def _wait_version(replica: Replica, segment: str, version: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        state = replica.state(segment)
        if state is not None and state.version == version and state.fresh:
            return
        assert time.monotonic() < deadline, replica.status()
        time.sleep(0.05)


def test_twenty_million_members(transport: Transport) -> None:
    rng = random.Random(11)
    big = BitMap64()
    big.add_range(0, 30_000_000)  # dense runs ...
    big.update(rng.sample(range(2**40, 2**41), 200_000))  # ... and sparse 64-bit ids
    big -= BitMap64(range(0, 30_000_000, 3))  # 20M + 0.2M members, bitset containers
    assert len(big) > 20_000_000
    pub = Publisher(transport, partitions=2)
    assert pub.publish({"big": big, "small": BitMap64([1, 2])}).versions == {
        "big": 1,
        "small": 1,
    }
    records = _records(transport)
    chunks = [r for r in records if isinstance(r, SnapshotChunk) and r.segment == "big"]
    parts = [r for r in records if isinstance(r, Delta) and r.segment == "big"]
    assert len(chunks) > 1 and {c.chunks for c in chunks} == {len(chunks)}
    assert len(parts) > 1 and {p.parts for p in parts} == {len(parts)}

    with started_replica(transport) as cold:
        assert cold.wait_ready(120), cold.status()
        _wait_version(cold, "big", 1)
        assert to_bitmap(cold.state("big").bitmap) == big  # type: ignore[union-attr]

        # A large change while the replica tails: 5M removes and 1M adds, split too.
        changed = big - BitMap64(range(0, 15_000_000))
        changed.add_range(40_000_000, 41_000_000)
        assert pub.publish({"big": changed}).versions == {"big": 2}
        _wait_version(cold, "big", 2)
        assert to_bitmap(cold.state("big").bitmap) == changed  # type: ignore[union-attr]
        assert cold.engine.counters.diverged == 0 and cold.engine.counters.gaps == 0
