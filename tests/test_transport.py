"""The log transport contract (sidecar/transport/base.py), on both implementations: the log
directory always, the real Kafka broker with the `kafka` mark. Then what is specific to each:
the directory's torn tail and single-writer lock, Kafka's fencing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.transport import (
    FencedError,
    LogDirTransport,
    LogReader,
    LogRecord,
    Transport,
    TransportError,
)
from sidecar.transport.base import Topic

PARTITIONS = 3
TIMEOUT = 30.0


@pytest.fixture(
    params=["logdir", pytest.param("kafka", marks=[pytest.mark.kafka, pytest.mark.timeout(300)])]
)
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    if request.param == "logdir":
        yield LogDirTransport(tmp_path / "log")
        return
    from sidecar.transport import KafkaTransport

    bootstrap = request.getfixturevalue("kafka_bootstrap")
    prefix = request.getfixturevalue("topic_prefix")
    yield KafkaTransport(bootstrap, prefix=prefix)  # the first writer creates the topics


@pytest.fixture
def writer_id(request: pytest.FixtureRequest) -> str:
    return f"w-{request.node.name}-{os.urandom(4).hex()}"


def _is_kafka(transport: Transport) -> bool:
    return not isinstance(transport, LogDirTransport)


def _ends(reader: LogReader, topics: tuple[Topic, ...] = ("deltas", "snapshots")) -> dict:
    return {(t, p): reader.watermarks(t, p)[1] for t in topics for p in range(reader.partitions)}


def _stable_ends(reader: LogReader, expected_records: dict[tuple[Topic, int], int]) -> dict:
    """End offsets once the committed data is all visible. Kafka's LSO may lag a moment behind
    commit_transaction() returning (the markers are written asynchronously)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        ends = _ends(reader)
        if all(ends[tp] >= n for tp, n in expected_records.items()):
            time.sleep(0.2)  # let a trailing marker land too
            again = _ends(reader)
            if again == ends:
                return ends
        if time.monotonic() > deadline:
            raise AssertionError(f"end offsets never reached {expected_records}: {ends}")
        time.sleep(0.05)


def _read_to(reader: LogReader, ends: dict[tuple[Topic, int], int]) -> list[LogRecord]:
    """Poll until position() reached `ends` for every assigned partition."""
    out: list[LogRecord] = []
    deadline = time.monotonic() + TIMEOUT
    while any(reader.position(*tp) < end for tp, end in ends.items()):
        out.extend(reader.poll(0.1))
        if time.monotonic() > deadline:
            positions = {tp: reader.position(*tp) for tp in ends}
            raise AssertionError(f"positions {positions} never reached {ends}; read {out}")
    out.extend(reader.poll(0.05))  # nothing more may come
    return out


def _by_partition(records: list[LogRecord]) -> dict[tuple[Topic, int], list[LogRecord]]:
    out: dict[tuple[Topic, int], list[LogRecord]] = {}
    for r in records:
        out.setdefault((r.topic, r.partition), []).append(r)
    return out


def _write(transport: Transport, writer_id: str, batches: list[list[tuple]]) -> None:
    with transport.writer(writer_id, PARTITIONS) as w:
        for batch in batches:
            with w.transaction():
                for topic, p, key, value in batch:
                    w.append(topic, p, key, value)


def _assign_all(reader: LogReader, offset: int = 0) -> None:
    reader.assign({(t, p): offset for t in ("deltas", "snapshots") for p in range(PARTITIONS)})


# -- the contract ----------------------------------------------------------------------------


def test_committed_records_in_order_with_offsets(transport: Transport, writer_id: str) -> None:
    batches = [
        [
            ("deltas", p, f"k{p}".encode(), f"t0-{p}-{i}".encode())
            for p in range(3)
            for i in range(3)
        ]
        + [("snapshots", 1, b"s#0", b"snap-a")],
        [("deltas", 0, b"k0", b"t1-0-0"), ("snapshots", 1, b"s#0", b"snap-b")],
        [("deltas", 2, None, b"t2-2-0")],
    ]
    _write(transport, writer_id, batches)
    with transport.reader() as reader:
        assert reader.partitions == PARTITIONS
        expected: dict[tuple[Topic, int], list[tuple]] = {}
        for batch in batches:
            for topic, p, key, value in batch:
                expected.setdefault((topic, p), []).append((key, value))
        ends = _stable_ends(reader, {tp: len(v) for tp, v in expected.items()})
        _assign_all(reader)
        got = _by_partition(_read_to(reader, ends))
        assert set(got) == set(expected)
        for tp, records in got.items():
            assert [(r.key, r.value) for r in records] == expected[tp], tp
            offsets = [r.offset for r in records]
            assert offsets == sorted(set(offsets)), tp  # strictly increasing
            assert offsets[-1] < ends[tp]
            if not _is_kafka(transport):  # Kafka's transaction markers take offsets too
                assert offsets == list(range(len(records)))
            assert all(r.topic == tp[0] and r.partition == tp[1] for r in records)
        for tp, end in ends.items():
            assert reader.position(*tp) == end


def test_aborted_transaction_is_never_visible(transport: Transport, writer_id: str) -> None:
    with transport.writer(writer_id, PARTITIONS) as w:
        with w.transaction():
            w.append("deltas", 0, b"k", b"before")
        with pytest.raises(RuntimeError, match="boom"), w.transaction():
            w.append("deltas", 0, b"k", b"aborted-1")
            w.append("snapshots", 1, b"k#0", b"aborted-2")
            w.append("deltas", 2, b"k", b"aborted-3")
            raise RuntimeError("boom")
        with w.transaction():
            w.append("deltas", 0, b"k", b"after")
        # an explicitly aborted one
        w.begin()
        w.append("deltas", 1, b"k", b"aborted-4")
        w.abort()
    with transport.reader() as reader:
        ends = _stable_ends(reader, {("deltas", 0): 2})
        _assign_all(reader)
        records = _read_to(reader, ends)
        assert [r.value for r in records] == [b"before", b"after"]
        for tp, end in ends.items():  # past the abort markers too
            assert reader.position(*tp) == end


def test_tombstones_on_snapshots(transport: Transport, writer_id: str) -> None:
    _write(
        transport,
        writer_id,
        [
            [("snapshots", 2, b"seg#0", b"chunk0"), ("snapshots", 2, b"seg#1", b"chunk1")],
            [("snapshots", 2, b"seg#0", b"chunk0-v2"), ("snapshots", 2, b"seg#1", None)],
        ],
    )
    with transport.reader() as reader:
        ends = _stable_ends(reader, {("snapshots", 2): 4})
        reader.assign({("snapshots", 2): 0})
        records = _read_to(reader, {("snapshots", 2): ends[("snapshots", 2)]})
        assert [(r.key, r.value) for r in records] == [
            (b"seg#0", b"chunk0"),
            (b"seg#1", b"chunk1"),
            (b"seg#0", b"chunk0-v2"),
            (b"seg#1", None),
        ]


def test_watermarks(transport: Transport, writer_id: str) -> None:
    with transport.writer(writer_id, PARTITIONS) as w:
        with transport.reader() as reader:
            for tp, end in _ends(reader).items():
                assert end == 0, tp
                assert reader.watermarks(*tp)[0] == 0
        with w.transaction():
            for i in range(5):
                w.append("deltas", 1, b"k", str(i).encode())
        with w.transaction():
            w.append("deltas", 1, b"k", b"5")
    with transport.reader() as reader:
        ends = _stable_ends(reader, {("deltas", 1): 6})
        low, high = reader.watermarks("deltas", 1)
        assert low == 0
        assert high == ends[("deltas", 1)]
        if _is_kafka(transport):
            assert high == 6 + 2  # one commit marker per transaction
        else:
            assert high == 6
        assert reader.watermarks("deltas", 0) == (0, 0)
        assert reader.watermarks("snapshots", 1) == (0, 0)


def test_a_commit_is_visible_to_readers_when_it_returns(
    transport: Transport, writer_id: str
) -> None:
    """No waiting: the end offsets a reader sees right after commit() include the commit."""
    with transport.writer(writer_id, PARTITIONS) as w, transport.reader() as reader:
        for i in range(15):
            with w.transaction():
                w.append("deltas", i % PARTITIONS, b"k", str(i).encode())
                w.append("snapshots", (i + 1) % PARTITIONS, b"k#0", str(i).encode())
            records = {p: len(range(p, i + 1, PARTITIONS)) for p in range(PARTITIONS)}
            marks = 2 if _is_kafka(transport) else 1  # each record and, on Kafka, its marker
            ends = reader.watermarks_all("deltas")
            for p, count in records.items():
                assert ends[p][1] == count * marks, (i, p, ends)
            snapshot_ends = reader.watermarks_all("snapshots")
            assert sum(end for _, end in snapshot_ends.values()) == (i + 1) * marks


def test_assign_from_an_offset(transport: Transport, writer_id: str) -> None:
    _write(
        transport,
        writer_id,
        [[("deltas", 0, b"k", f"a{i}".encode()) for i in range(4)], [("deltas", 0, b"k", b"b0")]],
    )
    with transport.reader() as reader:
        ends = _stable_ends(reader, {("deltas", 0): 5})
        reader.assign({("deltas", 0): 0})
        first = _read_to(reader, {("deltas", 0): ends[("deltas", 0)]})
        assert [r.value for r in first] == [b"a0", b"a1", b"a2", b"a3", b"b0"]
        for start in first[2:]:
            reader.assign({("deltas", 0): start.offset})
            assert reader.position("deltas", 0) == start.offset
            again = _read_to(reader, {("deltas", 0): ends[("deltas", 0)]})
            assert again == [r for r in first if r.offset >= start.offset]
        # assigning replaces: only the newly assigned partitions are read
        reader.assign({("deltas", 1): 0})
        assert reader.poll(0.3) == []
        # assigning at the end reads nothing, and position stays there
        reader.assign({("deltas", 0): ends[("deltas", 0)]})
        assert reader.poll(0.3) == []
        assert reader.position("deltas", 0) == ends[("deltas", 0)]


def test_reader_tails_a_writer(transport: Transport, writer_id: str) -> None:
    seen: list[LogRecord] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    with transport.writer(writer_id, PARTITIONS) as w:
        with w.transaction():
            w.append("deltas", 1, b"k", b"first")
        reader = transport.reader()
        reader.assign({("deltas", 1): 0, ("snapshots", 1): 0})

        def tail() -> None:
            try:
                while not stop.is_set():
                    seen.extend(reader.poll(0.05))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=tail, daemon=True)
        thread.start()
        try:
            _wait(lambda: [r.value for r in seen] == [b"first"], "the first record")
            time.sleep(0.3)  # the reader idles at the end
            for i in range(3):
                with w.transaction():
                    w.append("deltas", 1, b"k", f"later-{i}".encode())
                    w.append("snapshots", 1, b"k#0", f"snap-{i}".encode())
                time.sleep(0.1)
            _wait(lambda: len(seen) == 7, "the appended records")
        finally:
            stop.set()
            thread.join(30)
            # Closing the consumer under a poll still running frees it under librdkafka (a
            # crash of the whole run): a tail that did not stop is a failure, left unclosed.
            assert not thread.is_alive(), "the tailing thread did not stop"
            reader.close()
    assert not errors, errors
    deltas = [r.value for r in seen if r.topic == "deltas"]
    snaps = [r.value for r in seen if r.topic == "snapshots"]
    assert deltas == [b"first", b"later-0", b"later-1", b"later-2"]
    assert snaps == [b"snap-0", b"snap-1", b"snap-2"]


def test_position_reaches_the_end_after_reading_everything(
    transport: Transport, writer_id: str
) -> None:
    with transport.writer(writer_id, PARTITIONS) as w:
        for i in range(4):
            with w.transaction():
                w.append("deltas", 0, b"k", f"{i}".encode())
                w.append("snapshots", 0, b"k#0", f"{i}".encode())
        with pytest.raises(ValueError), w.transaction():  # an aborted tail
            w.append("deltas", 0, b"k", b"x")
            raise ValueError
    with transport.reader() as reader:
        ends = _stable_ends(reader, {("deltas", 0): 4, ("snapshots", 0): 4})
        reader.assign({("deltas", 0): 0, ("snapshots", 0): 0})
        records = _read_to(reader, ends)  # both partitions, markers included
        assert len([r for r in records if r.topic == "deltas"]) == 4
        assert reader.position("deltas", 0) == ends[("deltas", 0)]
        assert reader.position("snapshots", 0) == ends[("snapshots", 0)]
        # idle polls keep it there
        assert reader.poll(0.2) == []
        assert reader.position("deltas", 0) == ends[("deltas", 0)]


def test_reader_of_empty_topics(transport: Transport, writer_id: str) -> None:
    with transport.writer(writer_id, PARTITIONS), transport.reader() as reader:
        assert reader.partitions == PARTITIONS
        _assign_all(reader)
        assert reader.poll(0.3) == []
        for p in range(PARTITIONS):
            assert reader.position("deltas", p) == 0


def test_misuse_raises_transport_error(transport: Transport, writer_id: str) -> None:
    with transport.writer(writer_id, PARTITIONS) as w:
        with pytest.raises(TransportError):
            w.append("deltas", 0, b"k", b"v")  # outside a transaction
        with pytest.raises(TransportError):
            w.commit()  # nothing open
        w.begin()
        with pytest.raises(TransportError):
            w.begin()  # already open
        w.abort()
        # a partition that does not exist: refused at append (directory) or commit (Kafka)
        with pytest.raises(TransportError), w.transaction():
            w.append("deltas", PARTITIONS, b"k", b"v")
    with transport.reader() as reader:
        _assign_all(reader)
        assert reader.poll(0.3) == []


def _wait(cond, what: str, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- the log directory ---------------------------------------------------------------------------


def _logdir_values(path: Path) -> list[bytes | None]:
    t = LogDirTransport(path)
    with t.reader() as reader:
        ends = _ends(reader)
        _assign_all(reader)
        return [r.value for r in _read_to(reader, ends)]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-crc", "huge-length"])
def test_logdir_torn_tail_is_ignored_then_truncated(tmp_path: Path, damage: str) -> None:
    t = LogDirTransport(tmp_path / "log")
    _write(t, "w", [[("deltas", 0, b"k", b"one")], [("deltas", 0, b"k", b"two")]])
    log_file = tmp_path / "log" / "log"
    whole = log_file.read_bytes()
    _write(t, "w", [[("deltas", 0, b"k", b"torn" * 50), ("deltas", 1, b"k", b"torn")]])
    last = log_file.read_bytes()[len(whole) :]
    if damage == "truncate":
        log_file.write_bytes(whole + last[: len(last) // 2])
    elif damage == "garbage":
        log_file.write_bytes(whole + b"\x00garbage\xff" * 3)
    elif damage == "bad-crc":
        bad = bytearray(last)
        bad[-1] ^= 0xFF
        log_file.write_bytes(whole + bytes(bad))
    else:  # a valid-looking header announcing more bytes than the file holds
        log_file.write_bytes(whole + b"SGB1" + (2**31).to_bytes(4, "big") + b"\0\0\0\0xx")
    size_damaged = log_file.stat().st_size

    # readers ignore the torn tail
    assert _logdir_values(tmp_path / "log") == [b"one", b"two"]
    with t.reader() as reader:
        assert reader.watermarks("deltas", 0) == (0, 2)
        assert reader.watermarks("deltas", 1) == (0, 0)

    # a reader tailing across the repair sees exactly the new records
    tail = t.reader()
    tail.assign({("deltas", 0): 0, ("deltas", 1): 0})
    assert [r.value for r in _read_to(tail, {("deltas", 0): 2})] == [b"one", b"two"]

    # the next writer truncates it and appends fine
    with t.writer("w2", PARTITIONS) as w:
        assert log_file.stat().st_size == len(whole) < size_damaged
        with w.transaction():
            w.append("deltas", 0, b"k", b"three")
            w.append("deltas", 1, b"k", b"four")
    assert _logdir_values(tmp_path / "log") == [b"one", b"two", b"three", b"four"]
    got = _read_to(tail, {("deltas", 0): 3, ("deltas", 1): 1})
    tail.close()
    assert [(r.partition, r.offset, r.value) for r in got] == [(0, 2, b"three"), (1, 0, b"four")]


def test_logdir_second_writer_fails_while_the_first_is_open(tmp_path: Path) -> None:
    t = LogDirTransport(tmp_path / "log")
    first = t.writer("a", PARTITIONS)
    try:
        with pytest.raises(TransportError, match="another writer"):
            t.writer("b", PARTITIONS)
        with pytest.raises(TransportError):
            LogDirTransport(tmp_path / "log").writer("a")  # same id, other object: still no
        with first.transaction():
            first.append("deltas", 0, b"k", b"v")
    finally:
        first.close()
    with t.writer("b") as second:  # free again once closed
        assert second.partitions == PARTITIONS  # from meta.json, not the default
        with second.transaction():
            second.append("deltas", 0, b"k", b"w")
    assert _logdir_values(tmp_path / "log") == [b"v", b"w"]


def test_logdir_reader_without_a_log_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="not a log directory"):
        LogDirTransport(tmp_path / "nothing").reader()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    with pytest.raises(TransportError):
        LogDirTransport(tmp_path / "bad").reader()
    (tmp_path / "bad" / "meta.json").write_text('{"format": 2, "partitions": 3}')
    with pytest.raises(TransportError):
        LogDirTransport(tmp_path / "bad").reader()


def test_logdir_reader_between_meta_and_log_creation(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "meta.json").write_text('{"format": 1, "partitions": 2}')
    with pytest.raises(TransportError):
        LogDirTransport(tmp_path / "log").reader()


def test_logdir_empty_commit_writes_nothing(tmp_path: Path) -> None:
    t = LogDirTransport(tmp_path / "log")
    with t.writer("w", PARTITIONS) as w, w.transaction():
        pass
    assert (tmp_path / "log" / "log").stat().st_size == 0


# -- Kafka ---------------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_kafka_second_writer_fences_the_first(kafka_bootstrap: str, topic_prefix: str) -> None:
    from sidecar.transport import KafkaTransport

    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    writer_id = f"{topic_prefix}-publisher"
    first = t.writer(writer_id, PARTITIONS)
    first.begin()
    first.append("deltas", 0, b"k", b"from-the-first")
    second = t.writer(writer_id, PARTITIONS)  # init_transactions fences the first
    try:
        with pytest.raises(FencedError):
            first.commit()
        with pytest.raises(TransportError):  # it stays unusable
            first.begin()
        with second.transaction():
            second.append("deltas", 0, b"k", b"from-the-second")
    finally:
        second.close()
    with t.reader() as reader:
        ends = _stable_ends(reader, {("deltas", 0): 1})
        reader.assign({("deltas", 0): 0})
        assert [r.value for r in _read_to(reader, {("deltas", 0): ends[("deltas", 0)]})] == [
            b"from-the-second"
        ]


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_kafka_fenced_writer_closes_with_a_transport_error_or_quietly(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """`with transport.writer() as w:` around a fenced commit must surface FencedError, not a
    raw confluent_kafka exception from close() (the publisher's CLI maps FencedError to exit 3).
    """
    from sidecar.transport import KafkaTransport

    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    writer_id = f"{topic_prefix}-publisher"
    with pytest.raises(FencedError), t.writer(writer_id, PARTITIONS) as first:
        first.begin()
        first.append("deltas", 0, b"k", b"v")
        t.writer(writer_id, PARTITIONS).close()
        first.commit()


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_kafka_writer_creates_the_topics(kafka_bootstrap: str, topic_prefix: str) -> None:
    from sidecar.transport import KafkaTransport

    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    with pytest.raises(TransportError):
        t.reader()  # no topics yet
    t.writer(f"{topic_prefix}-w", 5).close()
    assert t.partition_count() == 5
    w = t.writer(f"{topic_prefix}-w", 2)  # existing topics keep their count
    assert w.partitions == 5
    w.close()


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_kafka_reads_from_every_offset_past_markers_and_aborts(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A reader moves its position past transaction markers and aborted records as soon as
    its consumer has fetched them (KafkaReader._skipped), before the partition EOF: from every
    starting offset, markers included, it reads exactly the committed records after it, and
    stops at the end."""
    from sidecar.transport import KafkaTransport

    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    committed: list[bytes] = []
    with t.writer(f"{topic_prefix}-w", PARTITIONS) as w:
        for i in range(6):
            values = [f"{i}-{j}".encode() for j in range(i % 3 + 1)]
            if i % 3 == 1:
                w.begin()
                for v in values:
                    w.append("deltas", 0, b"k", b"aborted " + v)
                w.abort()
                continue
            with w.transaction():
                for v in values:
                    w.append("deltas", 0, b"k", v)
            committed += values
    with t.reader() as reader:
        ends = _stable_ends(reader, {("deltas", 0): len(committed)})
        end = ends[("deltas", 0)]
        reader.assign({("deltas", 0): 0})
        by_offset = {r.offset: r.value for r in _read_to(reader, {("deltas", 0): end})}
        assert list(by_offset.values()) == committed
    for start in range(end + 1):
        with t.reader() as reader:
            reader.assign({("deltas", 0): start})
            got = [r.value for r in reader.read_until({("deltas", 0): end}, stall_timeout=30)]
            assert got == [v for off, v in by_offset.items() if off >= start], start
            assert reader.position("deltas", 0) == end


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_kafka_clients_talk_to_a_learned_broker_once_connected(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """`connect` returns once a new client holds a connection to a broker the bootstrap
    server named (its answers carry that broker's id, the bootstrap connection's is -1): a
    request sent before then waits for librdkafka's timers (perf/ANALYSIS.md)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    from sidecar.transport.kafka import CLIENT_DEFAULTS, connect

    topic = f"{topic_prefix}.deltas"
    for make in (AdminClient, Producer):
        for _ in range(3):
            client = make({"bootstrap.servers": kafka_bootstrap, **CLIENT_DEFAULTS})
            connect(client, topic, 30)
            # The answering broker's id is the check; the timeout only bounds the wait (a
            # loaded broker's JVM can take longer than 50 ms to answer).
            assert client.list_topics(topic, timeout=5).orig_broker_id >= 0


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_kafka_transport_shares_one_admin_and_pickles_without_it(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    import pickle

    from sidecar.transport import KafkaTransport

    t = KafkaTransport(kafka_bootstrap, prefix=topic_prefix)
    t.writer(f"{topic_prefix}-w", 2).close()
    with t.reader() as a, t.reader() as b:
        a.watermarks_all("deltas")
        b.watermarks_all("deltas")
    assert t._admin() is t._admin()
    copy = pickle.loads(pickle.dumps(t))  # e.g. sent to another process
    assert copy._admin() is not t._admin()
    assert copy.partition_count() == 2
    assert copy.identity() == t.identity()
