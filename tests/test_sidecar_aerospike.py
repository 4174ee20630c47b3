"""The sidecar process with the Aerospike fallback, on the real aerospike client against the
wire-level test server: held segments answer locally, the rest from Aerospike, and an
Aerospike outage gives "unknown" quickly, never a hang."""

from __future__ import annotations

import random
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from sidecar.client import SidecarClient
from sidecar.transport.logdir import LogDirTransport
from tests.aerospike_fixture import publish_mirrored
from tests.aerospike_server.server import ThreadedAerospikeServer
from tests.logtools import free_port, sidecar_process

BIN = Path(sys.executable).parent


@pytest.fixture
def world(
    aerospike_server: ThreadedAerospikeServer, tmp_path: Path
) -> Iterator[tuple[dict[str, BitMap64], SidecarClient, ThreadedAerospikeServer]]:
    rng = random.Random(3)
    users = list(range(1000, 1400)) + [2**63 + 9, 2**64 - 1]
    truth = {
        name: BitMap64(rng.sample(users, 120))
        for name in ("held_a", "held_b", "other_x", "other_y")
    }
    log = LogDirTransport(tmp_path / "log")
    publish_mirrored(log, aerospike_server, truth)
    uds = tmp_path / "run" / "s.sock"
    port = free_port()
    with (
        sidecar_process("--log-dir", str(log.path), "--uds", str(uds), "--segments", "held_*",
                        "--aerospike", aerospike_server.address, "--fallback-budget-ms", "300",
                        port=port),
        SidecarClient(str(uds), timeout=5) as client,
    ):  # fmt: skip
        deadline = time.monotonic() + 10  # the fallback connects in the background
        while client.explain(1000, "other_x").source != "aerospike":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
        yield truth, client, aerospike_server


def test_held_segments_local_others_from_aerospike(world) -> None:  # type: ignore[no-untyped-def]
    truth, client, _ = world
    users = sorted({u for m in truth.values() for u in m})[:60] + [5, 2**64 - 1]
    for segment, members in truth.items():
        for user in users:
            explained = client.explain(user, segment)
            assert explained.member == (user in members), (user, segment)
            expected = "local" if segment.startswith("held_") else "aerospike"
            assert explained.source == expected, (user, segment)
    # A segment nobody published: the fallback says the user's map lacks it.
    assert client.explain(users[0], "never_published").source == "aerospike"
    assert client.check(users[0], "never_published") is False
    # `segments` merges local answers and Aerospike's for segments not held here.
    for user in users[:20]:
        assert client.segments(user) == sorted(s for s, m in truth.items() if user in m)


def test_aerospike_down_gives_unknown_fast(world) -> None:  # type: ignore[no-untyped-def]
    truth, client, server = world
    member = truth["other_x"].min()
    assert client.check(member, "other_x") is True
    server.down()
    try:
        started = time.monotonic()
        answers = [client.check(member, "other_x") for _ in range(50)]
        elapsed = time.monotonic() - started
        assert answers[-1] is None  # unknown, never a guess
        assert set(answers) <= {None, True}
        assert elapsed < 50 * 0.35  # each within the budget (the breaker makes most instant)
        assert client.check(truth["held_a"].min(), "held_a") is True  # local keeps answering
        with urllib.request.urlopen(client.metrics_url, timeout=5) as resp:
            assert b"seg_fallback_breaker_state 2.0" in resp.read()  # open
    finally:
        server.up()
    deadline = time.monotonic() + 15
    while client.check(member, "other_x") is not True:  # breaker half-opens, then closes
        assert time.monotonic() < deadline
        time.sleep(0.2)
