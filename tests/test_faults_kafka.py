"""Broker faults against a private broker (tests/broker_faults.py): frozen with SIGSTOP and
killed with kill -9 then restarted on the same data directory, while a sidecar tails and a
publisher publishes; and a sidecar started while the broker is down.

The promise: a ready sidecar keeps answering from memory, exactly, through the fault; once the
broker is back, publishes succeed (retriable errors are retried, issue 12 defect 3) and every
sidecar converges to exactly what was published; a sidecar started while the broker is down
says why (its `reason`, which `/readyz` serves) and becomes ready once it is back. Fast
variants run in the normal suite; `-m reliability` adds longer stalls.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from publisher import Publisher
from sidecar.client import SidecarClient
from sidecar.replica import Replica
from sidecar.transport.base import TransportError
from sidecar.transport.kafka import KafkaTransport
from tests.broker_faults import FaultBroker
from tests.logtools import SidecarThread, get_json

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

SEGMENTS = ("vip", "cart", "churn")
WAIT = 120


def truth_at(rng: random.Random) -> dict[str, BitMap64]:
    return {s: BitMap64(rng.sample(range(20_000), rng.randrange(50, 400))) for s in SEGMENTS}


def publish(transport: KafkaTransport, desired: dict[str, BitMap64]) -> dict[str, int]:
    pub = Publisher(transport, writer_id=f"{transport.prefix}-pub", partitions=2)
    return pub.publish(desired).versions


def converged(replica: Replica, truth: dict[str, BitMap64], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        held = {s: st.bitmap for s, st in list(replica.engine.segments.items()) if st.fresh}
        if held == truth and not replica.engine.needs_resync:
            return
        assert time.monotonic() < deadline, replica.status()
        time.sleep(0.05)


class Answers:
    """Checks a sidecar's answers against the truth it holds, from another thread, until
    stopped: counts answers and wrong ones."""

    def __init__(self, uds_path: str, truth: dict[str, BitMap64]) -> None:
        self.truth = truth
        self.answered = self.wrong = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(uds_path,), daemon=True)
        self._thread.start()

    def _run(self, uds_path: str) -> None:
        rng = random.Random(1)
        with SidecarClient(uds_path, timeout=5) as client:
            while not self._stop.is_set():
                segment = rng.choice(SEGMENTS)
                user = rng.randrange(20_000)
                if client.check(user, segment) is not (user in self.truth[segment]):
                    self.wrong += 1
                self.answered += 1
                time.sleep(0.002)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join(10)
        return self.answered, self.wrong


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fk", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fault_cycle(
    fault_broker: FaultBroker, topic_prefix: str, workdir: Path, fault: str, down_s: float
) -> None:
    rng = random.Random(7)
    transport = KafkaTransport(fault_broker.address, prefix=topic_prefix)
    truth = truth_at(rng)
    publish(transport, truth)
    replica = Replica(transport, poll_interval=0.02).start()
    try:
        assert replica.wait_ready(WAIT), replica.status()
        converged(replica, truth)
        with SidecarThread(replica, uds_path=workdir / "s.sock", http_host="127.0.0.1") as s:
            answers = Answers(s.uds_path, truth)
            during: list[object] = []
            late = None
            if fault == "freeze":
                fault_broker.freeze()
            else:
                fault_broker.kill()
                late = _started_while_down(transport)
            pending = truth_at(rng)
            # a publish started during the fault: it succeeds once the broker is back, or fails
            # with one line and changes nothing (re-running it converges)
            attempt = threading.Thread(
                target=lambda: during.append(_publish_or_error(transport, pending)), daemon=True
            )
            if fault == "freeze":
                attempt.start()
            time.sleep(down_s)
            assert get_json(s.http_url + "/readyz")[0] == 200  # still serving from memory
            answered, wrong = answers.stop()  # before the publish in flight can land
            assert answered > 0 and wrong == 0, (answered, wrong)
            if fault == "freeze":
                fault_broker.thaw()
            else:
                fault_broker.restart()
                attempt.start()
            attempt.join(WAIT)
            assert not attempt.is_alive(), "a publish hung past the broker's return"
            if isinstance(during[0], str):
                assert "\n" not in during[0]
                publish(transport, pending)  # the re-run
            truth = pending
            # right after the broker is back: publishes succeed, sidecars converge exactly
            for _ in range(2):
                truth = truth_at(rng)
                assert set(publish(transport, truth)) <= set(SEGMENTS)
            converged(replica, truth)
            if late is not None:  # the sidecar that started while the broker was down
                assert late.wait_ready(WAIT), late.status()
                converged(late, truth)
                late.stop(save=False)
            answers = Answers(s.uds_path, truth)
            time.sleep(0.5)
            answered, wrong = answers.stop()
            assert answered > 0 and wrong == 0
    finally:
        replica.stop(save=False)
    cold = Replica(transport, poll_interval=0.02).start()  # a fresh sidecar agrees
    try:
        assert cold.wait_ready(WAIT)
        converged(cold, truth)
    finally:
        cold.stop(save=False)


def _started_while_down(transport: KafkaTransport) -> Replica:
    """A sidecar started while the broker is down: not ready, and it says why."""
    late = Replica(transport, poll_interval=0.02).start()
    reason = late.reason() or ""
    assert "connecting to the Kafka" in reason  # from the first ask
    deadline = time.monotonic() + 30
    while "cannot reach Kafka" not in reason:
        assert time.monotonic() < deadline, reason
        time.sleep(0.1)
        reason = late.reason() or ""
    assert not late.ready
    return late


def _publish_or_error(transport: KafkaTransport, desired: dict[str, BitMap64]) -> object:
    try:
        return publish(transport, desired)
    except TransportError as exc:
        return str(exc)


LONG = pytest.mark.reliability


@pytest.mark.parametrize(
    ("fault", "down_s"),
    [
        pytest.param("freeze", 3.0, id="frozen-3s"),
        pytest.param("freeze", 10.0, id="frozen-10s", marks=LONG),
        pytest.param("kill", 2.0, id="killed-2s"),
        pytest.param("kill", 15.0, id="killed-15s", marks=LONG),
    ],
)
def test_broker_frozen_or_killed_during_publishes_tailing_and_a_start(
    fault_broker: FaultBroker, topic_prefix: str, workdir: Path, fault: str, down_s: float
) -> None:
    """SIGSTOP (freeze) or kill -9 and restart (kill) of the broker for `down_s`."""
    _fault_cycle(fault_broker, topic_prefix, workdir, fault, down_s)
