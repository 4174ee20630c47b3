"""Streaming segments (`seg-compute gen-events` and `seg-compute stream`).

* rules: parsing, validation, single ownership with batch segments (no Spark);
* the micro-batch logic against the plain-Python semantics (`rules.evaluate`), batch by batch,
  with late events, expiring windows and a re-run batch (Spark, no Kafka);
* on the real broker: events -> Spark's Kafka source -> publish -> a Replica tailing the log,
  then a crash-style restart (a batch re-run publishes nothing) and a restart after events
  arrived while the job was down (their change is published once), then a continuous trigger
  that measures event-to-visible and publish-to-visible latency.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap64

from compute import rules
from compute.definitions import DefinitionError
from compute.definitions import parse as parse_batch
from compute.events import Event, EventGenerator, ensure_topic, make_event, now_ms, produce
from compute.stream import BatchReport, StreamJob, StreamOptions, start
from publisher import Publisher
from sidecar.record import Delta, decode
from sidecar.replica import Replica
from sidecar.transport.base import Transport
from sidecar.transport.logdir import LogDirTransport
from tests.kafka_fixture import SaslBroker, TlsBroker

CART = "cart_abandoners_30m"
BROWSE = "electronics_browsers_10m"
DEFINITIONS = f"""
[[segment]]
name = "vip_buyers"
sql = "SELECT user_id FROM users WHERE tier = 'vip'"

[[stream]]
name = "{CART}"
description = "Added to cart in the last 30 minutes and no order since"
event = "add_to_cart"
within_minutes = 30
unless = "order"

[[stream]]
name = "{BROWSE}"
event = "view"
category = "electronics"
min_count = 3
within_minutes = 10
"""
BIG = 2**63 + 5  # an id above the signed 64-bit range


# -- rules (no Spark) --------------------------------------------------------------------------


def test_rules_parse_and_tracks() -> None:
    defs = rules.parse(DEFINITIONS + '\n[[stream]]\nname = "busy_carts"\nevent = "add_to_cart"'
                       "\nmin_count = 3\nwithin_minutes = 5\n")  # fmt: skip
    assert defs.names == [CART, BROWSE, "busy_carts"]
    assert defs.batch_names == {"vip_buyers"}
    specs = {s.track.id: (s.depth, s.horizon_ms) for s in defs.tracks()}
    assert specs == {
        "add_to_cart": (3, 30 * 60_000),
        "order": (1, 30 * 60_000),
        "view/electronics": (3, 10 * 60_000),
    }
    # The batch loader accepts the [[stream]] tables beside its own.
    assert [s.name for s in parse_batch(DEFINITIONS)] == ["vip_buyers"]


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        ('name = "vip_buyers"\nevent = "view"\nwithin_minutes = 5', "one owner"),
        ('name = "x"\nevent = "click"\nwithin_minutes = 5', "event must be one of"),
        ('name = "x"\nevent = "view"\nwithin_minutes = 0', "within_minutes must be > 0"),
        ('name = "x"\nevent = "view"', "within_minutes must be a number"),
        ('name = "x"\nevent = "view"\nwithin_minutes = 5\nmin_count = 0', "min_count"),
        ('name = "x"\nevent = "order"\nwithin_minutes = 5\nunless = "order"', "unless must"),
        ('name = "x"\nevent = "view"\nwithin_minutes = 5\nwindow = 3', "unknown key"),
        ('name = "bad name"\nevent = "view"\nwithin_minutes = 5', "not a valid segment id"),
        (f'name = "{CART}"\nevent = "view"\nwithin_minutes = 5', "defined twice"),
    ],
)
def test_rules_reject(table: str, reason: str) -> None:
    with pytest.raises(DefinitionError, match=reason):
        rules.parse(f"{DEFINITIONS}\n[[stream]]\n{table}\n")


def test_batch_loader_enforces_single_owner() -> None:
    text = DEFINITIONS + '\n[[stream]]\nname = "vip_buyers"\nevent = "view"\nwithin_minutes = 5\n'
    with pytest.raises(DefinitionError, match="one owner"):
        parse_batch(text)


def test_evaluate_semantics() -> None:
    defs = rules.parse(DEFINITIONS)
    t = 10 * 3_600_000
    events = [
        make_event(1, "add_to_cart", ts=t - 60_000),
        make_event(2, "add_to_cart", ts=t - 60_000),
        make_event(2, "order", ts=t - 30_000),
        make_event(3, "add_to_cart", ts=t - 31 * 60_000),  # outside the window
        make_event(4, "order", ts=t - 90_000),  # an order before the add does not cancel it
        make_event(4, "add_to_cart", ts=t - 60_000),
        *[make_event(5, "view", ts=t - i * 60_000) for i in range(3)],
        *[make_event(6, "view", ts=t - i * 60_000) for i in (0, 1, 10)],  # third is too old
        *[make_event(7, "view", ts=t - i, category="books") for i in range(3)],
    ]
    got = rules.evaluate(defs.rules, events, t)
    assert got == {CART: {1, 4}, BROWSE: {5}}


def _random_batches(
    users: list[int], batches: int, per_batch: int, seed: int, step_ms: int = 24_000
) -> list[list[Event]]:
    """Generated events, `step_ms` / 2 apart on average, 10% of them up to 40 minutes late,
    shuffled within each batch."""
    import numpy as np

    gen = EventGenerator(np.array(users, dtype=np.uint64), seed=seed)
    rng = random.Random(seed)
    t = 1_800_000_000_000
    out: list[list[Event]] = []
    for _ in range(batches):
        batch = []
        for _ in range(per_batch):
            t += rng.randrange(0, step_ms)
            event = gen.next(ts=t)
            if rng.random() < 0.1:
                event["ts"] -= rng.randrange(0, 40 * 60_000)
            batch.append(event)
        rng.shuffle(batch)
        out.append(batch)
    return out


EXTRA_RULES = (
    '\n[[stream]]\nname = "busy_carts_15m"\nevent = "add_to_cart"\nmin_count = 2'
    '\nwithin_minutes = 15\nunless = "remove_from_cart"\n'
    '\n[[stream]]\nname = "viewers_5m"\nevent = "view"\nmin_count = 4\nwithin_minutes = 5\n'
)
USERS = [1, 2, 3, 5, 8, 13, 21, BIG, 2**64 - 1, 0, *range(100, 130)]


def test_state_matches_reference() -> None:
    """The driver-side state (numpy) gives the reference memberships after every batch."""
    import numpy as np

    from compute import streamstate

    defs = rules.parse(DEFINITIONS + EXTRA_RULES)
    specs = defs.tracks()
    state: streamstate.State = {}
    clock = 0
    seen: list[Event] = []
    nonempty = dict.fromkeys(defs.names, 0)
    for batch in _random_batches(USERS, 25, 80, seed=3):
        seen += batch
        clock = max(clock, *(e["ts"] for e in batch))
        new: dict[str, tuple[list[int], list[int]]] = {}
        for e in batch:
            for spec in specs:
                if spec.track.matches(e):
                    uid = e["user_id"] - 2**64 if e["user_id"] >= 2**63 else e["user_id"]
                    new.setdefault(spec.track.id, ([], []))[0].append(uid)
                    new[spec.track.id][1].append(e["ts"])
        arrays = {k: (np.array(u, np.int64), np.array(t, np.int64)) for k, (u, t) in new.items()}
        state = streamstate.merge(state, arrays, specs, clock)
        # A save / load round trip changes nothing.
        state = streamstate.from_table(streamstate.to_table(state), specs)
        got = {k: set(v) for k, v in streamstate.memberships(state, defs.rules, clock).items()}
        assert got == rules.evaluate(defs.rules, seen, clock)
        for name, members in got.items():
            nonempty[name] += bool(members)
    assert all(nonempty.values()), nonempty


# -- shared Spark session ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    """One session for the module, with the Kafka source jars.

    The driver JVM's classpath is fixed when the first session of the process starts.
    compute.spark puts the jars on it whenever they are cached (`./run test` fetches them
    first); if a JVM was started before they were, they are added to this session with ADD JAR,
    which works but logs ClassNotFoundException for the source's metric classes."""
    from compute.spark import build_session
    from compute.sparkjars import kafka_jars

    jars = kafka_jars()  # fetches them with Maven when missing
    session = build_session(app_name="test-compute-stream")
    loader = session.sparkContext._jvm.java.lang.Thread.currentThread().getContextClassLoader()
    try:
        loader.loadClass("org.apache.spark.sql.kafka010.KafkaSourceProvider")
    except Exception:  # noqa: BLE001 - py4j raises its own error types
        for jar in jars:
            session.sql(f"ADD JAR '{jar}'")
    yield session
    session.stop()


# -- the micro-batch logic against the reference (Spark, no Kafka) -----------------------------


def _kafka_frame(spark: object, events: list[Event], garbage: int = 0) -> object:
    """A DataFrame shaped like the Kafka source's (value, timestamp), record time = event ts."""
    import datetime as dt

    rows = [
        (json.dumps(e).encode(), dt.datetime.fromtimestamp(e["ts"] / 1000, dt.UTC)) for e in events
    ]
    at = dt.datetime.fromtimestamp(events[0]["ts"] / 1000, dt.UTC)
    bad = [
        b"not json",
        b"[1, 2]",
        b'{"user_id": 1.5, "type": "view", "ts": 1}',
        b'{"user_id": "abc", "type": "view", "ts": 1}',
        b'{"user_id": -3, "type": "view", "ts": 1}',
        b'{"user_id": 18446744073709551616, "type": "view", "ts": 1}',
        b'{"user_id": 99999999999999999999, "type": "view", "ts": 1}',
        b'{"user_id": 123456789012345678901234, "type": "view", "ts": 1}',
        b'{"user_id": 1, "type": "click", "ts": 1}',
        b'{"user_id": 1, "type": "view", "ts": "1"}',
        b'{"user_id": 1, "type": "view"}',
        # ahead of its Kafka timestamp by an hour: dropped, it must not move the clock
        json.dumps({**events[0], "ts": events[0]["ts"] + 3_600_000}).encode(),
    ]
    rows += [(value, at) for value in bad[:garbage]]
    return spark.createDataFrame(rows, "value BINARY, timestamp TIMESTAMP")  # type: ignore[attr-defined]


@pytest.mark.spark
def test_batches_match_reference(spark: object, tmp_path: Path) -> None:
    defs = rules.parse(DEFINITIONS + EXTRA_RULES)
    batches = _random_batches(USERS, 3, 300, seed=7, step_ms=3000)
    reports: list[BatchReport] = []
    log = LogDirTransport(tmp_path / "log")
    job = StreamJob(defs, Publisher(log, writer_id="t"), tmp_path / "ckpt", on_batch=reports.append)
    seen: list[Event] = []
    for batch_id, batch in enumerate(batches):
        job.process(_kafka_frame(spark, batch, garbage=12), batch_id)
        seen += batch
        clock = max(e["ts"] for e in seen)
        report = reports[-1]
        assert report.clock == clock
        assert (report.events, report.invalid) == (len(batch) + 12, 12)
        want = rules.evaluate(defs.rules, seen, clock)
        got = {name: set(job._last[name]) for name in defs.names}  # type: ignore[index]
        assert got == want, f"batch {batch_id}"
        print(report.line())
    assert all(want.values()), "every rule should have members in this data"
    versions = dict(reports[-1].versions)

    # A re-run of the last batch (Spark does this after a crash before its commit) computes the
    # same state and memberships: a fresh process publishes nothing.
    again = StreamJob(defs, Publisher(log, writer_id="t"), tmp_path / "ckpt",
                      on_batch=reports.append)  # fmt: skip
    again.process(_kafka_frame(spark, batches[-1], garbage=12), len(batches) - 1)
    assert reports[-1].published and reports[-1].versions == {}
    assert reports[-1].cardinalities == reports[-2].cardinalities
    assert versions  # the last batch did change something the first time


# -- on the real broker ------------------------------------------------------------------------


def _create_log_topics(bootstrap: str, prefix: str, partitions: int) -> None:
    """The segment log's topics, made here rather than by the publisher's first write.

    KafkaTransport.ensure_topics lets its AdminClient be garbage-collected while the
    create_topics futures are pending, so they fail with _DESTROY; keeping the client alive
    until the futures resolve avoids that. TODO: drop this once ensure_topics holds it."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [
        NewTopic(f"{prefix}.deltas", partitions, 1, config={"cleanup.policy": "delete"}),
        NewTopic(f"{prefix}.snapshots", partitions, 1, config={"cleanup.policy": "compact"}),
    ]
    for future in admin.create_topics(topics, request_timeout=30).values():
        future.result()
    # Wait until every partition has a leader that answers: a replica started earlier fails
    # on NOT_LEADER_FOR_PARTITION.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-probe"})
    deadline = time.monotonic() + 30
    try:
        for t in topics:
            for p in range(partitions):
                while True:
                    try:
                        consumer.get_watermark_offsets(TopicPartition(t.topic, p), timeout=5)
                        break
                    except KafkaException:
                        assert time.monotonic() < deadline, f"{t.topic}[{p}] has no leader"
                        time.sleep(0.1)
    finally:
        consumer.close()


def _delta_versions(transport: Transport) -> dict[str, list[int]]:
    """segment -> the versions of its delta records, in log order (one entry per record)."""
    out: dict[str, list[int]] = {}
    with transport.reader() as reader:
        ends = {p: reader.watermarks("deltas", p)[1] for p in range(reader.partitions)}
        reader.assign({("deltas", p): 0 for p in ends})
        deadline = time.monotonic() + 30
        while any(reader.position("deltas", p) < end for p, end in ends.items()):
            assert time.monotonic() < deadline, "could not read the deltas topic"
            for rec in reader.poll(0.5):
                if rec.value is not None:
                    delta = decode(rec.value)
                    if isinstance(delta, Delta):
                        out.setdefault(delta.segment, []).append(delta.version)
    return out


class Watch:
    """Records when a condition on the replica first holds (polled every 0.5 ms)."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.check = check
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.check():
                self.at = time.time()
                return
            time.sleep(0.0005)

    def wait(self, timeout: float) -> float:
        self._thread.join(timeout)
        self._stop.set()
        assert self.at is not None, f"not visible within {timeout} s"
        return self.at


def _run_once(spark: object, job: StreamJob, opts: StreamOptions) -> None:
    query = start(spark, job, opts)  # type: ignore[arg-type]
    assert query.awaitTermination(240), "the availableNow run did not finish in 240 s"
    assert query.exception() is None, query.exception()


@pytest.mark.kafka
@pytest.mark.spark
def test_stream_on_kafka(
    spark: object, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    from sidecar.transport.kafka import KafkaTransport

    defs = rules.parse(DEFINITIONS)
    topic = f"{topic_prefix}.events"
    ensure_topic(kafka_bootstrap, topic, partitions=2)
    log = KafkaTransport(kafka_bootstrap, topic_prefix)
    _create_log_topics(kafka_bootstrap, topic_prefix, 4)
    reports: list[BatchReport] = []
    checkpoint = tmp_path / "ckpt"

    def new_job() -> StreamJob:  # a fresh process: nothing remembered but the checkpoint
        publisher = Publisher(log, writer_id=f"{topic_prefix}-stream")
        return StreamJob(defs, publisher, checkpoint, on_batch=reports.append)

    opts = StreamOptions(kafka_bootstrap, topic, checkpoint, once=True)
    replica = Replica(log).start()
    assert replica.wait_ready(30)
    try:
        # 1. A controlled set of events: user 1 abandons a cart, user 2 adds and orders, user 3
        #    views electronics three times, user 4 twice, user 5 added 40 minutes ago, and a
        #    user id above 2**63 adds to cart.
        t = now_ms()
        produce(kafka_bootstrap, topic, [
            make_event(1, "add_to_cart", ts=t - 60_000),
            make_event(2, "add_to_cart", ts=t - 60_000),
            make_event(2, "order", ts=t - 30_000),
            *[make_event(3, "view", ts=t - i * 1000) for i in range(3)],
            *[make_event(4, "view", ts=t - i * 1000) for i in range(2)],
            make_event(5, "add_to_cart", ts=t - 40 * 60_000),
            make_event(BIG, "add_to_cart", ts=t),
        ])  # fmt: skip
        watch = Watch(lambda: replica.contains(1, CART) is True)
        _run_once(spark, new_job(), opts)
        visible = watch.wait(30)
        first = reports[-1]
        assert first.published and first.published_at is not None
        assert replica.contains(2, CART) is False
        assert replica.contains(5, CART) is False
        assert replica.contains(BIG, CART) is True
        assert replica.contains(3, BROWSE) is True
        assert replica.contains(4, BROWSE) is False
        assert set(replica.engine.segments[CART].bitmap) == {1, BIG}
        # The delta's ts is stamped when the publisher starts writing its transaction.
        written = replica.engine.segments[CART].updated_ms / 1000
        print(f"\nfirst run: publish -> visible in a replica {(visible - written) * 1000:.1f} ms"
              f" ({first.line()})")  # fmt: skip
        before = {s: replica.engine.segments[s].version for s in defs.names}
        assert before == {CART: 1, BROWSE: 1}

        # 2. A crash after the publish but before Spark committed the batch: Spark re-runs it
        #    on restart, and the re-run publishes nothing.
        commits = checkpoint / "spark" / "commits"
        last = max(int(p.name) for p in commits.iterdir() if p.name.isdigit())
        (commits / str(last)).unlink()
        (commits / f".{last}.crc").unlink(missing_ok=True)
        n = len(reports)
        _run_once(spark, new_job(), opts)
        assert len(reports) == n + 1, "the uncommitted batch was not re-run"
        assert reports[-1].batch_id == last and reports[-1].versions == {}
        # And a plain restart with no new events runs no batch at all.
        _run_once(spark, new_job(), opts)
        assert len(reports) == n + 1
        time.sleep(0.5)
        assert {s: replica.engine.segments[s].version for s in defs.names} == before

        # 3. Events while the job is down: user 1 orders, user 7 adds to cart.
        t = now_ms()
        produce(kafka_bootstrap, topic, [
            make_event(1, "order", ts=t), make_event(7, "add_to_cart", ts=t),
        ])  # fmt: skip
        watch = Watch(lambda: replica.contains(7, CART) is True)
        _run_once(spark, new_job(), opts)
        watch.wait(30)
        assert replica.contains(1, CART) is False
        assert set(replica.engine.segments[CART].bitmap) == {7, BIG}
        assert replica.engine.segments[CART].version == 2
        assert replica.engine.segments[BROWSE].version == 1

        # 4. Continuous trigger: measure event -> visible and publish -> visible.
        job = new_job()
        query = start(spark, job, StreamOptions(kafka_bootstrap, topic, checkpoint,  # type: ignore[arg-type]
                                                trigger_seconds=0.5))  # fmt: skip
        try:
            time.sleep(2)  # let the query start up
            n = len(reports)
            watch = Watch(lambda: replica.contains(8, CART) is True)
            produced = time.time()
            produce(kafka_bootstrap, topic, [make_event(8, "add_to_cart")])
            seen = watch.wait(60)
            # The replica may see the change before the job has filed its batch report.
            deadline = time.monotonic() + 30
            while not any(r.published for r in reports[n:]):
                assert time.monotonic() < deadline, "no published batch report"
                time.sleep(0.05)
            report = next(r for r in reports[n:] if r.published)
            written = replica.engine.segments[CART].updated_ms / 1000
            print(
                f"continuous: event produced -> visible in a replica {seen - produced:.2f} s; "
                f"publish -> visible {(seen - written) * 1000:.1f} ms ({report.line()})"
            )
        finally:
            query.stop()
        assert replica.engine.segments[CART].version == 3

        # No version was ever written twice, none skipped.
        versions = _delta_versions(log)
        assert versions == {CART: [1, 2, 3], BROWSE: [1]}, versions
    finally:
        replica.stop(save=False)
        shutil.rmtree(checkpoint, ignore_errors=True)


@pytest.mark.kafka
@pytest.mark.kafka
@pytest.mark.spark
def test_gen_events_and_the_stream_over_sasl(
    spark: object, sasl_kafka: SaslBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """gen-events with --events-kafka-config (librdkafka's names), the stream's source with
    the Java client's settings derived from them (as `seg-compute stream` does without
    --events-source-config), against a SASL-only broker."""
    import subprocess
    import sys

    from compute.stream import with_derived_security

    topic = f"{topic_prefix}.events"
    config = [f"--events-kafka-config={k}={v}" for k, v in sasl_kafka.librdkafka().items()]
    cmd = [sys.executable, "-m", "compute.cli", "gen-events", "--events-kafka", sasl_kafka.address,
           "--events-topic", topic, "--count", "50", "--rate", "1000", "--users", "5",
           *config]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "50 events" in proc.stdout
    t = now_ms()
    produce(sasl_kafka.address, topic, [make_event(1, "add_to_cart", ts=t - 60_000)],
            client=sasl_kafka.librdkafka())  # fmt: skip
    log = LogDirTransport(tmp_path / "log")
    job = StreamJob(rules.parse(DEFINITIONS), Publisher(log), tmp_path / "ckpt")
    source = with_derived_security({}, sasl_kafka.librdkafka())
    assert source == sasl_kafka.java()
    _run_once(spark, job, StreamOptions(sasl_kafka.address, topic, tmp_path / "ckpt",
                                        once=True, kafka_options=source))  # fmt: skip
    replica = Replica(log).start()
    try:
        assert replica.wait_ready(30)
        assert replica.contains(1, CART) is True  # read through SASL, published
    finally:
        replica.stop()


@pytest.mark.kafka
@pytest.mark.spark
def test_the_stream_reads_a_tls_topic_with_the_ca_given_once(
    spark: object, tls_kafka: TlsBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """The librdkafka client's PEM CA (ssl.ca.location) becomes the Java client's PEM
    truststore: Spark's Kafka source reads the TLS-only broker's topic with it."""
    from compute.stream import with_derived_security

    topic = f"{topic_prefix}.events"
    client = tls_kafka.librdkafka()
    ensure_topic(tls_kafka.address, topic, partitions=1, client=client)
    produce(tls_kafka.address, topic, [make_event(7, "add_to_cart", ts=now_ms() - 60_000)],
            client=client)  # fmt: skip
    log = LogDirTransport(tmp_path / "log")
    job = StreamJob(rules.parse(DEFINITIONS), Publisher(log), tmp_path / "ckpt")
    source = with_derived_security({}, client)
    _run_once(spark, job, StreamOptions(tls_kafka.address, topic, tmp_path / "ckpt",
                                        once=True, kafka_options=source))  # fmt: skip
    replica = Replica(log).start()
    try:
        assert replica.wait_ready(30)
        assert replica.contains(7, CART) is True
    finally:
        replica.stop()


def test_a_stream_source_setting_spark_owns_is_refused_before_spark_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compute import cli as compute_cli

    definitions = tmp_path / "defs.toml"
    definitions.write_text(DEFINITIONS)
    code = compute_cli.main(["stream", "--events-kafka", "127.0.0.1:1", "--events-topic", "e",
                             "--definitions", str(definitions), "--publish-log-dir",
                             str(tmp_path / "log"), "--checkpoint", str(tmp_path / "ckpt"),
                             "--events-source-config", "auto.offset.reset=latest"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("seg-compute stream: error: --events-source-config auto.offset.reset=...: "
                   "auto.offset.reset is set by the job's starting-offsets flag\n")  # fmt: skip
    assert not (tmp_path / "ckpt").exists()


def test_gen_events_cli(kafka_bootstrap: str, topic_prefix: str) -> None:
    """`seg-compute gen-events` creates the topic and writes well-formed events at the rate."""
    import subprocess
    import sys

    from confluent_kafka import Consumer

    topic = f"{topic_prefix}.events"
    cmd = [sys.executable, "-m", "compute.cli", "gen-events", "--events-kafka", kafka_bootstrap,
           "--events-topic", topic, "--rate", "400", "--count", "200", "--users", "50"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "200 events" in proc.stdout and "gen-events:" in proc.stderr
    assert took >= 0.45, f"200 events at 400/s took only {took:.2f} s"
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": topic_prefix,
                         "auto.offset.reset": "earliest"})  # fmt: skip
    consumer.subscribe([topic])
    got: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < 200 and time.monotonic() < deadline:
            for msg in consumer.consume(200, timeout=1):
                assert msg.error() is None, msg.error()
                got.append((msg.key(), json.loads(msg.value())))
    finally:
        consumer.close()
    assert len(got) == 200
    for key, event in got:
        assert set(event) == {"user_id", "type", "product_id", "category", "amount", "ts"}
        assert key == str(event["user_id"]).encode()
        assert event["type"] in ("view", "add_to_cart", "remove_from_cart", "order")
        assert isinstance(event["ts"], int) and abs(event["ts"] - now_ms()) < 600_000
    assert len({e["user_id"] for _, e in got}) > 5


def test_example_stream_definitions() -> None:
    from compute.definitions import EXAMPLE

    example = EXAMPLE.parent / "stream_example.toml"
    assert {r.name for r in rules.load(example).rules} >= {"cart_abandoners_30m"}


def test_bitmap_of_unsigned_ids() -> None:
    """The two's complement mapping used for ids >= 2**63 round-trips (numpy view)."""
    import numpy as np

    ids = [0, 1, 2**63 - 1, 2**63, BIG, 2**64 - 1]
    signed = [i - 2**64 if i >= 2**63 else i for i in ids]
    back = np.array(signed, dtype=np.int64).view(np.uint64)
    assert BitMap64(int(x) for x in back) == BitMap64(ids)
