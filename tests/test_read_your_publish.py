"""Read-your-publish (DESIGN.md "Freshness"): `check_at` over the socket (both clients), HTTP
`min_version`/`wait_ms`, the embedded replica, the fallback's qualification, and waiters
woken by the replica thread rather than by polling. On the real broker: 1,000 publishes,
each checked at its returned version from a second sidecar, never an older answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from pyroaring import BitMap64

from publisher.publish import Publisher
from sidecar.client import AsyncSidecarClient, SidecarClient
from sidecar.client.base import BadRequestError
from sidecar.fallback.base import Fallback
from sidecar.ids import BadRequest
from sidecar.replica import Replica
from sidecar.replica.waiters import Waiters
from sidecar.server.queries import qualifies
from sidecar.transport import LogDirTransport
from sidecar.transport.base import Transport
from tests.logtools import SidecarThread, get_json, started_replica


class MapFallback(Fallback):
    """User 1 is in "remote" at version 5 and in "seg" at version 1."""

    name = "map"

    async def segments_of(self, user: int) -> dict[str, int] | None:
        return {"remote": 5, "seg": 1} if user == 1 else {}


# -- the waiters on their own --------------------------------------------------------------------


def test_waiter_is_woken_by_a_notify_from_another_thread() -> None:
    waiters = Waiters()
    landed = threading.Event()

    def land() -> None:
        time.sleep(0.05)
        landed.set()
        waiters.notify("a")

    async def main() -> bool:
        threading.Thread(target=land).start()
        return await waiters.wait("a", landed.is_set, 10)

    started = time.monotonic()
    assert asyncio.run(main()) is True
    assert time.monotonic() - started < 5  # woken, not the 10 s timeout
    assert len(waiters) == 0


def test_waiter_times_out_and_leaves_nothing_registered() -> None:
    waiters = Waiters()
    assert asyncio.run(waiters.wait("a", lambda: False, 0.02)) is False
    assert waiters.wait_blocking("a", lambda: False, 0.02) is False
    assert len(waiters) == 0
    waiters.notify("a")  # nobody waits: nothing happens


def test_notify_of_another_segment_does_not_end_the_wait() -> None:
    waiters = Waiters()
    woken: list[bool] = []

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, waiters.notify, "b")
        return await waiters.wait("a", lambda: bool(woken), 0.1)

    assert asyncio.run(main()) is False


def test_qualifies() -> None:
    assert qualifies({"s": 7}, "s", 7) == 7
    assert qualifies({"s": 8}, "s", 7) == 8
    assert qualifies({"s": 6}, "s", 7) is None  # written before the version asked for
    assert qualifies({}, "s", 1) is None  # a non-member carries no version
    assert qualifies(None, "s", 1) is None


# -- a sidecar over a log directory ---------------------------------------------------------------


@pytest.fixture
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Publisher, SidecarThread]]:
    d = Path(tmp_path_factory.mktemp("ryp", numbered=True))
    short = Path("/tmp") / f"ryp{d.name[-6:]}{threading.get_ident() % 1000}"
    short.mkdir(exist_ok=True)
    publisher = Publisher(LogDirTransport(d / "log"), writer_id="ryp", partitions=2, session=True)
    publisher.publish({"seg": BitMap64([1])})
    replica = Replica(LogDirTransport(d / "log"), poll_interval=0.01).start()
    assert replica.wait_ready(10)
    with SidecarThread(replica, MapFallback(), uds_path=short / "s.sock") as s:
        yield publisher, s
    replica.stop(save=False)
    publisher.close()
    (short / "s.sock").unlink(missing_ok=True)
    short.rmdir()


def _check_url(s: SidecarThread, **query: object) -> str:
    return f"{s.http_url}/v1/check?{urlencode(query)}"


def test_publish_returns_versions_and_check_at_answers_at_them(
    setup: tuple[Publisher, SidecarThread],
) -> None:
    publisher, s = setup
    replica: Replica = s.sidecar.replica
    for v in range(2, 12):
        versions = publisher.publish({"seg": BitMap64([v])}).versions
        assert versions == {"seg": v}
        with SidecarClient(s.uds_path, timeout=5) as c:
            assert c.check_at(v, "seg", v, 1000) is True
            assert c.check_at(v - 1, "seg", v, 1000) is False
        code, doc = get_json(_check_url(s, user=v, segment="seg", min_version=v))
        assert code == 200 and doc["member"] is True and doc["source"] == "local"
        assert doc["version"] >= v
        assert replica.check_at(v, "seg", v, 1000) is True
    assert len(replica.waiters) == 0


def test_a_waiting_check_is_woken_when_the_version_lands(
    setup: tuple[Publisher, SidecarThread],
) -> None:
    publisher, s = setup

    async def main() -> tuple[bool | None, bool | None]:
        async with AsyncSidecarClient(s.uds_path, timeout=5) as c:
            waiting = asyncio.ensure_future(c.check_at(2, "seg", 2, 1000))
            plain = asyncio.ensure_future(_plain_check(s.uds_path))
            answered_plain = await plain
            assert not waiting.done()  # the waiter held nobody else up
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: publisher.publish({"seg": BitMap64([2])})
            )
            return await waiting, answered_plain

    assert asyncio.run(main()) == (True, True)
    assert len(s.sidecar.replica.waiters) == 0


async def _plain_check(path: str) -> bool | None:
    async with AsyncSidecarClient(path, timeout=5) as c:
        return await c.check(1, "seg")


def test_past_the_wait_the_fallback_if_it_qualifies_else_unknown(
    setup: tuple[Publisher, SidecarThread],
) -> None:
    _, s = setup
    with SidecarClient(s.uds_path, timeout=5) as c:
        started = time.monotonic()
        assert c.check_at(1, "seg", 9, 100) is None  # version 9 never lands; "seg" at 1 is older
        assert time.monotonic() - started >= 0.09
        assert c.check_at(1, "seg", 1, 0) is True  # the replica has it: local
        assert c.check_at(1, "remote", 5, 0) is True  # not held locally: fallback at 5
        assert c.check_at(1, "remote", 6, 0) is None  # the fallback's 5 is older than 6
        assert c.check_at(2, "remote", 1, 0) is None  # a non-member never qualifies
        assert c.check(2, "remote") is False  # (a plain check answers it)
    code, doc = get_json(_check_url(s, user=1, segment="remote", min_version=5, wait_ms=0))
    assert (code, doc["member"], doc["source"], doc["version"]) == (200, True, "aerospike", 5)
    code, doc = get_json(_check_url(s, user=1, segment="seg", min_version=3, wait_ms=20))
    assert (code, doc["member"], doc["source"], doc["version"]) == (200, None, "none", None)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((1, "seg", -1, 0), "min_version"),
        ((1, "seg", True, 0), "min_version"),
        ((1, "seg", 1, 1001), "wait_ms"),
        ((1, "seg", 1, 1.5), "wait_ms"),
        ((-1, "seg", 1, 0), "user"),
        ((1, "bad seg", 1, 0), "segment"),
    ],
)
def test_bad_arguments_are_refused_by_every_entry_point(
    setup: tuple[Publisher, SidecarThread], args: tuple[object, ...], words: str
) -> None:
    _, s = setup
    with SidecarClient(s.uds_path, timeout=5) as c, pytest.raises(BadRequestError, match=words):
        c.check_at(*args)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match=words):
        s.sidecar.replica.check_at(*args)  # type: ignore[arg-type]
    user, segment, min_version, wait_ms = args
    code, doc = get_json(
        _check_url(s, user=user, segment=segment, min_version=min_version, wait_ms=wait_ms)
    )
    assert code == 400, doc


def test_http_wait_ms_needs_min_version(setup: tuple[Publisher, SidecarThread]) -> None:
    _, s = setup
    code, doc = get_json(_check_url(s, user=1, segment="seg", wait_ms=5))
    assert code == 400 and "min_version" in doc["error"]


def test_embedded_replica_waits_for_the_version(tmp_path: Path) -> None:
    publisher = Publisher(LogDirTransport(tmp_path / "log"), writer_id="e", partitions=1)
    publisher.publish({"seg": BitMap64([1])})
    with started_replica(LogDirTransport(tmp_path / "log"), poll_interval=0.01) as replica:
        assert replica.wait_ready(10)
        assert replica.check_at(1, "seg", 2, 20) is None
        later = threading.Timer(0.05, lambda: publisher.publish({"seg": BitMap64([2])}))
        later.start()
        assert replica.check_at(2, "seg", 2, 1000) is True
        later.join()
        assert replica.check_at(1, "seg", 2, 0) is False
        assert len(replica.waiters) == 0


# -- the real broker: 1,000 publishes, each read at its version from a second sidecar -------------


@pytest.mark.kafka
@pytest.mark.timeout(900)
def test_read_your_publish_on_kafka_never_answers_older(
    kafka_bootstrap: str, topic_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from sidecar.transport import KafkaTransport

    def transport() -> Transport:
        return KafkaTransport(kafka_bootstrap, prefix=topic_prefix)

    d = Path("/tmp") / f"ryk{topic_prefix[-6:]}"
    d.mkdir(exist_ok=True)
    publisher = Publisher(transport(), writer_id=f"{topic_prefix}-ryp", partitions=2, session=True)
    publisher.publish({"seg": BitMap64([1])})
    replica = Replica(transport(), poll_interval=0.01).start()
    assert replica.wait_ready(60)
    unanswered = 0
    try:
        with (
            SidecarThread(replica, uds_path=d / "s.sock") as s,
            SidecarClient(s.uds_path, timeout=5) as c,
        ):
            for i in range(1000):
                # version v holds user v alone: an older state says False for v, True for v-1
                v = publisher.publish({"seg": BitMap64([i + 2])}).versions["seg"]
                assert v == i + 2
                now, before = c.check_at(v, "seg", v, 1000), c.check_at(v - 1, "seg", v, 1000)
                assert now is not False and before is not True, (v, now, before)
                unanswered += (now is None) + (before is None)
                if i % 100 == 0:
                    code, doc = get_json(_check_url(s, user=v, segment="seg", min_version=v))
                    assert code == 200 and doc["member"] is not False
                    assert doc["version"] is None or doc["version"] >= v
    finally:
        replica.stop(save=False)
        publisher.close()
        (d / "s.sock").unlink(missing_ok=True)
        d.rmdir()
    # a wait of 1 s covers the broker's delivery on a loaded machine nearly always
    assert unanswered <= 20, unanswered
