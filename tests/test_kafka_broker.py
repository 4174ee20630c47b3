"""The real Kafka broker (deploy/local/kafka) does what the publisher and sidecar rely on.

Facts pinned here (Kafka 4.1.1 broker, confluent-kafka 2.16 / librdkafka 2.16):

* ``Consumer.get_watermark_offsets(tp, cached=False)`` on a ``read_committed`` consumer
  returns ``(log start, last stable offset)``. Once a transaction's markers are written the
  LSO equals the log end offset, which COUNTS the control record: N committed records in
  one transaction on an empty partition give ``high == N + 1``, while only N messages are
  delivered. Aborted records and their abort marker also count. While a transaction is
  open the LSO stays at its first offset (a ``read_uncommitted`` consumer's high is the log
  end offset).
* ``commit_transaction()`` / ``abort_transaction()`` return before the markers are
  written: the LSO can still lag right after they return, so poll for it.
* ``enable.partition.eof`` with ``read_committed``: ``_PARTITION_EOF`` arrives once caught
  up, at ``offset() == high`` (past the trailing marker), and ``position()`` equals it.
* A second producer with the same ``transactional.id`` aborts the first one's open
  transaction in ``init_transactions()``; the first producer's ``commit_transaction()`` then
  raises ``KafkaException`` with code ``_FENCED`` and ``fatal() == True``; so does its
  ``close()`` afterwards.
* The Python ``Consumer`` needs a ``group.id`` even when only ``assign()`` is used; without
  ``subscribe()`` and without offset commits no group is joined.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def create_topic(bootstrap: str, name: str, partitions: int, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)],
        operation_timeout=30,
        request_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=60)


def make_consumer(bootstrap: str, group: str, isolation: str, **extra: object) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,  # required by the client; assign() never joins the group
            "isolation.level": isolation,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **extra,
        }
    )


def transactional_producer(bootstrap: str, txn_id: str, **extra: object) -> Producer:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": txn_id, "linger.ms": 0, **extra}
    )
    producer.init_transactions(60)
    return producer


def high_watermark(consumer: Consumer, tp: TopicPartition) -> int:
    _low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
    return high


def wait_high(consumer: Consumer, tp: TopicPartition, expected: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while True:
        high = high_watermark(consumer, tp)
        if not seen or seen[-1] != high:
            seen.append(high)
        if high == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"high watermark of {tp} never reached {expected}: saw {seen}")
        time.sleep(0.05)


def drain_until_eof(
    consumer: Consumer, partitions: set[int], timeout: float = 30
) -> tuple[list[Message], dict[int, int]]:
    """Polls until every partition reported _PARTITION_EOF; returns messages and EOF offsets."""
    messages: list[Message] = []
    eof: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while set(eof) != partitions:
        assert time.monotonic() < deadline, f"no EOF for {partitions - set(eof)}; got {eof}"
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        err = msg.error()
        if err is None:
            messages.append(msg)
        elif err.code() == KafkaError._PARTITION_EOF:
            eof[msg.partition()] = msg.offset()
        else:
            raise KafkaException(err)
    return messages, eof


def read_partition0(
    bootstrap: str, group: str, isolation: str, topic: str
) -> tuple[list[bytes | None], dict[int, int]]:
    """The values of partition 0 of `topic` from its start up to _PARTITION_EOF, and the EOF
    offsets, read by a consumer of its own with `isolation`."""
    consumer = make_consumer(bootstrap, group, isolation, **{"enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        messages, eof = drain_until_eof(consumer, {0})
        return [m.value() for m in messages], eof
    finally:
        consumer.close()


def test_read_committed_sees_only_committed_and_watermarks_count_markers(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}-txn"
    create_topic(kafka_bootstrap, topic, partitions=2)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    committed = make_consumer(kafka_bootstrap, f"{topic_prefix}-rc", "read_committed")
    uncommitted = make_consumer(kafka_bootstrap, f"{topic_prefix}-ru", "read_uncommitted")
    producer = transactional_producer(kafka_bootstrap, f"{topic_prefix}-producer")
    try:
        assert committed.get_watermark_offsets(p0, timeout=10, cached=False) == (0, 0)

        # Transaction 1, committed: offsets 0..2 on p0 (+ marker at 3), offset 0 on p1 (+ 1).
        producer.begin_transaction()
        for i in range(3):
            producer.produce(topic, value=f"c{i}".encode(), key=b"k", partition=0)
        producer.produce(topic, value=b"c-p1", key=b"k", partition=1)
        producer.commit_transaction(60)
        wait_high(committed, p0, 4)  # 3 records + the commit marker
        wait_high(committed, p1, 2)
        assert committed.get_watermark_offsets(p0, timeout=10, cached=False) == (0, 4)

        # Transaction 2, left open: the LSO stays at its first offset (4).
        producer.begin_transaction()
        for i in range(2):
            producer.produce(topic, value=f"a{i}".encode(), key=b"k", partition=0)
        producer.flush(30)
        wait_high(uncommitted, p0, 6)  # read_uncommitted: log end offset
        assert high_watermark(committed, p0) == 4

        # ...then aborted: 2 aborted records + the abort marker count (4 + 3 = 7).
        producer.abort_transaction(60)
        wait_high(committed, p0, 7)

        # Transaction 3, committed: offset 7 + marker at 8.
        producer.begin_transaction()
        producer.produce(topic, value=b"c3", key=b"k", partition=0)
        producer.commit_transaction(60)
        wait_high(committed, p0, 9)
        assert high_watermark(uncommitted, p0) == 9
    finally:
        producer.close()
        committed.close()
        uncommitted.close()

    reader = make_consumer(
        kafka_bootstrap, f"{topic_prefix}-eof", "read_committed", **{"enable.partition.eof": True}
    )
    try:
        reader.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
        messages, eof = drain_until_eof(reader, {0, 1})
        got = sorted((m.partition(), m.offset(), m.value()) for m in messages)
        assert got == [
            (0, 0, b"c0"),
            (0, 1, b"c1"),
            (0, 2, b"c2"),
            (0, 7, b"c3"),
            (1, 0, b"c-p1"),
        ]
        # EOF comes at the high watermark, past the trailing commit marker.
        assert eof == {0: 9, 1: 2}
        positions = reader.position([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        assert [tp.offset for tp in positions] == [9, 2]
    finally:
        reader.close()

    # The aborted records really are in the log: read_uncommitted sees them.
    values, eof = read_partition0(kafka_bootstrap, f"{topic_prefix}-raw", "read_uncommitted", topic)
    assert values == [b"c0", b"c1", b"c2", b"a0", b"a1", b"c3"]
    assert eof == {0: 9}


def test_second_producer_with_same_transactional_id_fences_the_first(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}-fence"
    create_topic(kafka_bootstrap, topic, partitions=1)
    txn_id = f"{topic_prefix}-producer"

    first = transactional_producer(kafka_bootstrap, txn_id)
    first.begin_transaction()
    first.produce(topic, value=b"zombie", partition=0)
    first.flush(30)

    # init_transactions() of the newcomer bumps the epoch and aborts the open transaction.
    second = transactional_producer(kafka_bootstrap, txn_id)

    with pytest.raises(KafkaException) as excinfo:
        first.commit_transaction(30)
    err = excinfo.value.args[0]
    assert err.code() == KafkaError._FENCED, err
    assert err.fatal(), err

    # close() tries to abort the open transaction and re-raises the fatal error.
    with pytest.raises(KafkaException) as excinfo:
        first.close()
    assert excinfo.value.args[0].code() == KafkaError._FENCED
    del first

    second.begin_transaction()
    second.produce(topic, value=b"winner", partition=0)
    second.commit_transaction(60)
    second.close()

    values, _eof = read_partition0(kafka_bootstrap, f"{topic_prefix}-eof", "read_committed", topic)
    assert values == [b"winner"]


def test_records_larger_than_librdkafka_default_max(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The broker accepts ~1.5 MB records (message.max.bytes=8 MiB); the producer must raise
    its own message.max.bytes (librdkafka default 1000000)."""
    topic = f"{topic_prefix}-big"
    create_topic(kafka_bootstrap, topic, partitions=1)
    value = bytes(range(256)) * 6000  # 1,536,000 bytes
    producer = transactional_producer(
        kafka_bootstrap, f"{topic_prefix}-producer", **{"message.max.bytes": 8_000_000}
    )
    producer.begin_transaction()
    producer.produce(topic, value=value, partition=0)
    producer.commit_transaction(60)
    producer.close()

    values, eof = read_partition0(kafka_bootstrap, f"{topic_prefix}-eof", "read_committed", topic)
    assert values == [value]
    assert eof == {0: 2}
