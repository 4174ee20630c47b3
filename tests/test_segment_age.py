"""Segment age (DESIGN.md "Freshness"): `max_age_seconds` in the manifest, heartbeats on
identical republishes, replicas marking a segment stale past its deadline (answers go to the
fallback, explain says `stale_age`, a metric counts them) and fresh again on the next publish
or heartbeat; checkpoints carry the ages; the manifest, definitions and stream rules."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from compute.definitions import DefinitionError, parse
from compute.rules import parse as parse_rules
from compute.segment_set import write_segment_set
from publisher.publish import Publisher
from publisher.segment_set import InputError, read_segment_set
from sidecar.client import SidecarClient
from sidecar.fallback.base import Fallback
from sidecar.record import Heartbeat, decode
from sidecar.replica import Replica
from sidecar.replica.engine import Engine
from sidecar.replica.state import Age, SegmentState
from sidecar.transport import LogDirTransport
from tests.logtools import SidecarThread, get_json


class MapFallback(Fallback):
    name = "map"

    async def segments_of(self, user: int) -> dict[str, int] | None:
        return {"a": 1} if user == 1 else {}


def _until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _heartbeats(log: LogDirTransport) -> list[Heartbeat]:
    reader = log.reader()
    try:
        ends = {p: end for p, (_, end) in reader.watermarks_all("deltas").items()}
        reader.assign({("deltas", p): 0 for p in ends})
        out: list[Heartbeat] = []
        seen = 0
        while seen < sum(ends.values()):
            recs = reader.poll(0.2)
            if not recs:
                break
            seen += len(recs)
            out += [r for r in (decode(x.value) for x in recs if x.value) if type(r) is Heartbeat]
        return out
    finally:
        reader.close()


# -- the engine ------------------------------------------------------------------------------------


def test_engine_heartbeats_set_renew_and_clear_the_age() -> None:
    engine = Engine()
    engine.install("a", SegmentState(BitMap64([1]), 3, 1, 0))
    engine.apply_heartbeat(Heartbeat("a", 3, 60, 1_000))
    assert engine.ages["a"] == Age(60_000, 1_000)
    engine.apply_heartbeat(Heartbeat("a", 3, 60, 500))  # a replayed older beat: no going back
    assert engine.ages["a"].heard_ms == 1_000
    engine.apply_heartbeat(Heartbeat("a", 2, 60, 9_000))  # another version: nothing
    engine.apply_heartbeat(Heartbeat("a", 4, 60, 9_000))
    engine.apply_heartbeat(Heartbeat("b", 1, 60, 9_000))  # a segment not held
    assert engine.ages == {"a": Age(60_000, 1_000)}
    engine.apply_heartbeat(Heartbeat("a", 3, 0, 2_000))  # max age cleared
    assert engine.ages == {}
    engine.apply_heartbeat(Heartbeat("a", 3, 5, 2_000))
    engine.install_drop("a", 4)
    assert engine.ages == {}


# -- the publisher ---------------------------------------------------------------------------------


def test_identical_republish_writes_a_heartbeat_and_only_for_aged_segments(
    tmp_path: Path,
) -> None:
    log = LogDirTransport(tmp_path / "log")
    publisher = Publisher(log, writer_id="t", partitions=2)
    first = publisher.publish({"a": BitMap64([1]), "b": BitMap64([2])}, max_age={"a": 60})
    assert first.versions == {"a": 1, "b": 1} and first.heartbeats == 1
    again = publisher.publish({"a": BitMap64([1]), "b": BitMap64([2])}, max_age={"a": 60})
    assert again.versions == {} and again.heartbeats == 1 and again.records == 1
    assert "heartbeats 1" in again.summary()
    plain = publisher.publish({"b": BitMap64([2])}, max_age={"a": 60})
    assert plain.records == 0  # "b" has no max age: an identical publish writes nothing
    kept = publisher.publish({"a": BitMap64([1])})  # no manifest (a rollback): kept
    assert kept.heartbeats == 1
    cleared = publisher.publish({"a": BitMap64([1])}, max_age={})  # the manifest dropped it
    assert cleared.heartbeats == 1
    assert publisher.publish({"a": BitMap64([1])}, max_age={}).records == 0
    beats = _heartbeats(log)
    assert [(b.segment, b.version, b.max_age_s) for b in beats] == [("a", 1, 60)] * 3 + [
        ("a", 1, 0)
    ]


# -- a replica -------------------------------------------------------------------------------------


@pytest.fixture
def aged(tmp_path: Path) -> Iterator[tuple[Publisher, Replica, SidecarThread]]:
    log = LogDirTransport(tmp_path / "log")
    publisher = Publisher(log, writer_id="t", partitions=2)
    publisher.publish({"a": BitMap64([1]), "b": BitMap64([2])}, max_age={"a": 2})
    replica = Replica(LogDirTransport(tmp_path / "log"), poll_interval=0.01).start()
    assert replica.wait_ready(10)
    sock = Path("/tmp") / f"age{tmp_path.name[-8:]}.sock"
    with SidecarThread(replica, MapFallback(), uds_path=sock) as s:
        yield publisher, replica, s
    replica.stop(save=False)


def test_a_segment_goes_stale_past_its_max_age_and_fresh_with_a_heartbeat(
    aged: tuple[Publisher, Replica, SidecarThread],
) -> None:
    publisher, replica, s = aged
    before = replica.local("a")
    # fresh before its max age, when the set-up took less than its 2 s (a loaded machine's
    # may not: the replica's clock says; the deadline itself: the replica-clock test below)
    if replica.clock_ms() < replica.engine.ages["a"].deadline_ms - 500:
        assert isinstance(before, SegmentState), before
    _until(lambda: replica.local("a") == "stale_age", 20)  # max_age_seconds 2, real clock
    assert isinstance(replica.local("b"), SegmentState)  # no max age: never stale
    assert replica.contains(1, "a") is None
    assert replica.status()["stale_age"] == ["a"]
    with SidecarClient(s.uds_path, timeout=5) as c:
        explained = c.explain(1, "a")
        assert (explained.source, explained.reason, explained.member) == (
            "aerospike",
            "stale_age",
            True,
        )
        assert c.check(2, "a") is False  # the fallback's answer, not the replica's stale one
        assert c.check(2, "b") is True
    _, metrics = _metrics(s)
    assert "seg_replica_stale_age_segments 1.0" in metrics
    # the heartbeat of an identical republish (a longer max age: a loaded machine must not
    # see it go stale again before the asserts)
    result = publisher.publish({"a": BitMap64([1]), "b": BitMap64([2])}, max_age={"a": 60})
    assert result.versions == {} and result.heartbeats == 1
    _until(lambda: isinstance(replica.local("a"), SegmentState), 10)
    assert replica.status()["stale_age"] == []
    code, doc = get_json(f"{s.http_url}/v1/explain?user=1&segment=a")
    assert code == 200 and doc["source"] == "local"


def _metrics(s: SidecarThread) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(f"{s.http_url}/metrics", timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_the_deadline_is_judged_on_the_replica_clock(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    Publisher(log, writer_id="t", partitions=1).publish({"a": BitMap64([1])}, max_age={"a": 60})
    replica = Replica(LogDirTransport(tmp_path / "log"), poll_interval=0.01)
    now = [int(time.time() * 1000)]
    replica.clock_ms = lambda: now[0]
    replica.start()
    try:
        assert replica.wait_ready(10)
        heard = replica.engine.ages["a"].heard_ms
        now[0] = heard + 60_000
        time.sleep(0.1)
        assert isinstance(replica.local("a"), SegmentState)  # at the deadline: still fresh
        generation = replica.engine.generation
        now[0] = heard + 60_001
        _until(lambda: replica.local("a") == "stale_age", 10)
        assert replica.engine.generation > generation  # the shared replica's writer sees it
        now[0] = heard
        _until(lambda: isinstance(replica.local("a"), SegmentState), 10)
    finally:
        replica.stop(save=False)


def test_a_checkpoint_keeps_the_ages(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    Publisher(log, writer_id="t", partitions=1).publish({"a": BitMap64([1])}, max_age={"a": 1})
    first = Replica(LogDirTransport(tmp_path / "log"), state_dir=tmp_path / "state").start()
    assert first.wait_ready(10)
    ages = dict(first.engine.ages)
    first.stop()  # writes the checkpoint
    again = Replica(LogDirTransport(tmp_path / "log"), state_dir=tmp_path / "state")
    again.start()
    try:
        assert again.wait_ready(10) and again.started_from == "checkpoint"
        assert again.engine.ages == ages
        _until(lambda: again.local("a") == "stale_age", 10)  # 1 s after the publish
    finally:
        again.stop(save=False)


# -- the inputs ------------------------------------------------------------------------------------


def _manifest(tmp_path: Path, **entry: object) -> Path:
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    write_segment_set(tmp_path / "set", {"a": BitMap64([1])}, when, {"a": entry})  # type: ignore[dict-item]
    return tmp_path / "set"


def test_manifest_max_age_seconds_is_read_and_validated(tmp_path: Path) -> None:
    assert read_segment_set(_manifest(tmp_path, max_age_seconds=30)).max_age == {"a": 30}
    for bad in (0, -1, 2**31, "30", 1.5, True):
        with pytest.raises(InputError, match="max_age_seconds must be an integer in 1.."):
            read_segment_set(_manifest(tmp_path, max_age_seconds=bad))


def test_definitions_carry_max_age_seconds_into_the_manifest(tmp_path: Path) -> None:
    text = '[[segment]]\nname = "a"\nsql = "SELECT 1 AS user_id"\nmax_age_seconds = 90\n'
    (segment,) = parse(text)
    assert segment.options() == {"max_age_seconds": 90}
    manifest = write_segment_set(
        tmp_path / "s", {"a": BitMap64([1])}, dt.datetime.now(dt.UTC), {"a": segment.options()}
    )
    assert manifest["segments"]["a"]["max_age_seconds"] == 90
    assert json.loads((tmp_path / "s" / "manifest.json").read_text()) == manifest
    with pytest.raises(DefinitionError, match="max_age_seconds"):
        parse(text.replace("90", "0"))


def test_stream_rules_carry_max_age_seconds() -> None:
    text = (
        '[[stream]]\nname = "c"\nevent = "add_to_cart"\nwithin_minutes = 30\n'
        "max_age_seconds = 120\n"
        '[[stream]]\nname = "d"\nevent = "add_to_cart"\nwithin_minutes = 30\n'
    )
    rules = parse_rules(text).rules
    assert [r.max_age_seconds for r in rules] == [120, None]
    with pytest.raises(DefinitionError, match="max_age_seconds"):
        parse_rules(text.replace("120", '"x"'))
