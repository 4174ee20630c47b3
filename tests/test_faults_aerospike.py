"""Aerospike down, slow, erroring and dropping connections (the test server's knobs) while a
sidecar falls back for the segments it does not hold and the publisher writes.

The promise: no wrong answer. A held segment is answered locally and exactly whatever
Aerospike does; one answered by the fallback is right or unknown (None) within the budget,
never a guess and never a hang; a publish whose Aerospike writes fail writes nothing to the
log and says so in one line, and re-running it once Aerospike is back converges.
"""

from __future__ import annotations

import random
import sys
import threading
import time
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
USERS = list(range(1000, 1300))
NAMES = ("held_a", "held_b", "other_x", "other_y")


def _truth(rng: random.Random) -> dict[str, BitMap64]:
    return {name: BitMap64(rng.sample(USERS, 90)) for name in NAMES}


@pytest.fixture
def sidecar(
    aerospike_server: ThreadedAerospikeServer, tmp_path: Path
) -> Iterator[tuple[LogDirTransport, str]]:
    log = LogDirTransport(tmp_path / "log")
    publish_mirrored(log, aerospike_server, _truth(random.Random(1)))
    uds, port = str(tmp_path / "s.sock"), free_port()
    with sidecar_process("--log-dir", str(log.path), "--uds", uds, "--segments", "held_*",
                         "--aerospike", aerospike_server.address, "--fallback-budget-ms", "50",
                         port=port):  # fmt: skip
        yield log, uds


#: a check slower than this waited on Aerospike past the 50 ms fallback budget (50x, for a
#: loaded CI machine's scheduling, not a timing target)
SLOW_S = 2.5


class Checker(threading.Thread):
    """Checks every segment for random users against the states the log may hold now."""

    def __init__(self, uds: str, states: list[dict[str, BitMap64]]) -> None:
        super().__init__(daemon=True)
        self.uds, self.states = uds, states
        self.answers = self.unknown = self.wrong = self.slow = 0
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(2)
        with SidecarClient(self.uds, timeout=5) as client:
            while not self.stop.is_set():
                user, name = rng.choice(USERS), rng.choice(NAMES)
                started = time.monotonic()
                got = client.check(user, name)
                self.slow += time.monotonic() - started > SLOW_S
                self.answers += 1
                if got is None:
                    self.unknown += 1
                    self.wrong += name.startswith("held_")  # local: always answered
                elif all(got is not (user in s[name]) for s in list(self.states)):
                    self.wrong += 1


def _wait_applied(uds: str, versions: dict[str, int]) -> None:
    """Until the sidecar answers every held segment locally at its published version."""
    with SidecarClient(uds, timeout=5) as client:
        for name, version in versions.items():
            if name.startswith("held_"):
                deadline = time.monotonic() + 20
                while True:
                    got = client.explain(USERS[0], name)
                    if got.source == "local" and (got.version or 0) >= version:
                        break
                    assert time.monotonic() < deadline, (name, version, got)
                    time.sleep(0.02)


def test_aerospike_faults_while_falling_back_and_publishing(
    sidecar: tuple[LogDirTransport, str], aerospike_server: ThreadedAerospikeServer
) -> None:
    log, uds = sidecar
    rng = random.Random(1)
    current = _truth(rng)
    states = [current]
    checker = Checker(uds, states)
    checker.start()
    failures: list[str] = []
    versions: dict[str, int] = {}
    faults = [
        ("slow", lambda: setattr(aerospike_server, "latency_s", 0.2)),
        ("erroring", lambda: setattr(aerospike_server, "error_code", 8)),
        ("dropping", lambda: setattr(aerospike_server, "drop_connections", True)),
        ("down", aerospike_server.down),
    ]
    try:
        for name, inject in faults:
            nxt = _truth(rng)
            states.append(nxt)  # a publish in flight: Aerospike may show it before the log
            inject()
            try:
                versions.update(publish_mirrored(log, aerospike_server, nxt).versions)
            except Exception as exc:  # refused: nothing of it reached the log
                failures.append(f"{name}: {exc}")
                assert "\n" not in str(exc).strip()
            time.sleep(0.7)
            if name == "down":
                aerospike_server.up()
            aerospike_server.reset_faults()
            # re-run once Aerospike is back: converges
            versions.update(publish_mirrored(log, aerospike_server, nxt).versions)
            # the older states stay acceptable until the sidecar has applied this publish
            _wait_applied(uds, versions)
            del states[:-1]
            time.sleep(0.3)
    finally:
        checker.stop.set()
        checker.join(10)
    assert checker.answers > 100
    assert checker.wrong == 0 and checker.slow == 0, vars(checker)
    assert failures, "no fault made a publish fail"
    # back to normal: every answer exact, the fallback's included
    final = states[-1]
    with SidecarClient(uds, timeout=5) as client:
        deadline = time.monotonic() + 20
        for user in USERS[:60]:
            for name in NAMES:
                while client.check(user, name) is not (user in final[name]):
                    assert time.monotonic() < deadline, (user, name)
                    time.sleep(0.05)
