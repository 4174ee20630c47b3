"""`Replica.local` owns "answerable locally"; the socket server inlines that rule on its check
hot path. These tests put real replicas (over a log directory) into every state a segment can
be in and prove the inlined path and the general path agree on each: the inline path answers
exactly when `Replica.local` gives a state, with the same answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from sidecar.client import SidecarClient
from sidecar.partitioner import partition_for
from sidecar.record import Delta, Heartbeat, delta_key, encode
from sidecar.replica import Replica, SegmentState
from sidecar.server.uds import LATENCY_SAMPLE_MASK
from sidecar.transport.logdir import LogDirTransport
from tests.logtools import SidecarThread, publish_gap, publish_raw

FRESH, STALE, DIVERGED, DROPPED, OUTSIDE = "fresh", "stale", "diverged", "dropped", "outside"
UNKNOWN = "nosuch"
AGED = "aged"  # past its max_age_seconds: a heartbeat from long ago
SEGMENTS = [FRESH, STALE, DIVERGED, DROPPED, OUTSIDE, UNKNOWN, AGED]
MEMBERS = BitMap64([1, 2, 2**64 - 1])
USERS = [1, 3, 2**64 - 1]
HELD = [FRESH, STALE, DIVERGED, DROPPED, UNKNOWN, AGED]  # the partial replica's --segments


def _diverge(transport: LogDirTransport, segment: str, version: int) -> None:
    """A delta whose stated cardinality the members do not have."""
    with transport.writer("test-publisher") as w, w.transaction():
        value = encode(Delta(segment, version, version + 1, BitMap64(), BitMap64(), 999, 0))
        w.append("deltas", partition_for(segment, w.partitions), delta_key(segment), value)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> LogDirTransport:
    t = LogDirTransport(tmp_path_factory.mktemp("inline") / "log")
    state = publish_raw(t, {s: MEMBERS for s in (FRESH, STALE, DIVERGED, DROPPED, OUTSIDE, AGED)})
    publish_raw(t, {}, state, drop=(DROPPED,))
    publish_gap(t, STALE, state)
    _diverge(t, DIVERGED, state.segments[DIVERGED][0])
    with t.writer("test-publisher") as w, w.transaction():
        beat = encode(Heartbeat(AGED, state.segments[AGED][0], 1, 0))
        w.append("deltas", partition_for(AGED, w.partitions), delta_key(AGED), beat)
    return t


def _settled(replica: Replica) -> Replica:
    assert replica.wait_ready(20), replica.status()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = {s: replica.local(s) for s in (STALE, DIVERGED, AGED)}
        want = {STALE: "stale", DIVERGED: "diverged", AGED: "stale_age"}
        if st == want and not replica.engine.needs_resync:
            return replica
        time.sleep(0.05)
    raise AssertionError(f"states did not settle: {replica.status()}")


@pytest.fixture(scope="module")
def replicas(log: LogDirTransport) -> Iterator[dict[str, Replica]]:
    full = _settled(Replica(log, poll_interval=0.01).start())
    partial = _settled(Replica(log, segments=HELD, poll_interval=0.01).start())
    # Not started, so never ready, but holding a fresh segment (as during a bootstrap).
    cold = Replica(log)
    cold.engine.install(FRESH, SegmentState(BitMap64(MEMBERS), 1, len(MEMBERS), 0))
    yield {"full": full, "partial": partial, "not_ready": cold}
    full.stop(save=False)
    partial.stop(save=False)


EXPECTED = {
    "full": {
        FRESH: None,
        STALE: "stale",
        DIVERGED: "diverged",
        DROPPED: "dropped",
        OUTSIDE: None,
        UNKNOWN: "unknown",
        AGED: "stale_age",
    },
    "partial": {
        FRESH: None,
        STALE: "stale",
        DIVERGED: "diverged",
        DROPPED: "dropped",
        OUTSIDE: "not_held",
        UNKNOWN: "unknown",
        AGED: "stale_age",
    },
    "not_ready": dict.fromkeys(SEGMENTS, "not_ready"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_local_gives_the_state_or_why_not(replicas: dict[str, Replica], name: str) -> None:
    replica = replicas[name]
    for seg, reason in EXPECTED[name].items():
        got = replica.local(seg)
        if reason is None:
            assert isinstance(got, SegmentState) and got.bitmap == MEMBERS, seg
            assert all(replica.contains(u, seg) is (u in MEMBERS) for u in USERS)
        else:
            assert got == reason, seg
            assert all(replica.contains(u, seg) is None for u in USERS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_inline_check_agrees_with_the_general_path(
    replicas: dict[str, Replica], name: str, tmp_path: Path
) -> None:
    replica = replicas[name]
    with (
        SidecarThread(replica, uds_path=tmp_path / "s.sock", http_host=None) as server,
        SidecarClient(server.uds_path, timeout=5) as client,
    ):
        uds = server.sidecar.uds
        assert uds is not None
        stats = uds.handlers["check"][2]

        def check(user: int, seg: str, inline: bool) -> tuple[bool | None, bool]:
            """The answer, and whether the request was timed (took the general path)."""
            # The server thread is idle between two requests of this one client.
            uds.untimed = 0 if inline else LATENCY_SAMPLE_MASK
            timed = sum(stats.latency.counts)
            answer = client.check(user, seg)
            return answer, sum(stats.latency.counts) > timed

        for seg in SEGMENTS:
            local = replica.local(seg)
            for user in USERS:
                # The general path first: it also puts the name in the valid-names cache
                # the inline path reads.
                slow, slow_timed = check(user, seg, inline=False)
                fast, fast_timed = check(user, seg, inline=True)
                assert slow_timed
                assert fast == slow, (name, seg, user)
                # The inline path answers exactly what Replica.local answers.
                assert fast_timed is not isinstance(local, SegmentState), (name, seg, user)
                expected = user in MEMBERS if isinstance(local, SegmentState) else None
                assert fast == expected, (name, seg, user)
