"""`seg-compute cdc` against the MongoDB test server (real pymongo) and a real Kafka broker.

The topics are compared with the test server's own oplog: every change of a watched
collection must be in its topic exactly once and in oplog order, through restarts, kill -9 at
random moments, dropped connections and failed commands.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pymongo
import pytest
from bson import Decimal128

from compute import cdc
from tests.cdc_tools import cdc_process, events, stop, wait_for
from tests.mongo_server import MongoTestServer
from tests.mongo_server.oplog import token

pytestmark = pytest.mark.kafka

TS = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def _client(server: MongoTestServer) -> pymongo.MongoClient:
    return pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=10_000)


def _oplog_tokens(server: MongoTestServer, coll: str = "orders") -> list[dict]:
    return [token(e.ts, e.seq) for e in server.entries() if e.coll == coll]


def _streamed(evs: list[tuple[dict, dict]]) -> list[dict]:
    return [v for _, v in evs if "copyingData" not in v["_id"]]


class OneOrder(NamedTuple):
    db: Any
    topic: str
    log: Path
    proc: subprocess.Popen


def _copied_one_order(
    mongo: MongoTestServer, kafka: str, prefix: str, tmp_path: Path, **options: str
) -> OneOrder:
    """shop.orders holds one order; a cdc job started on it has copied it to its topic."""
    db = _client(mongo).shop
    db.orders.insert_one({"_id": 1})
    topic = f"{prefix}.shop.orders"
    log = tmp_path / "cdc.log"
    proc = cdc_process(mongo.uri, kafka, prefix, log=log, **options)
    wait_for("the copy", lambda: len(events(kafka, topic)) == 1, proc=proc, log=log)
    return OneOrder(db, topic, log, proc)


def test_copy_then_changes_in_the_connector_shape(
    mongo: MongoTestServer, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    db = _client(mongo).shop
    db.orders.insert_many([{"_id": i, "user_id": 7, "amount": Decimal128("12.50"), "ts": TS}
                           for i in (3, 1, 2)])  # fmt: skip
    topic = f"{topic_prefix}.shop.orders"
    log = tmp_path / "cdc.log"
    proc = cdc_process(mongo.uri, kafka_bootstrap, topic_prefix, log=log)
    wait_for("the copy", lambda: len(events(kafka_bootstrap, topic)) == 3, proc=proc, log=log)
    copied = events(kafka_bootstrap, topic)
    assert [k for k, _ in copied] == [{"_id": {"_id": i, "copyingData": True}} for i in (1, 2, 3)]
    key, value = copied[0]
    assert value == {
        "_id": {"_id": 1, "copyingData": True}, "operationType": "insert",
        "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": 1},
        "fullDocument": {"_id": 1, "user_id": 7, "amount": {"$numberDecimal": "12.50"},
                         "ts": {"$date": "2026-11-30T12:00:00Z"}},
    }  # fmt: skip
    db.orders.insert_one({"_id": 4, "user_id": 8, "amount": 5.5})
    db.orders.update_one({"_id": 4}, {"$set": {"amount": 6.5}})
    mongo.drop_connections()  # the stream resumes by itself: nothing lost, nothing repeated
    db.orders.replace_one({"_id": 4}, {"user_id": 9, "amount": 1})
    mongo.fail_command(["getMore"], code=91, labels=["ResumableChangeStreamError"])
    db.orders.delete_one({"_id": 4})
    db.other.insert_one({"_id": 1})  # not watched
    want = _oplog_tokens(mongo)[3:]
    wait_for("the changes", lambda: len(_streamed(events(kafka_bootstrap, topic))) == 4,
             proc=proc, log=log)  # fmt: skip
    assert stop(proc) == 0, log.read_text()
    streamed = events(kafka_bootstrap, topic)[3:]
    assert [k for k, _ in streamed] == [{"_id": t} for t in want]
    ops = [(v["operationType"], v.get("fullDocument")) for _, v in streamed]
    replaced = {"_id": 4, "user_id": 9, "amount": 1}
    assert ops[0] == ("insert", {"_id": 4, "user_id": 8, "amount": 5.5})
    assert ops[2:] == [("replace", replaced), ("delete", None)]
    update = streamed[1][1]
    # updateLookup reads the document when the change is read: as updated, or a later state
    assert update["fullDocument"] in ({"_id": 4, "user_id": 8, "amount": 6.5}, replaced, None)
    assert update["updateDescription"]["updatedFields"] == {"amount": 6.5}
    assert set(update) >= {"clusterTime", "wallTime", "ns", "documentKey"}
    assert set(update["clusterTime"]) == {"$timestamp"}
    assert events(kafka_bootstrap, f"{topic_prefix}.shop.other") == []
    text = log.read_text()
    assert "copy done, streaming" in text and "lag" in text


def test_kill_9_at_random_moments_loses_and_repeats_nothing(
    mongo: MongoTestServer, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    db = _client(mongo).shop
    existing = 1500
    db.orders.insert_many([{"_id": i, "user_id": i % 50, "amount": 1.0} for i in range(existing)])
    topic = f"{topic_prefix}.shop.orders"
    log = tmp_path / "cdc.log"
    done = threading.Event()
    rng = random.Random(15)

    def writes() -> None:  # new documents only: the copied ones stay as they were
        client = _client(mongo)
        n = 0
        while not done.is_set() and n < 3000:
            doc_id = 100_000 + n // 3
            step = n % 3
            if step == 0:
                client.shop.orders.insert_one({"_id": doc_id, "user_id": n % 50, "amount": 2.0})
            elif step == 1:
                client.shop.orders.update_one({"_id": doc_id}, {"$inc": {"amount": 1}})
            elif rng.random() < 0.5:
                client.shop.orders.delete_one({"_id": doc_id})
            n += 1
            time.sleep(0.002)
        client.close()

    writer = threading.Thread(target=writes)
    try:
        for kill in range(5):
            proc = cdc_process(mongo.uri, kafka_bootstrap, topic_prefix, "--batch-size", "100",
                               log=log)  # fmt: skip
            if kill == 0:  # the changes after the resume point are the ones to stream
                wait_for("the resume point", lambda: "resume point taken" in log.read_text(),
                         proc=proc, log=log)  # fmt: skip
                writer.start()
            time.sleep(rng.uniform(1.0, 4.0))  # interpreter start-up is ~1-2 s of it
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finally:
        done.set()
        if writer.is_alive():
            writer.join()
    resumed = log.read_text().count("resuming shop")
    proc = cdc_process(mongo.uri, kafka_bootstrap, topic_prefix, log=log)
    want = _oplog_tokens(mongo)[existing:]
    wait_for("every change", lambda: len(_streamed(events(kafka_bootstrap, topic))) >= len(want),
             timeout=180, proc=proc, log=log)  # fmt: skip
    # the killed runs may have written every change already: SIGTERM only once this run is up
    wait_for("the last run resuming", lambda: log.read_text().count("resuming shop") > resumed,
             proc=proc, log=log)  # fmt: skip
    assert stop(proc) == 0
    got = events(kafka_bootstrap, topic)
    copied = [v["documentKey"]["_id"] for _, v in got if "copyingData" in v["_id"]]
    # every existing document once, in _id order, then those inserted while copying
    assert copied[:existing] == list(range(existing))
    assert copied[existing:] == sorted(set(copied[existing:]))
    assert all(i >= 100_000 for i in copied[existing:])
    assert [v["_id"] for v in _streamed(got)] == want
    assert log.read_text().count("resuming shop") >= 1


def test_lost_resume_token_is_a_clear_error_and_fresh_copy_the_way_out(
    mongo: MongoTestServer, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    db, topic, log, proc = _copied_one_order(mongo, kafka_bootstrap, topic_prefix, tmp_path)
    db.orders.insert_one({"_id": 2})
    wait_for("a change", lambda: len(events(kafka_bootstrap, topic)) == 2, proc=proc, log=log)
    assert stop(proc) == 0
    db.orders.insert_one({"_id": 3})  # while the job is down, and then the oplog rolls over
    mongo.truncate_oplog()
    db.orders.insert_one({"_id": 4})
    proc = cdc_process(mongo.uri, kafka_bootstrap, topic_prefix, log=log)
    assert proc.wait(120) == 1
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("seg-compute cdc: error: MongoDB no longer has the changes"), last
    assert "ChangeStreamHistoryLost" in last and "--fresh-copy" in last
    assert len(events(kafka_bootstrap, topic)) == 2  # nothing written, no silent gap
    proc = cdc_process(mongo.uri, kafka_bootstrap, topic_prefix, "--fresh-copy", log=log)
    wait_for("the fresh copy", lambda: len(events(kafka_bootstrap, topic)) == 6, proc=proc,
             log=log)  # fmt: skip
    db.orders.insert_one({"_id": 5})
    wait_for("streaming again", lambda: len(events(kafka_bootstrap, topic)) == 7, proc=proc,
             log=log)  # fmt: skip
    assert stop(proc) == 0
    got = [v["documentKey"]["_id"] for _, v in events(kafka_bootstrap, topic)]
    assert got == [1, 2, 1, 2, 3, 4, 5]


def test_a_dropped_collection_stops_the_job(
    mongo: MongoTestServer, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    db, topic, log, proc = _copied_one_order(
        mongo, kafka_bootstrap, topic_prefix, tmp_path, collections="orders,users"
    )
    db.orders.insert_one({"_id": 2})
    db.orders.drop()
    assert proc.wait(60) == 1
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("seg-compute cdc: error: shop.orders was dropped"), last
    assert [v["operationType"] for _, v in events(kafka_bootstrap, topic)] == [
        "insert", "insert", "drop"]  # fmt: skip


def test_record_shape_and_partitioning() -> None:
    ev = {"_id": {"_data": "82AB"}, "operationType": "delete", "documentKey": {"_id": 5}}
    key, value, partition = cdc.record(ev, 1)
    assert json.loads(key) == {"_id": {"_data": "82AB"}} and partition == 0
    assert cdc.parse_value(value) == ev
    parts = {cdc.record({**ev, "_id": {"_data": f"82{i:04X}"}}, 8)[2] for i in range(20)}
    assert len(parts) == 1, "one document's changes share a partition"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--collections", "a,a"], "--collections"),
        (["--collections", "a", "--cdc-partitions", "0"], "--cdc-partitions"),
        (["--collections", "a", "--db", "x.y"], "--db"),
    ],
)
def test_cdc_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    import subprocess
    import sys

    base = ["--mongo", "mongodb://127.0.0.1:1/", "--db", "shop", "--cdc-kafka", "127.0.0.1:1"]
    done = subprocess.run([sys.executable, "-m", "compute.cli", "cdc", *base, *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def _cdc_cli(*args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "compute.cli", "cdc", "--db", "shop",
                           "--collections", "orders", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_an_unreachable_kafka_is_one_line(mongo: MongoTestServer) -> None:
    """Before: librdkafka's own `%3|...|FAIL|...` lines came first, one a reconnect."""
    done = _cdc_cli("--mongo", mongo.uri, "--cdc-kafka", "127.0.0.1:1")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seg-compute cdc: error: "), done.stderr


def test_a_bad_mongo_uri_creates_no_topic(kafka_bootstrap: str, topic_prefix: str) -> None:
    """MongoDB is connected to before Kafka is touched (before: the topics were made first)."""
    from confluent_kafka.admin import AdminClient

    done = _cdc_cli("--mongo", "mongodb://127.0.0.1:notaport/", "--cdc-kafka", kafka_bootstrap,
                    "--cdc-topic-prefix", topic_prefix)  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "seg-compute cdc: error: " in lines[0], done.stderr
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=15).topics
    assert not [t for t in topics if t.startswith(f"{topic_prefix}.")]


def test_the_kafka_config_reaches_the_topic_creation(
    mongo: MongoTestServer, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """`--cdc-kafka-config` is every client's, the admin client that creates the topics too
    (before: it took the broker alone, so topics were made over a connection the settings
    forbid). A setting this broker cannot talk (TLS to a plaintext listener) fails the job
    at the topic check, in one line, with nothing created."""
    from confluent_kafka.admin import AdminClient

    done = _cdc_cli("--mongo", mongo.uri, "--cdc-kafka", kafka_bootstrap,
                    "--cdc-topic-prefix", topic_prefix,
                    "--cdc-kafka-config", "security.protocol=ssl")  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "seg-compute cdc: error: " in lines[0], done.stderr
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=15).topics
    assert not [t for t in topics if t.startswith(f"{topic_prefix}.")]
