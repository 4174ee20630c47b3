"""Helpers for the cdc tests: run `seg-compute cdc` as a process, read its topics back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cdc_process(server_uri: str, kafka: str, prefix: str, *extra: str, log: Path,
                collections: str = "orders") -> subprocess.Popen:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "compute.cli", "cdc", "--mongo", server_uri, "--db", "shop",
           "--collections", collections, "--cdc-kafka", kafka, "--cdc-topic-prefix", prefix,
           "--cdc-writer-id", f"{prefix}-cdc", "--progress-seconds", "1", *extra]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                stdin=subprocess.DEVNULL)  # fmt: skip


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def read_topic(kafka: str, topic: str, timeout: float = 30) -> list[tuple[bytes, bytes]]:
    """Every committed record of `topic` (read_committed, up to its end now)."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from sidecar.transport.kafka import list_offsets

    admin = AdminClient({"bootstrap.servers": kafka})
    meta = admin.list_topics(topic, timeout=15).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
    ends = list_offsets(admin, parts, "latest")
    consumer = Consumer({
        "bootstrap.servers": kafka, "group.id": "cdc-test-reader",
        "enable.auto.commit": False, "isolation.level": "read_committed",
    })  # fmt: skip
    out: list[tuple[bytes, bytes]] = []
    try:
        consumer.assign([TopicPartition(topic, p.partition, 0) for p in parts])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = {tp.partition: tp.offset for tp in consumer.position(parts)}
            if all(max(pos[p.partition], 0) >= ends[(topic, p.partition)] for p in parts):
                break
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append((msg.key(), msg.value()))
        else:
            raise AssertionError(f"could not read {topic} to its end")
    finally:
        consumer.close()
    return out


def events(kafka: str, topic: str) -> list[tuple[dict, dict]]:
    return [(json.loads(k), json.loads(v)) for k, v in read_topic(kafka, topic)]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"cdc exited {proc.returncode} while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)
