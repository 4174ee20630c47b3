"""`explain` shows a TTL membership's `expires_at` (DESIGN.md "Freshness") on every transport
(the Unix socket with both clients, HTTP) and in the embedded replica (`Replica.expires_at`),
and `/v1/segments` flags TTL segments (`ttl`, `next_expiry_at`), from the engine's expiry
index; a member expires there on the replica's clock, and explain follows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from publisher.publish import Publisher
from sidecar.client import AsyncSidecarClient, SidecarClient
from sidecar.replica import Replica
from sidecar.transport import LogDirTransport
from tests.logtools import SidecarThread, get_json, ready_replica


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Publisher, Replica, SidecarThread]]:
    log = LogDirTransport(tmp_path / "log")
    publisher = Publisher(log, writer_id="t", partitions=2)
    publisher.publish({"t": BitMap64([1, 2]), "p": BitMap64([1])}, ttl={"t": 3600})
    with ready_replica(LogDirTransport(tmp_path / "log"), 10) as replica:
        sock = Path("/tmp") / f"ttlx{tmp_path.name[-8:]}.sock"
        with SidecarThread(replica, uds_path=sock) as s:
            yield publisher, replica, s


def _until(condition: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_explain_shows_expires_at_on_every_path(
    served: tuple[Publisher, Replica, SidecarThread],
) -> None:
    publisher, replica, s = served
    at = replica.expires_at("t", 1)
    assert at is not None and at % 1000 == 0 and at > time.time() * 1000 + 3_500_000
    assert replica.expires_at("t", 3) is None  # not a member
    assert replica.expires_at("p", 1) is None  # a plain segment
    with SidecarClient(s.uds_path, timeout=5) as c:
        member = c.explain(1, "t")
        assert (member.member, member.source, member.expires_at) == (True, "local", at)
        assert c.explain(3, "t").expires_at is None
        assert c.explain(1, "p").expires_at is None and c.explain(1, "p").member is True
        assert c.explain(1, "unknown.segment").expires_at is None

    async def aio() -> int | None:
        async with AsyncSidecarClient(s.uds_path, timeout=5) as client:
            return (await client.explain(2, "t")).expires_at

    assert asyncio.run(aio()) == at
    code, doc = get_json(f"{s.http_url}/v1/explain?user=2&segment=t")
    assert code == 200 and doc["expires_at"] == at and doc["member"] is True
    code, doc = get_json(f"{s.http_url}/v1/explain?user=2&segment=p")
    assert code == 200 and doc["expires_at"] is None
    # a re-affirmation moves the expiry
    publisher.publish({"t": BitMap64([2])}, ttl={"t": 7200})
    _until(lambda: (replica.expires_at("t", 2) or 0) > at)
    later = replica.expires_at("t", 2)
    code, doc = get_json(f"{s.http_url}/v1/explain?user=2&segment=t")
    assert doc["expires_at"] == later and replica.expires_at("t", 1) == at


def test_segments_route_flags_ttl_segments_with_their_next_expiry(
    served: tuple[Publisher, Replica, SidecarThread],
) -> None:
    _, replica, s = served
    code, doc = get_json(f"{s.http_url}/v1/segments")
    assert code == 200
    by_name = {d["segment"]: d for d in doc["segments"]}
    assert by_name["p"]["ttl"] is False and by_name["p"]["next_expiry_at"] is None
    assert by_name["t"]["ttl"] is True
    at = replica.next_expiry("t")
    assert at == replica.expires_at("t", 1)
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at / 1000)) + ".000Z"
    assert by_name["t"]["next_expiry_at"] == iso
    code, one = get_json(f"{s.http_url}/v1/segments/t")
    assert code == 200 and one == by_name["t"]


def test_explain_follows_an_expiry_on_the_replica_clock(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    Publisher(log, writer_id="t", partitions=1).publish({"t": BitMap64([1, 2])}, ttl={"t": 60})
    with ready_replica(LogDirTransport(tmp_path / "log"), 10) as replica:
        at = replica.expires_at("t", 1)
        assert at is not None
        sock = Path("/tmp") / f"ttly{tmp_path.name[-8:]}.sock"
        with SidecarThread(replica, uds_path=sock) as s, SidecarClient(s.uds_path, timeout=10) as c:
            assert c.explain(1, "t").expires_at == at
            replica.clock_ms = lambda: at  # the replica's clock reaches the deadline
            _until(lambda: replica.contains(1, "t") is False)
            gone = c.explain(1, "t")
            assert (gone.member, gone.source, gone.expires_at) == (False, "local", None)
            assert replica.next_expiry("t") is None
            code, doc = get_json(f"{s.http_url}/v1/segments/t")
            assert doc["ttl"] is True and doc["next_expiry_at"] is None
            assert doc["cardinality"] == 0
