"""The Kafka log: confluent-kafka with transactions, read_committed, explicit partitions."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TypeVar

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from . import base
from .base import TOPICS, FencedError, LogRecord, NewLogIdentity, Topic, TransportError

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 8
#: A record holds at most ~1 MB of bitmap; leave room for the envelope and batching.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DELTA_RETENTION_MS = 7 * 24 * 3600 * 1000
#: How long a reader waits for the broker's first answer before it fails (and is retried)
CONNECT_TIMEOUT = 2.0
#: Set on every client of the log (the transport's config goes over it). librdkafka holds a
#: new client's first connection to a broker it learned from the bootstrap servers for half of
#: reconnect.backoff.ms (default 100 ms); 10 ms makes that 11 ms. It is also the first pause
#: before reconnecting to a lost broker (doubling up to reconnect.backoff.max.ms, 10 s).
CLIENT_DEFAULTS: dict[str, object] = {"reconnect.backoff.ms": 10}
#: After an assign or delivered records, for this long a reader's poll looks every
#: MARKER_POLL_S for a position moved past transaction markers (KafkaReader._skipped); an idle
#: tailing reader blocks for its whole timeout.
MARKER_WATCH_S = 0.2
MARKER_POLL_S = 0.003
#: How often a reader's poll asks for the topics' ids (one describe, answered off the poll:
#: `KafkaReader._look_at_identity`), so topics deleted and created again under it are seen
#: within about this long even when no offset goes back. The default of
#: `KafkaTransport(identity_check_s=...)` (`--kafka-identity-check`): each describe is one
#: metadata request per reader, which a broker serving thousands of sidecars may want rarer.
IDENTITY_CHECK_S = 2.0
_FENCED_CODES = {
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


#: Errors the Kafka protocol calls retriable (the Java client's RetriableException family,
#: plus librdkafka's local transport errors): leader elections and epochs after a broker stall
#: or restart, coordinators moving, timeouts. librdkafka does not flag the errors an admin
#: future or a transactional call returns as retriable, so the codes decide.
RETRIABLE_CODES = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.CONCURRENT_TRANSACTIONS,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._WAIT_COORD,
    }
)
#: How long one operation keeps retrying retriable errors before it fails.
RETRY_SECONDS = 30.0

_NO_LEADERS = frozenset({KafkaError._NOENT})
#: A broker's refusal of the client's credentials or TLS: librdkafka reports it only to the
#: error callback and retries for ever, while its calls fail with "broker transport failure".
REFUSALS = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})
#: While the bootstrap servers do not answer, `connect` looks this often for a refusal.
REFUSAL_LOOK_S = 0.5

T = TypeVar("T")


def _error(exc: KafkaException) -> KafkaError | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


def retriable(err: KafkaError | None) -> bool:
    """True for an error worth retrying the same call for (never a fatal or fencing one)."""
    if err is None or err.fatal() or err.code() in _FENCED_CODES:
        return False
    return err.retriable() or err.code() in RETRIABLE_CODES


def retrying(
    what: str,
    call: Callable[[], T],
    timeout: float = RETRY_SECONDS,
    also: frozenset[int] = frozenset(),
    before_retry: Callable[[KafkaError], None] | None = None,
) -> T:
    """`call()`, again after retriable Kafka errors (backing off from 50 ms to 1 s) until
    `timeout` seconds have passed; then, or on any other Kafka error, TransportError saying
    `what` failed and why. `also`: more codes that are retriable for this call;
    `before_retry(err)` is called before each retry (it may raise instead)."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = _error(exc)
            again = retriable(err) or (err is not None and not err.fatal() and err.code() in also)
            if not again or time.monotonic() + pause > deadline:
                raise TransportError(f"{what}: {exc}") from exc
            if before_retry is not None and err is not None:
                before_retry(err)
            log.info("%s: %s; retrying in %.2f s", what, exc, pause)
            time.sleep(pause)
            pause = min(1.0, pause * 2)


def connect(
    client: Producer | Consumer | AdminClient,
    topic: str,
    timeout: float,
    refused: list[str] | None = None,
) -> None:
    """Return once a new client is connected to a broker it learned from the bootstrap servers
    (holding `topic`'s metadata), or `timeout` seconds have passed. librdkafka drops the
    bootstrap connection as soon as the first metadata answer names the brokers, and a request
    made before a learned broker is connected waits for a timer instead: a transactional
    producer's InitProducerId 0.5 s, an admin request's partition leader lookup 1 or 3 s (1 in
    10 to 20 new clients on the local broker, perf/ANALYSIS.md). An answer from a learned
    broker carries its id (the bootstrap connection's is -1). KafkaException when the broker
    does not answer.

    `refused`, for an admin client whose error callback puts the broker's last refusal
    (`REFUSALS`) there: TransportError naming it as soon as one comes (looked for every
    REFUSAL_LOOK_S while the broker does not answer), not a transport failure after `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.05, deadline - time.monotonic())
        try:
            meta = client.list_topics(
                topic, timeout=left if refused is None else min(left, REFUSAL_LOOK_S)
            )
        except KafkaException:
            if refused is None:
                raise
            client.poll(0)  # serves the error callback (only an admin client's poll is free)
            if refused:
                raise TransportError(f"the broker refused this client: {refused[-1]}") from None
            if time.monotonic() >= deadline:
                raise
            continue
        if meta.orig_broker_id >= 0 or time.monotonic() >= deadline:
            return


def check_client_config(config: Mapping[str, object]) -> None:
    """ValueError, one line, when librdkafka refuses a setting of `config` (no such
    property, a bad value): bad input, which no retry mends. A client of `config` alone,
    with no bootstrap servers, so nothing connects."""
    try:
        AdminClient({**config, "bootstrap.servers": "", "logger": log, "log_level": 3})
    except KafkaException as exc:
        err = _error(exc)
        raise ValueError(err.str() if err is not None else str(exc)) from None


def list_offsets(
    admin: AdminClient,
    tps: list[TopicPartition],
    spec: str,
    isolation: IsolationLevel = IsolationLevel.READ_COMMITTED,
    before_retry: Callable[[KafkaError], None] | None = None,
) -> dict[tuple[str, int], int]:
    """`spec` ("earliest" or "latest") offsets of `tps` in one ListOffsets request per
    broker, on the admin client's own connection (a consumer's would queue the request behind
    its fetch long-poll). Retries retriable errors (no leader yet, a leader epoch the broker
    does not know after a stall, ...), calling `before_retry` (`retrying`) first."""

    def call() -> dict[tuple[str, int], int]:
        futures = admin.list_offsets(
            {tp: getattr(OffsetSpec, spec)() for tp in tps},
            isolation_level=isolation,
            request_timeout=15,
        )
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    names = sorted({tp.topic for tp in tps})
    # _NOENT here: "no leaders" for the partitions, as right after a broker restart
    return retrying(
        f"cannot read offsets of {', '.join(names)}", call, also=_NO_LEADERS,
        before_retry=before_retry,
    )  # fmt: skip


class KafkaWriter(base.LogWriter):
    def __init__(self, transport: KafkaTransport, writer_id: str, partitions: int) -> None:
        self._t = transport
        self.partitions = partitions
        conf = transport.client_config(
            {
                "transactional.id": writer_id,
                "enable.idempotence": True,
                "compression.type": "zstd",
                "message.max.bytes": MAX_MESSAGE_BYTES,
                "linger.ms": 5,
                "transaction.timeout.ms": 120_000,
            }
        )
        self._producer = Producer(conf)
        with contextlib.suppress(KafkaException):  # init_transactions says why, and retries
            connect(self._producer, transport.topic("deltas"), 10)
        self._call(self._producer.init_transactions, 60)
        self._written: set[tuple[str, int]] = set()  # partitions of the open transaction

    def _call(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        """A transactional call; retried on retriable errors, as librdkafka asks (for
        `commit_transaction` too: a retried commit completes the same transaction)."""
        try:
            retrying(f"Kafka {fn.__name__} failed", lambda: fn(*args))
        except TransportError as exc:
            err = _error(exc.__cause__) if isinstance(exc.__cause__, KafkaException) else None
            if err is not None and (err.code() in _FENCED_CODES or err.fatal()):
                raise FencedError(
                    f"this publisher was fenced by another with the same transactional.id: {err}"
                ) from exc.__cause__
            raise

    def begin(self) -> None:
        self._written.clear()
        self._call(self._producer.begin_transaction)

    def append(self, topic: Topic, partition: int, key: bytes | None, value: bytes | None) -> int:
        name = self._t.topic(topic)
        while True:
            try:
                self._producer.produce(name, value=value, key=key, partition=partition)
                break
            except BufferError:  # local queue full: let librdkafka send, then retry
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise TransportError(f"Kafka produce failed: {exc}") from exc
        self._producer.poll(0)
        self._written.add((name, partition))
        return len(key or b"") + len(value or b"")

    def commit(self) -> None:
        try:
            self._call(self._producer.commit_transaction, 120)
        except TransportError:
            with contextlib.suppress(KafkaException):
                self._producer.abort_transaction(30)
            raise
        self._wait_visible()

    def _wait_visible(self, timeout: float = 30.0) -> None:
        """Return once read_committed readers see the committed transaction. The broker
        writes the commit markers after `commit_transaction` returns; until they land, a
        reader that starts now (a sidecar, the next one-shot publish) would stop short of
        this transaction and call itself caught up."""
        if not self._written:
            return
        admin = self._t._admin()
        tps = [TopicPartition(t, p) for t, p in sorted(self._written)]
        ends = list_offsets(admin, tps, "latest", IsolationLevel.READ_UNCOMMITTED)
        deadline = time.monotonic() + timeout
        while True:
            stable = list_offsets(admin, tps, "latest")
            if all(stable[k] >= end for k, end in ends.items()):
                self._written.clear()
                return
            if time.monotonic() > deadline:
                raise TransportError(
                    f"the committed transaction is not visible to readers after {timeout:.0f} s"
                )
            time.sleep(0.005)

    def abort(self) -> None:
        try:
            self._producer.abort_transaction(30)
        except KafkaException as exc:
            log.warning("abort_transaction failed: %s", exc)

    def close(self) -> None:
        try:
            self._producer.flush(10)
        except KafkaException as exc:  # a fenced producer raises _FENCED here too
            log.debug("producer flush on close: %s", exc)


class KafkaReader(base.LogReader):
    def __init__(self, transport: KafkaTransport) -> None:
        self._t = transport
        # Short: a replica retries, and says why meanwhile (a broker that is down).
        self.partitions = transport.partition_count(timeout=CONNECT_TIMEOUT)
        #: the topics' ids as this reader opened them: its offsets are of those topics
        self._identity = transport.identity()
        #: the describe in flight (`_look_at_identity`), and when the next one is due
        self._described: dict[str, Future] | None = None
        self._describe_at = time.monotonic() + transport.identity_check_s
        self._consumer = Consumer(
            transport.client_config(
                {
                    "group.id": f"seg-reader-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                    "auto.offset.reset": "earliest",
                    "fetch.wait.max.ms": 50,
                    "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
                }
            )
        )
        self._next: dict[tuple[Topic, int], int] = {}
        self._assigned: list[TopicPartition] = []
        self._watch_until = 0.0  # until then poll() looks for skipped markers every few ms
        #: assigned partitions the consumer has not fetched for yet: until it has, its
        #: position() may still be the previous assignment's (seen after a re-assign back)
        self._unfetched: set[tuple[Topic, int]] = set()
        self._kinds = {transport.topic(t): t for t in TOPICS}
        # Warm the consumer's metadata for both topics: a topic first met in assign() waits
        # for librdkafka's next metadata refresh (~1 s) before its first fetch.
        for kind in TOPICS:
            with contextlib.suppress(KafkaException):
                connect(self._consumer, transport.topic(kind), 10)

    def identity(self) -> str:
        return self._identity

    def _new_identity(self, what: str) -> NewLogIdentity:
        return NewLogIdentity(
            f"{what} (deleted and created again?): this reader's offsets may mean other "
            "records now; reading the log again"
        )

    def _judge(self, described: dict[str, Future]) -> None:
        """NewLogIdentity when the answered describe `described` names other topic ids than
        the ones this reader opened, or no topics; a describe that failed otherwise (a broker
        down) says nothing."""
        try:
            seen = self._t.identity_of(described)
        except KafkaException as exc:
            err = _error(exc)
            if err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise self._new_identity(f"Kafka topics {self._t.prefix}.* are gone") from exc
            log.debug("describing the topics: %s", exc)
            return
        if seen != self._identity:
            raise self._new_identity(f"Kafka topics {self._t.prefix}.* have new ids")

    def _look_at_identity(self) -> None:
        """`_judge` the topics' ids every `identity_check_s`: the describe is sent here and its
        answer read by a later poll once it is in, so no poll waits for it."""
        if self._described is not None and all(f.done() for f in self._described.values()):
            described, self._described = self._described, None
            self._judge(described)
        if self._described is None and time.monotonic() >= self._describe_at:
            self._describe_at = time.monotonic() + self._t.identity_check_s
            try:
                self._described = self._t.describe_topics()
            except (KafkaException, TransportError) as exc:
                log.debug("describing the topics: %s", exc)

    def _went_back(self, key: tuple[Topic, int], offset: int) -> None:
        """NewLogIdentity when the consumer stands before the position it reached: it reset
        to the start (auto.offset.reset, with the broker's offset out of range) because the
        partition is shorter than that now, as a new topic of the same name is. Only a new
        incarnation takes offsets back (retention moves the start forward)."""
        if offset < self._next.get(key, 0):
            raise self._new_identity(
                f"Kafka topic {self._t.topic(key[0])} [{key[1]}] went back to offset {offset} "
                f"from {self._next[key]}"
            )

    def watermarks(self, topic: Topic, partition: int) -> tuple[int, int]:
        return self.watermarks_all(topic)[partition]

    def watermarks_all(self, topic: Topic) -> dict[int, tuple[int, int]]:
        admin = self._t._admin()
        name = self._t.topic(topic)
        tps = [TopicPartition(name, p) for p in range(self.partitions)]

        def unknown_topic(err: KafkaError) -> None:
            # deleted topics answer so until the retries end (30 s): look at once instead
            if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self._identity_now()

        try:
            low = list_offsets(admin, tps, "earliest", before_retry=unknown_topic)
            end = list_offsets(admin, tps, "latest", before_retry=unknown_topic)
        except TransportError:
            self._identity_now()  # topics deleted: that, rather than "cannot read offsets"
            raise
        for p in range(self.partitions):  # a partition now shorter than where this reader is
            if (topic, p) not in self._unfetched:
                self._went_back((topic, p), end[(name, p)])
        return {p: (low[(name, p)], end[(name, p)]) for p in range(self.partitions)}

    def _identity_now(self) -> None:
        """`_judge` the topics' ids now (a short describe, not retried)."""
        try:
            described = self._t.describe_topics(request_timeout=5)
            for f in described.values():
                f.exception(timeout=10)
        except (KafkaException, TransportError, TimeoutError) as exc:
            log.debug("describing the topics: %s", exc)
            return
        self._judge(described)

    def assign(self, assignments: dict[tuple[Topic, int], int]) -> None:
        self._next = dict(assignments)
        self._unfetched = set(assignments)
        self._assigned = [TopicPartition(self._t.topic(t), p) for t, p in assignments]
        self._consumer.assign(
            [TopicPartition(self._t.topic(t), p, off) for (t, p), off in assignments.items()]
        )
        self._watch_until = time.monotonic() + MARKER_WATCH_S

    def position(self, topic: Topic, partition: int) -> int:
        return self._next.get((topic, partition), 0)

    def _skipped(self) -> bool:
        """Move positions past what the consumer skipped without delivering (transaction
        markers, aborted records); True when one moved. librdkafka moves its own position as
        soon as the fetch that held them is in, but reports the partition EOF only with its
        next fetch answer, which the broker holds for fetch.wait.max.ms (50 ms) when nothing
        new is there: a publisher's read up to a transaction's end waited for it."""
        moved = False
        for tp in self._consumer.position(self._assigned):
            key = (self._kinds[tp.topic], tp.partition)
            if key in self._unfetched or tp.offset < 0:  # negative: not known (yet)
                continue
            self._went_back(key, tp.offset)
            if tp.offset > self._next.get(key, 0):
                self._next[key] = tp.offset
                moved = True
        return moved

    def poll(self, timeout: float) -> list[LogRecord]:
        deadline = time.monotonic() + timeout
        out: list[LogRecord] = []
        self._look_at_identity()
        while True:
            # consume() with a timeout holds even one ready message until the timeout ends:
            # drain what is queued, else wait for the first message with poll().
            msgs = self._consumer.consume(num_messages=1000, timeout=0)
            if not msgs:
                if self._skipped():
                    return out
                wait = max(0.0, deadline - time.monotonic())
                if time.monotonic() < self._watch_until:  # markers may follow: look again soon
                    wait = min(wait, MARKER_POLL_S)
                first = self._consumer.poll(wait)
                if first is not None:
                    msgs = [first, *self._consumer.consume(num_messages=999, timeout=0)]
            moved = False
            for msg in msgs:
                err = msg.error()
                tp = (self._kinds[msg.topic()], msg.partition())
                self._unfetched.discard(tp)
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self._went_back(tp, msg.offset())
                        # read_committed: EOF sits at the last stable offset, past markers.
                        # A caller waiting for a position (read_until) must hear of it now.
                        moved = moved or msg.offset() > self._next.get(tp, 0)
                        self._next[tp] = max(self._next.get(tp, 0), msg.offset())
                        continue
                    if err.fatal():
                        raise TransportError(f"Kafka consumer failed: {err}")
                    log.warning("Kafka consumer: %s", err)
                    continue
                offset = msg.offset()
                self._went_back(tp, offset)
                self._next[tp] = offset + 1
                out.append(LogRecord(tp[0], tp[1], offset, msg.key(), msg.value()))
            if out:
                self._watch_until = time.monotonic() + MARKER_WATCH_S
            if out or moved or time.monotonic() >= deadline:
                return out

    def close(self) -> None:
        self._consumer.close()


class KafkaTransport(base.Transport):
    def __init__(
        self,
        bootstrap: str,
        prefix: str = "segments",
        config: dict[str, str] | None = None,
        replication_factor: int = 1,
        identity_check_s: float = IDENTITY_CHECK_S,
    ) -> None:
        if not 0 < identity_check_s < math.inf:
            raise ValueError(f"identity_check_s must be a positive number, not {identity_check_s}")
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.config = dict(config or {})
        self.replication_factor = replication_factor
        self.identity_check_s = identity_check_s
        self._admin_lock = threading.Lock()
        self._admin_client: tuple[int, AdminClient] | None = None  # (pid, client)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        del state["_admin_lock"], state["_admin_client"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._admin_lock = threading.Lock()
        self._admin_client = None

    def topic(self, kind: Topic) -> str:
        return f"{self.prefix}.{kind}"

    def client_config(self, conf: dict[str, object]) -> dict[str, object]:
        """A librdkafka client's configuration: `conf` over the common settings, the
        transport's own `config` over both."""
        common = {"bootstrap.servers": self.bootstrap, "logger": log, **CLIENT_DEFAULTS}
        return {**common, **conf, **self.config}

    def _admin(self, timeout: float = 10.0) -> AdminClient:
        """The transport's admin client (metadata, offsets, topics), shared by its readers and
        writers: a new one would first have to connect (`connect`). Made again in a forked
        child; not kept when the broker did not answer."""
        with self._admin_lock:
            if self._admin_client is not None and self._admin_client[0] == os.getpid():
                client = self._admin_client[1]
                client.poll(0)  # the error callback's events queue up until served
                return client
            refused: list[str] = []  # the last refusal

            def on_error(err: KafkaError) -> None:
                if err.code() in REFUSALS:
                    refused[:] = [err.str()]

            client = AdminClient(self.client_config({"error_cb": on_error}))
            connect(client, self.topic("deltas"), timeout, refused)
            self._admin_client = (os.getpid(), client)
            return client

    def partition_count(self, timeout: float = 15.0) -> int:
        """Partitions of the topics; TransportError when they do not exist (yet), or when the
        broker does not answer within `timeout` seconds."""
        try:
            meta = self._admin(timeout).list_topics(timeout=timeout)
        except KafkaException as exc:
            raise TransportError(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        counts = []
        for kind in TOPICS:
            t = meta.topics.get(self.topic(kind))
            if t is None or t.error is not None:
                raise TransportError(f"topic {self.topic(kind)} does not exist on {self.bootstrap}")
            counts.append(len(t.partitions))
        if counts[0] != counts[1]:
            raise TransportError(f"topics {self.prefix}.* have different partition counts {counts}")
        return counts[0]

    def ensure_topics(self, partitions: int) -> int:
        """Create the two topics when absent; returns the partition count in use."""
        try:
            return self.partition_count()
        except TransportError:
            pass
        common = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
        configs = {
            "deltas": {
                **common,
                "cleanup.policy": "delete",
                "retention.ms": str(DELTA_RETENTION_MS),
            },
            "snapshots": {**common, "cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
        }
        new = [
            NewTopic(self.topic(k), partitions, self.replication_factor, config=configs[k])
            for k in TOPICS
        ]
        admin = self._admin()
        for name, fut in admin.create_topics(new, request_timeout=30).items():
            try:
                fut.result()
            except KafkaException as exc:
                err = _error(exc)
                if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise TransportError(f"cannot create topic {name}: {exc}") from exc
        deadline = time.monotonic() + 30
        while True:  # until the topics are visible and every partition has a leader
            try:
                count = self.partition_count()
                meta = admin.list_topics(timeout=15)
                if all(
                    p.leader >= 0
                    for k in TOPICS
                    for p in meta.topics[self.topic(k)].partitions.values()
                ):
                    return count
            except (TransportError, KafkaException, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TransportError(f"topics {self.prefix}.* have no leaders after 30 s")
            time.sleep(0.2)

    def reader(self) -> KafkaReader:
        return KafkaReader(self)

    def writer(self, writer_id: str, partitions: int | None = None) -> KafkaWriter:
        count = self.ensure_topics(partitions or DEFAULT_PARTITIONS)
        return KafkaWriter(self, writer_id, count)

    def describe(self) -> str:
        return f"Kafka {self.bootstrap} topics {self.prefix}.deltas/.snapshots"

    def identity(self) -> str:
        """The topics' ids: topics deleted and created again get new ones."""
        names = [self.topic(k) for k in TOPICS]
        return retrying(
            f"cannot describe topics {names}", lambda: self.identity_of(self.describe_topics())
        )

    def describe_topics(self, request_timeout: float = 15) -> dict[str, Future]:
        """A describe of the two topics, sent: `identity_of` reads its answer."""
        names = [self.topic(k) for k in TOPICS]
        return self._admin().describe_topics(
            TopicCollection(names), request_timeout=request_timeout
        )

    def identity_of(self, described: dict[str, Future]) -> str:
        """`identity()` from the answer to `describe_topics()` (waiting for it); KafkaException
        when it failed (UNKNOWN_TOPIC_OR_PART: the topics are gone)."""
        ids = [str(described[self.topic(k)].result().topic_id) for k in TOPICS]
        return f"{self.describe()} ids {','.join(ids)}"
