"""Kafka topics deleted and created again under a reader and a serving replica (the Kafka side
of tests/test_logdir_damage.py's repaired log): the topics get new ids, so the offsets and
versions a replica stands at may mean other changes now. A reader knows the ids it opened
(`KafkaReader.identity()`) and raises NewLogIdentity once the topics have new ids, are gone, or
a partition went back under it; a serving replica bootstraps again aside and then answers
exactly the new log's truth, read-your-publish waiting meanwhile; a restart does not trust a
checkpoint of the old topics."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from pyroaring import BitMap64

from publisher import Publisher
from sidecar.client import SidecarClient
from sidecar.replica import Replica, checkpoint
from sidecar.transport.base import NewLogIdentity, TransportError
from sidecar.transport.kafka import KafkaTransport
from tests.logtools import (
    HeldRebootstrap,
    SidecarThread,
    ready_replica,
    started_replica,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

WAIT = 60
HISTORY = [
    {"a": BitMap64([1]), "b": BitMap64([10])},
    {"a": BitMap64([1, 2]), "b": BitMap64([10, 11])},
    {"a": BitMap64([1, 2, 3]), "b": BitMap64([11])},
    {"a": BitMap64([3]), "b": BitMap64([11, 12])},
]
#: what the new topics get: other segments, and a and b at versions the old log also had
AGAIN = [
    {"a": BitMap64([5, 6]), "c": BitMap64([20])},
    {"a": BitMap64([5, 6, 7]), "c": BitMap64([20, 21])},
]


def publish_all(t: KafkaTransport, history: list[dict[str, BitMap64]]) -> None:
    publisher = Publisher(t, writer_id=f"{t.prefix}-pub", partitions=2)
    for desired in history:
        publisher.publish(desired)


def delete_topics(t: KafkaTransport) -> None:
    admin = t._admin()
    for fut in admin.delete_topics([t.topic("deltas"), t.topic("snapshots")]).values():
        fut.result()
    deadline = time.monotonic() + WAIT
    while True:  # until the metadata no longer names them (a writer would find them there)
        try:
            t.partition_count()
        except TransportError:
            return
        assert time.monotonic() < deadline, "the topics are still there"
        time.sleep(0.05)


def recreate(t: KafkaTransport, history: list[dict[str, BitMap64]]) -> None:
    """The topics deleted and created again, then `history` published to them."""
    delete_topics(t)
    publish_all(t, history)


def answers(replica: Replica) -> dict[str, tuple[int, list[int]]]:
    return {s: (st.version, list(st.bitmap)) for s, st in replica.segment_items()}


def wait_for(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def poll_until_raises(reader, seconds: float = 15.0) -> str:  # type: ignore[no-untyped-def]
    """NewLogIdentity's message from polls and watermarks within `seconds` (a call that
    blocks past them fails it too: the watermarks of deleted topics once took 30 s)."""
    started = time.monotonic()
    while time.monotonic() < started + seconds:
        try:
            reader.poll(0.1)
            reader.watermarks_all("deltas")
        except NewLogIdentity as exc:
            took = time.monotonic() - started
            assert took < seconds, f"NewLogIdentity only after {took:.1f} s"
            return str(exc)
    raise AssertionError(f"no NewLogIdentity within {seconds} s")


@pytest.mark.parametrize("after", ["gone", "shorter", "longer"])
def test_a_kafka_reader_raises_new_log_identity_when_the_topics_are_created_again(
    kafka_bootstrap: str, topic_prefix: str, after: str
) -> None:
    """Whether the topics are gone, back shorter than where the reader stands (librdkafka
    resets to the start: offset out of range; the reader sees its position go back) or back
    longer (the consumer reads on from its old offset, in other records: only the topics' ids
    say so), the reader says so within a few seconds."""
    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    publish_all(t, HISTORY)
    with t.reader() as reader:
        opened = reader.identity()
        assert opened == t.identity() and "ids " in opened
        reader.assign({("deltas", p): 0 for p in range(reader.partitions)})
        ends = {("deltas", p): end for p, (_, end) in reader.watermarks_all("deltas").items()}
        list(reader.read_until(ends))
        for _ in range(25):  # an idle reader's polls and watermarks say nothing
            assert reader.poll(0.1) == []
            reader.watermarks_all("deltas")
        if after == "gone":
            delete_topics(t)
        elif after == "shorter":
            recreate(t, AGAIN[:1])
        else:  # the consumer fetches again only once the new topics are past where it stood
            reader._consumer.pause(reader._assigned)
            recreate(t, AGAIN * 6)
            assert all(
                end > reader.position("deltas", p)
                for p, (_, end) in reader.watermarks_all("deltas").items()
                if reader.position("deltas", p) > 0
            )
            reader._consumer.resume(reader._assigned)
        message = poll_until_raises(reader)
    assert topic_prefix in message and "\n" not in message
    assert {"gone": "are gone", "shorter": "went back", "longer": "have new ids"}[after] in message
    if after != "gone":
        assert t.identity() != opened
        with t.reader() as again:
            assert again.identity() == t.identity()


def test_the_topics_ids_are_asked_for_as_often_as_the_transport_says(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Topics back longer under a reader are seen only by asking for their ids: a reader of a
    transport told to ask every hour reads on for seconds without saying so, one told to ask
    every 0.1 s says so; and an interval that is not a positive number is refused."""
    for bad in [0, -1, float("inf"), float("nan")]:
        with pytest.raises(ValueError, match="identity_check_s must be a positive number"):
            KafkaTransport(kafka_bootstrap, prefix=topic_prefix, identity_check_s=bad)
    rare = KafkaTransport(kafka_bootstrap, prefix=topic_prefix, identity_check_s=3600)
    often = KafkaTransport(kafka_bootstrap, prefix=topic_prefix, identity_check_s=0.1)
    publish_all(rare, HISTORY)
    with rare.reader() as slow, often.reader() as quick:
        for reader in (slow, quick):
            reader.assign({("deltas", p): 0 for p in range(reader.partitions)})
            ends = {("deltas", p): e for p, (_, e) in reader.watermarks_all("deltas").items()}
            list(reader.read_until(ends))
            reader._consumer.pause(reader._assigned)
        recreate(rare, AGAIN * 6)
        for reader in (slow, quick):
            reader._consumer.resume(reader._assigned)
        assert "have new ids" in poll_until_raises(quick)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            slow.poll(0.1)
            slow.watermarks_all("deltas")


@pytest.mark.parametrize("after", ["shorter", "longer"])
def test_a_sidecar_tailing_through_recreated_topics_answers_as_a_fresh_one(
    kafka_bootstrap: str, topic_prefix: str, after: str, tmp_path: Path
) -> None:
    """A sidecar serving the old topics: once they are created again with other segments, it
    bootstraps again by itself and answers exactly the new log's truth (not a mix: the old
    log's b is gone, c is there, a is the new log's at the new log's version)."""
    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    publish_all(t, HISTORY)
    again = AGAIN if after == "shorter" else AGAIN * 6
    with started_replica(t, poll_interval=0.01) as tailing:
        assert tailing.wait_ready(WAIT), tailing.status()
        wait_for(lambda: tailing.engine.version_of("a") == 4, "all four publishes")
        with SidecarThread(tailing, uds_path=tmp_path / "s.sock", http_host=None) as sidecar:
            reader = tailing._reader
            assert reader is not None
            if after == "longer":  # as in the reader's test: no offset goes back
                reader._consumer.pause(reader._assigned)  # type: ignore[attr-defined]
            recreate(t, again)
            if after == "longer":  # unless the replica saw them shorter and closed it
                with contextlib.suppress(RuntimeError):
                    reader._consumer.resume(reader._assigned)  # type: ignore[attr-defined]
            with ready_replica(t, WAIT) as fresh:
                want = answers(fresh)
                assert set(want) == {"a", "c"} and want["a"][1] == [5, 6, 7]
                wait_for(lambda: answers(tailing) == want, "the sidecar to answer the same")
                assert tailing.ready and tailing.status()["rebootstraps"] >= 1
                assert tailing._reader is not None
                assert tailing._reader.identity() == t.identity()
                with SidecarClient(sidecar.uds_path, timeout=5) as client:
                    for user in [*range(16), 20, 21]:
                        for segment in ("a", "b", "c"):
                            assert client.check(user, segment) == fresh.contains(user, segment)


def test_read_your_publish_waits_for_the_bootstrap_after_topics_are_recreated(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """While a serving replica bootstraps the new topics aside (the old state answering
    meanwhile, its status saying so), its versions are of the old topics: their a at version
    4 is not the new topics' a at version 2. `check_at` waits for the new state, never
    answers from the old one; once the new state is in, it answers from it."""
    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    publish_all(t, HISTORY)
    with started_replica(t, poll_interval=0.01) as tailing:
        held = HeldRebootstrap(tailing, WAIT)
        assert tailing.wait_ready(WAIT), tailing.status()
        wait_for(lambda: tailing.engine.version_of("a") == 4, "all four publishes")

        def rebootstrapping() -> None:
            st = tailing.status()
            assert st["rebootstrapping_since_ms"] is not None
            assert "bootstrapping again" in str(st["reason"]), st

        # the new topics hold a = [5, 6, 7] at version 2: the old state's 4 is not it
        held.assert_check_at_waits(
            lambda: recreate(t, AGAIN),
            "a",
            old_member=3,
            new_member=7,
            version=2,
            during=rebootstrapping,
        )
        assert tailing.check_at(3, "a", 1, wait_ms=0) is False
        assert tailing.check_at(20, "c", 1, wait_ms=0) is True
        st = tailing.status()
        assert st["rebootstraps"] >= 1 and st["rebootstrapping_since_ms"] is None


def test_a_restart_does_not_trust_a_checkpoint_of_the_old_topics(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A checkpoint of the old topics names their ids: a replica started on the new topics
    with it bootstraps from the log and answers as a fresh one."""
    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    publish_all(t, HISTORY)
    state = tmp_path / "state"
    with started_replica(t, save=True, poll_interval=0.01, state_dir=state) as first:
        assert first.wait_ready(WAIT), first.status()
        wait_for(lambda: first.engine.version_of("a") == 4, "all four publishes")
    saved = checkpoint.read(state)
    assert saved is not None and saved.log_id == t.identity()
    recreate(t, AGAIN)
    with ready_replica(t, WAIT) as fresh:
        want = answers(fresh)
    with started_replica(t, poll_interval=0.01, state_dir=state) as restarted:
        assert restarted.wait_ready(WAIT), restarted.status()
        assert restarted.started_from == "log"
        wait_for(lambda: answers(restarted) == want, "the restarted replica to answer the same")
