"""Faults that need no broker: a sidecar started while the log is unreachable says why from
its first /readyz answer (issue 12, defect 4), and a quiet replica does not rewrite identical
checkpoints (defect 7)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from pyroaring import BitMap64

from sidecar.replica import Replica
from sidecar.transport import LogDirTransport
from sidecar.transport.kafka import KafkaTransport
from tests.logtools import SidecarThread, get_json, publish_raw


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readyz_says_why_from_the_first_answer_when_the_broker_is_down() -> None:
    transport = KafkaTransport(f"127.0.0.1:{_closed_port()}", prefix="nobody")
    replica = Replica(transport, poll_interval=0.01).start()
    try:
        with SidecarThread(replica, uds_path=None, http_host="127.0.0.1") as s:
            code, body = get_json(s.http_url + "/readyz")
            assert code == 503 and body["ready"] is False
            assert body["reason"] and "connecting to the Kafka" in body["reason"]
            deadline = time.monotonic() + 20
            while not (body.get("error") and "cannot reach Kafka" in body["reason"]):
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
                code, body = get_json(s.http_url + "/readyz")
            assert code == 503
    finally:
        replica.stop(save=False)


def test_identical_checkpoints_are_not_rewritten(tmp_path: Path) -> None:
    log = LogDirTransport(tmp_path / "log")
    state = publish_raw(log, {"a": BitMap64(range(1000)), "b": BitMap64([5])})
    replica = Replica(
        log, state_dir=tmp_path / "state", checkpoint_interval=0.05, poll_interval=0.01
    ).start()
    ckpt = tmp_path / "state" / "checkpoint.seg"
    try:
        assert replica.wait_ready(30)
        deadline = time.monotonic() + 30
        while not ckpt.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = ckpt.stat()
        time.sleep(1.0)  # twenty intervals, nothing changed
        assert ckpt.stat().st_ino == first.st_ino and replica.checkpoints_written == 1
        publish_raw(log, {"a": BitMap64(range(1001))}, state)
        while replica.checkpoints_written < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ckpt.stat().st_ino != first.st_ino
    finally:
        replica.stop(save=True)
    assert replica.checkpoints_written == 2  # the shutdown checkpoint was the same one too
