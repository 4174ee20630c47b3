"""The replica against a real log directory: a hypothesis state machine that publishes through
the real Publisher and damages the log with a raw writer while a Replica tails it; plus the
replica's checkpoints (warm restart, a damaged checkpoint file)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from pyroaring import BitMap64

from publisher import Publisher, SnapshotPolicy
from sidecar.partitioner import partition_for
from sidecar.record import Delta, decode, delta_key, encode
from sidecar.replica import Health, Replica
from sidecar.replica.checkpoint import FILENAME
from sidecar.transport import LogDirTransport, Transport
from tests.logtools import started_replica

SEGMENTS = ["s0", "s1", "s2", "s3", "s4"]
PARTITIONS = 2
WAIT = 15.0
JUNK_AHEAD = 1000  # injected gap records claim versions this far ahead: never reached here
#: Whether a damaged segment must heal once the publisher restated it (a snapshot after the
#: damage). False until the bug of test_resync_heals_from_a_snapshot_newer_than_the_damage
#: and test_identical_republish_after_a_restate_writes_nothing is fixed: the bad record stays
#: in the replay range of the partition and keeps marking the segment stale.
STRICT_HEALING = True

_ids = st.one_of(st.integers(0, 300), st.integers(2**64 - 50, 2**64 - 2))
member_sets = st.lists(_ids, max_size=25).map(BitMap64)


def log_ends(transport: Transport) -> dict[int, int]:
    with transport.reader() as reader:
        return {p: reader.watermarks("deltas", p)[1] for p in range(reader.partitions)}


def wait_caught_up(replica: Replica, transport: Transport, timeout: float = WAIT) -> None:
    """Until the replica is ready and its read positions reached the current log end."""
    ends = log_ends(transport)
    deadline = time.monotonic() + timeout
    while not (replica.ready and all(replica.positions.get(p, -1) >= e for p, e in ends.items())):
        if replica.error:
            raise AssertionError(f"replica failed: {replica.error}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"replica never caught up: positions {replica.positions}, ends {ends}, "
                f"ready {replica.ready}"
            )
        time.sleep(0.005)


def raw_append(transport: Transport, partition: int, key: bytes | None, value: bytes) -> None:
    with transport.writer("fault-injector") as w, w.transaction():
        w.append("deltas", partition, key, value)


class ReplicaMachine(RuleBasedStateMachine):
    """Truth = what the Publisher was asked for. After every step, for every segment: the
    replica holds the truth (bitmap and version) and is fresh, or it is stale/diverged and its
    own resync heals it. The exception is a segment whose log really has a gap after its last
    snapshot (an injected record claiming a far-future version): no resync from the log can
    heal that until the publisher restates the segment, so until then it may stay unhealthy
    (answers go to the fallback); it must never be fresh and wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="seg-sm-"))
        self.transport = LogDirTransport(self.dir / "log")
        self.transport.writer("init", PARTITIONS).close()  # meta.json + empty log
        self.truth: dict[str, BitMap64] = {}
        self.versions: dict[str, int] = {}  # last published version, drops included
        self.tainted: set[str] = set()
        self.corrupt = 0
        self.unknown = 0
        self.replica: Replica | None = None

    @initialize(every=st.integers(1, 4))
    def start(self, every: int) -> None:
        self.publisher = Publisher(
            self.transport,
            partitions=PARTITIONS,
            policy=SnapshotPolicy(every_versions=every),
        )
        self.replica = Replica(self.transport, poll_interval=0.005).start()

    def teardown(self) -> None:
        if self.replica is not None:
            self.replica.stop(save=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- publishing ---------------------------------------------------------------------------

    def _record_result(self, versions: dict[str, int]) -> None:
        for seg, version in versions.items():
            assert version == self.versions.get(seg, 0) + 1, (
                f"{seg}: published version {version} after {self.versions.get(seg, 0)}"
            )
            self.versions[seg] = version
            if STRICT_HEALING:
                self.tainted.discard(seg)

    @rule(
        changes=st.dictionaries(st.sampled_from(SEGMENTS), member_sets, min_size=1, max_size=3),
        prune=st.booleans(),
    )
    def publish(self, changes: dict[str, BitMap64], prune: bool) -> None:
        result = self.publisher.publish(changes, prune=prune)
        expected_changed = {
            s for s, bm in changes.items() if s not in self.truth or self.truth[s] != bm
        }
        if prune:
            expected_changed |= set(self.truth) - set(changes)
        changed = set(result.versions)
        # A segment the publisher found damaged in the log is restated even when unchanged.
        assert expected_changed <= changed, (expected_changed, changed)
        assert changed - expected_changed <= self.tainted, (changed, expected_changed)
        self._record_result(result.versions)
        if prune:
            self.truth = {s: BitMap64(bm) for s, bm in changes.items()}
        else:
            self.truth.update({s: BitMap64(bm) for s, bm in changes.items()})

    @rule(segment=st.sampled_from(SEGMENTS))
    def drop(self, segment: str) -> None:
        result = self.publisher.publish({}, drop=[segment])
        if segment in self.truth:
            assert set(result.versions) == {segment}
        else:
            assert result.versions == {}
        self._record_result(result.versions)
        self.truth.pop(segment, None)

    @rule()
    def identical_republish(self) -> None:
        if not self.truth:
            return
        before = log_ends(self.transport)
        result = self.publisher.publish(dict(self.truth))
        assert set(result.versions) <= self.tainted
        if not result.versions:
            assert log_ends(self.transport) == before
        self._record_result(result.versions)

    # -- faults -------------------------------------------------------------------------------

    @rule(data=st.data())
    def inject_duplicate(self, data: st.DataObject) -> None:
        with self.transport.reader() as reader:
            ends = {("deltas", p): reader.watermarks("deltas", p)[1] for p in range(PARTITIONS)}
            reader.assign(dict.fromkeys(ends, 0))
            records = []
            while any(reader.position(*tp) < end for tp, end in ends.items()):
                records.extend(reader.poll(0.1))
        real = []
        for rec in records:
            try:
                r = decode(rec.value)
            except ValueError:
                continue
            if r.version <= self.versions.get(r.segment, 0):  # not an injected future one
                real.append(rec)
        if not real:
            return
        rec = data.draw(st.sampled_from(real))
        raw_append(self.transport, rec.partition, rec.key, rec.value)

    @rule(segment=st.sampled_from(SEGMENTS), ahead=st.integers(1, 5))
    def inject_gap(self, segment: str, ahead: int) -> None:
        version = self.versions.get(segment, 0)
        base = version + JUNK_AHEAD + ahead
        junk = Delta(segment, base, base + 1, BitMap64([1]), BitMap64(), 1, 0)
        raw_append(
            self.transport, partition_for(segment, PARTITIONS), delta_key(segment), encode(junk)
        )
        self.tainted.add(segment)

    @rule(
        value=st.one_of(
            st.just(b"\xc1 not msgpack"),
            st.binary(min_size=1, max_size=30).map(lambda b: b"\xc1" + b),
            st.just(msgpack.packb({"format": 1, "kind": "delta", "segment": "s0"})),
            st.just(msgpack.packb([1, 2, 3])),
        ),
        partition=st.integers(0, PARTITIONS - 1),
    )
    def inject_corrupt(self, value: bytes, partition: int) -> None:
        raw_append(self.transport, partition, b"s0", value)
        self.corrupt += 1

    @rule(
        kind=st.sampled_from(["rename", "merge", "snapshot"]),
        fmt=st.sampled_from([1, 2]),
        segment=st.sampled_from(SEGMENTS),
    )
    def inject_unknown(self, kind: str, fmt: int, segment: str) -> None:
        value = msgpack.packb({"format": fmt, "kind": kind, "segment": segment, "version": 1})
        raw_append(self.transport, partition_for(segment, PARTITIONS), segment.encode(), value)
        self.unknown += 1

    # -- restarts -----------------------------------------------------------------------------

    @rule()
    def restart_replica_cold(self) -> None:
        assert self.replica is not None
        self.replica.stop(save=False)
        self.replica = Replica(self.transport, poll_interval=0.005).start()
        wait_caught_up(self.replica, self.transport)
        # new counters: its bootstrap replays an unpredictable share of the injected records
        self.corrupt = self.replica.engine.counters.corrupt
        self.unknown = self.replica.engine.counters.unknown

    # -- the invariant ------------------------------------------------------------------------

    def _problems(self) -> list[str]:
        assert self.replica is not None
        engine = self.replica.engine
        problems = []
        for seg in SEGMENTS:
            state = engine.segments.get(seg)
            want = self.truth.get(seg)
            if state is not None and state.fresh:
                if want is None:
                    problems.append(f"{seg}: fresh v{state.version} but not in the truth")
                elif state.bitmap != want or state.version != self.versions[seg]:
                    problems.append(
                        f"{seg}: fresh but wrong: v{state.version} {list(state.bitmap)[:8]} "
                        f"!= v{self.versions[seg]} {list(want)[:8]}"
                    )
                elif state.cardinality != len(want):
                    problems.append(f"{seg}: cardinality {state.cardinality} != {len(want)}")
                else:
                    for user in (*list(want)[:3], 12345):
                        if self.replica.contains(user, seg) is not (user in want):
                            problems.append(f"{seg}: contains({user}) wrong")
                continue
            if seg in self.tainted:
                continue  # may stay unhealthy or absent until the publisher restates it
            if want is not None:
                health = state.health if state is not None else "absent"
                problems.append(f"{seg}: {health} (v{self.versions.get(seg)}) and not healed")
                if (
                    state is not None
                    and self.replica.contains(next(iter(want), 0), seg) is not None
                ):
                    problems.append(f"{seg}: an unhealthy segment answered locally")
            elif seg in self.versions and engine.version_of(seg) != self.versions[seg]:
                problems.append(
                    f"{seg}: dropped at v{self.versions[seg]}, replica at v{engine.version_of(seg)}"
                )
            elif state is not None:
                problems.append(f"{seg}: {state.health} but dropped/never published")
        return problems

    @invariant()
    def replica_matches_truth(self) -> None:
        if self.replica is None:
            return
        wait_caught_up(self.replica, self.transport)
        deadline = time.monotonic() + WAIT
        while True:
            problems = self._problems()
            if not problems and not self.replica.engine.needs_resync:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{problems}; needs_resync {self.replica.engine.needs_resync}; "
                    f"tainted {self.tainted}; status {self.replica.status()}"
                )
            time.sleep(0.01)
        c = self.replica.engine.counters
        assert c.corrupt == self.corrupt, (c.corrupt, self.corrupt)
        assert c.unknown == self.unknown, (c.unknown, self.unknown)
        for seg, state in self.replica.engine.segments.items():
            if state.health is not Health.FRESH:
                assert seg in self.tainted, (seg, state.health)


ReplicaMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestReplicaMachine = ReplicaMachine.TestCase
TestReplicaMachine = pytest.mark.timeout(300)(TestReplicaMachine)


# -- checkpoints ------------------------------------------------------------------------------


def _answers(replica: Replica) -> dict[str, tuple[int, list[int], Health]]:
    return {
        s: (st_.version, list(st_.bitmap), st_.health) for s, st_ in replica.engine.segments.items()
    }


def _publish_history(transport: Transport) -> Publisher:
    pub = Publisher(transport, partitions=PARTITIONS, policy=SnapshotPolicy(every_versions=3))
    pub.publish({"a": BitMap64([1, 2, 3]), "b": BitMap64([10]), "c": BitMap64(range(100))})
    pub.publish({"a": BitMap64([2, 3, 4]), "b": BitMap64([10, 11])})
    pub.publish({}, drop=["c"])
    pub.publish({"a": BitMap64([4, 2**64 - 2]), "d": BitMap64([7])})
    return pub


@pytest.mark.timeout(120)
def test_checkpoint_restart_resumes_without_bootstrap(tmp_path: Path) -> None:
    transport = LogDirTransport(tmp_path / "log")
    pub = _publish_history(transport)
    state_dir = tmp_path / "state"
    first = Replica(transport, state_dir=state_dir, poll_interval=0.005).start()
    assert first.wait_ready(WAIT)
    wait_caught_up(first, transport)
    answers = _answers(first)
    assert answers == {
        "a": (3, [4, 2**64 - 2], Health.FRESH),
        "b": (2, [10, 11], Health.FRESH),
        "d": (1, [7], Health.FRESH),
    }
    assert first.engine.dropped == {"c": 2}
    positions = dict(first.positions)
    first.stop()  # saves
    assert (state_dir / FILENAME).exists()

    with started_replica(transport, state_dir=state_dir, poll_interval=0.005, save=True) as second:
        assert second.wait_ready(WAIT)
        wait_caught_up(second, transport)
        assert _answers(second) == answers
        assert second.engine.dropped == {"c": 2}
        c = second.engine.counters
        assert (c.applied, c.duplicates, c.gaps, c.resyncs) == (0, 0, 0, 0)  # no re-bootstrap
        assert second.status()["started_from"] == "checkpoint"
        assert second.positions == positions
        assert second.contains(2**64 - 2, "a") is True
        assert second.contains(2, "a") is False
        assert second.contains(1, "c") is None
        # it tails from there: exactly the new changes apply
        pub.publish({"b": BitMap64([12]), "c": BitMap64([5])})
        wait_caught_up(second, transport)
        assert second.engine.segments["b"].version == 3
        assert second.engine.segments["c"].version == 3  # continues after the drop (v2)
        assert list(second.engine.segments["c"].bitmap) == [5]
        assert (c.applied, c.duplicates) == (2, 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["magic", "checksum", "payload", "truncated", "empty"])
def test_damaged_checkpoint_is_ignored_and_bootstraps(tmp_path: Path, where: str) -> None:
    transport = LogDirTransport(tmp_path / "log")
    _publish_history(transport)
    state_dir = tmp_path / "state"
    first = Replica(transport, state_dir=state_dir, poll_interval=0.005).start()
    assert first.wait_ready(WAIT)
    wait_caught_up(first, transport)
    answers = _answers(first)
    first.stop()
    path = state_dir / FILENAME
    data = bytearray(path.read_bytes())
    if where == "magic":
        data[0] ^= 0x01
    elif where == "checksum":
        data[10] ^= 0x40
    elif where == "payload":
        data[len(data) // 2] ^= 0xFF
    elif where == "truncated":
        data = data[: len(data) - 7]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))

    with started_replica(transport, state_dir=state_dir, poll_interval=0.005, save=True) as second:
        assert second.wait_ready(WAIT)
        wait_caught_up(second, transport)
        assert second.error is None
        assert _answers(second) == answers
        c = second.engine.counters
        assert c.applied + c.duplicates > 0  # it replayed the log: a full bootstrap
        assert second.status()["started_from"] == "log"
    # the stop saved a good checkpoint again
    with started_replica(transport, state_dir=state_dir, poll_interval=0.005, save=True) as third:
        assert third.wait_ready(WAIT)
        assert _answers(third) == answers
        assert third.engine.counters.applied + third.engine.counters.duplicates == 0
        assert third.status()["started_from"] == "checkpoint"


@pytest.mark.timeout(120)
def test_checkpoint_of_another_log_is_ignored(tmp_path: Path) -> None:
    one = LogDirTransport(tmp_path / "one")
    _publish_history(one)
    other = LogDirTransport(tmp_path / "other")
    Publisher(other, partitions=PARTITIONS).publish({"z": BitMap64([1])})
    state_dir = tmp_path / "state"
    r = Replica(one, state_dir=state_dir, poll_interval=0.005).start()
    assert r.wait_ready(WAIT)
    wait_caught_up(r, one)
    r.stop()
    with started_replica(other, state_dir=state_dir, poll_interval=0.005, save=True) as r2:
        assert r2.wait_ready(WAIT)
        wait_caught_up(r2, other)
        assert set(r2.engine.segments) == {"z"}
        assert r2.contains(1, "a") is None


@pytest.mark.timeout(120)
def test_replica_with_a_segments_filter(tmp_path: Path) -> None:
    transport = LogDirTransport(tmp_path / "log")
    _publish_history(transport)
    with started_replica(transport, segments=["a", "c*"], poll_interval=0.005) as r:
        assert r.wait_ready(WAIT)
        wait_caught_up(r, transport)
        assert set(r.engine.segments) == {"a"}
        assert r.contains(4, "a") is True
        assert r.contains(10, "b") is None  # not held: the caller asks the fallback
        assert r.status()["partial"] is True


@pytest.mark.kafka
@pytest.mark.timeout(600)
def test_kafka_checkpoint_with_offsets_gone_bootstraps(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    from sidecar.transport import KafkaTransport
    from tests.test_publisher import delete_all_deltas

    transport = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    pub = Publisher(
        transport,
        writer_id=f"{topic_prefix}-pub",
        partitions=3,
        policy=SnapshotPolicy(every_versions=1),  # every version snapshotted
    )
    pub.publish({"a": BitMap64([1]), "b": BitMap64([2])})
    state_dir = tmp_path / "state"
    first = Replica(transport, state_dir=state_dir, poll_interval=0.01).start()
    assert first.wait_ready(WAIT)
    wait_caught_up(first, transport)
    first.stop()
    # a warm restart while the offsets are still held
    warm = Replica(transport, state_dir=state_dir, poll_interval=0.01).start()
    assert warm.wait_ready(WAIT)
    assert warm.status()["started_from"] == "checkpoint"
    warm.stop()
    pub.publish({"a": BitMap64([1, 5]), "c": BitMap64([3])})
    delete_all_deltas(kafka_bootstrap, topic_prefix)
    with started_replica(transport, state_dir=state_dir, poll_interval=0.01, save=True) as cold:
        assert cold.wait_ready(WAIT)
        wait_caught_up(cold, transport)
        assert cold.status()["started_from"] == "log"
        assert {s: (st.version, list(st.bitmap)) for s, st in cold.engine.segments.items()} == {
            "a": (2, [1, 5]),
            "b": (1, [2]),
            "c": (1, [3]),
        }


def _junk(transport: Transport, segment: str, partitions: int) -> None:
    """A delta claiming a far-future version: a gap for every reader that meets it."""
    junk = Delta(segment, 1000, 1001, BitMap64([1]), BitMap64(), 1, 0)
    raw_append(transport, partition_for(segment, partitions), delta_key(segment), encode(junk))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("other", ["never-published", "older-snapshot"])
def test_resync_heals_from_a_snapshot_newer_than_the_damage(tmp_path: Path, other: str) -> None:
    transport = LogDirTransport(tmp_path / "log")
    pub = Publisher(transport, partitions=1, policy=SnapshotPolicy(every_versions=1))
    pub.publish({"a": BitMap64([1, 2]), "b": BitMap64([3])})
    _junk(transport, "a", 1)  # damage a
    assert pub.publish({"a": BitMap64([1, 2])}).versions == {"a": 2}  # restated: new snapshot
    # a's newest snapshot (v2) now starts after the bad record. Another damaged segment of the
    # same partition needs a resync at the same time:
    _junk(transport, "ghost" if other == "never-published" else "b", 1)
    with started_replica(transport, poll_interval=0.005) as replica:
        wait_caught_up(replica, transport)
        deadline = time.monotonic() + 3
        while replica.engine.segments["a"].health is not Health.FRESH:
            if time.monotonic() > deadline:
                raise AssertionError(f"a not healed: {replica.status()}")
            time.sleep(0.01)
        state = replica.engine.segments["a"]
        assert (state.version, list(state.bitmap)) == (2, [1, 2])


def test_resync_of_one_segment_heals_from_its_newer_snapshot(tmp_path: Path) -> None:
    """The same damage as above, resynced alone: it heals (the snapshot is read first)."""
    transport = LogDirTransport(tmp_path / "log")
    pub = Publisher(transport, partitions=1, policy=SnapshotPolicy(every_versions=1))
    pub.publish({"a": BitMap64([1, 2]), "b": BitMap64([3])})
    _junk(transport, "a", 1)
    assert pub.publish({"a": BitMap64([1, 2])}).versions == {"a": 2}
    with started_replica(transport, poll_interval=0.005) as replica:
        wait_caught_up(replica, transport)
        deadline = time.monotonic() + 5
        while replica.engine.segments["a"].health is not Health.FRESH:
            assert time.monotonic() < deadline, replica.status()
            time.sleep(0.01)
        assert replica.engine.segments["a"].version == 2
        # The bad record precedes a's newest snapshot: bootstrap skips it, no gap at all.
        assert replica.engine.counters.gaps == 0


@pytest.mark.timeout(60)
def test_replica_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    transport = LogDirTransport(tmp_path / "log")
    with started_replica(transport, poll_interval=0.005) as replica:
        assert not replica.wait_ready(0.3)
        assert replica.contains(1, "a") is None
        Publisher(transport, partitions=PARTITIONS).publish({"a": BitMap64([1])})
        assert replica.wait_ready(WAIT), replica.status()
        wait_caught_up(replica, transport)
        assert replica.contains(1, "a") is True


@pytest.mark.timeout(60)
def test_replica_started_between_meta_and_log_creation_waits(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"format": 1, "partitions": PARTITIONS}))
    transport = LogDirTransport(path)
    with started_replica(transport, poll_interval=0.005) as replica:
        time.sleep(0.3)
        Publisher(transport, partitions=PARTITIONS).publish({"a": BitMap64([1])})
        assert replica.wait_ready(5), replica.status()
        wait_caught_up(replica, transport)
        assert replica.contains(1, "a") is True


@pytest.mark.timeout(60)
def test_checkpoint_of_a_recreated_log_at_the_same_path_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "log"
    state_dir = tmp_path / "state"
    transport = LogDirTransport(path)
    Publisher(transport, partitions=1).publish({"a": BitMap64([1])})
    r = Replica(transport, state_dir=state_dir, poll_interval=0.005).start()
    assert r.wait_ready(WAIT)
    wait_caught_up(r, transport)
    r.stop()
    shutil.rmtree(path)  # the operator starts the log over
    pub = Publisher(transport, partitions=1)
    pub.publish({"a": BitMap64([2])})
    pub.publish({"a": BitMap64([2, 5])})
    with started_replica(transport, state_dir=state_dir, poll_interval=0.005) as r2:
        assert r2.wait_ready(WAIT)
        wait_caught_up(r2, transport)
        state = r2.engine.segments["a"]
        assert state.fresh
        assert (state.version, list(state.bitmap)) == (2, [2, 5])
