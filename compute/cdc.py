"""`seg-compute cdc`: MongoDB change streams into Kafka, in the MongoDB Kafka source
connector's message shape, exactly once for `read_committed` readers.

Topics: every change of collection C of database D goes to `<prefix>.D.C` (default prefix
`cdc`), as the connector names them. A record's key is `{"_id": <the change event's _id>}`
and its value the whole change event, both as relaxed extended JSON text (pymongo's
`json_util`, RELAXED mode); updates carry the document as it is now (`fullDocument:
updateLookup`). With more than one partition a change goes to `murmur2(documentKey) %
partitions`, so one document's changes stay in order (the default is one partition).

Start: the first run opens the change stream and takes its resume point, then copies every
existing document (`copy_existing`: insert-shaped events whose `_id` is `{_id, copyingData:
true}`) and then streams from that resume point; a change made during the copy can appear
twice (once in the copy, once streamed), as with the connector.

Exactly once: every Kafka transaction holds a batch of events and, in the compacted state
topic `<prefix>.offsets` (key: the database name), the position after them: the resume token,
or during the copy the last `_id` copied. A restart fences the previous producer (same
transactional.id: any open transaction is aborted), reads the state back with
`read_committed` and continues from it, so a kill -9 at any moment neither loses nor repeats
a change for read_committed readers.

Ends with an error: a watched collection dropped or renamed, or the database dropped
(`invalidate`), is written to the topic, committed, reported and exits 1; a resume token
MongoDB no longer has (ChangeStreamHistoryLost: the oplog rolled over while the job was down)
exits 1 naming `--fresh-copy`, which copies the collections again and streams from now.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bson import json_util
from bson.codec_options import CodecOptions
from bson.json_util import RELAXED_JSON_OPTIONS

from compute.kafkaconf import kafka_config

STATE_FORMAT = 1
DEFAULT_PREFIX = "cdc"
DEFAULT_WRITER_ID = "seg-compute-cdc"
#: Server errors after which a change stream cannot go on from its token.
HISTORY_LOST_CODES = {136, 280, 286}  # CappedPositionLost, ChangeStreamFatalError, ...Lost
_CODEC = CodecOptions(tz_aware=True)


class CdcError(RuntimeError):
    """The job cannot go on (the message says why and what to do)."""


class InvalidatedError(CdcError):
    """A watched collection or its database went away (invalidate)."""


class HistoryLostError(CdcError):
    """MongoDB no longer has the changes after the committed resume token."""


@dataclass(frozen=True)
class CdcOptions:
    mongo: str
    db: str
    collections: tuple[str, ...]
    kafka: str
    topic_prefix: str = DEFAULT_PREFIX
    partitions: int = 1
    writer_id: str = DEFAULT_WRITER_ID
    fresh_copy: bool = False
    batch_size: int = 500
    linger_seconds: float = 0.1
    progress_seconds: float = 5.0
    #: how often an idle stream commits its newer resume token (keeps it inside the oplog)
    idle_commit_seconds: float = 30.0
    kafka_config: Mapping[str, str] = field(default_factory=dict)

    def topic(self, collection: str) -> str:
        return f"{self.topic_prefix}.{self.db}.{collection}"

    @property
    def state_topic(self) -> str:
        return f"{self.topic_prefix}.offsets"


def dumps(doc: Mapping[str, Any]) -> str:
    """Relaxed extended JSON, as the record key and value carry it."""
    return json_util.dumps(doc, json_options=RELAXED_JSON_OPTIONS)


def loads(text: str | bytes) -> Any:
    return json_util.loads(text, json_options=RELAXED_JSON_OPTIONS)


def copy_event(db: str, collection: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The insert-shaped event the connector's copy_existing makes of an existing document."""
    return {
        "_id": {"_id": doc["_id"], "copyingData": True},
        "operationType": "insert",
        "ns": {"db": db, "coll": collection},
        "documentKey": {"_id": doc["_id"]},
        "fullDocument": dict(doc),
    }


def record(event: Mapping[str, Any], partitions: int) -> tuple[bytes, bytes, int]:
    """(key, value, partition) of a change event's Kafka record."""
    from sidecar.partitioner import partition_for

    key = dumps({"_id": event["_id"]})
    partition = 0
    if partitions > 1 and "documentKey" in event:
        partition = partition_for(dumps(event["documentKey"]), partitions)
    return key.encode(), dumps(event).encode(), partition


# -- the committed state -----------------------------------------------------------------------


@dataclass
class State:
    collections: tuple[str, ...]
    resume_token: dict[str, Any]  # the stream starts after it (taken before the copy)
    phase: str = "copy"  # copy, then stream
    copy_collection: str | None = None  # copy: the collection being copied
    copy_last_id: Any = None  # ... and the last _id of it already written
    events: int = 0  # events written so far (all runs)

    def encode(self, db: str) -> bytes:
        doc = {
            "format": STATE_FORMAT, "db": db, "collections": list(self.collections),
            "phase": self.phase, "resume_token": self.resume_token,
            "copy": None if self.phase != "copy" else {
                "collection": self.copy_collection, "last_id": self.copy_last_id},
            "events": self.events, "updated_at": int(time.time() * 1000),
        }  # fmt: skip
        return dumps(doc).encode()

    @classmethod
    def decode(cls, value: bytes) -> State:
        doc = loads(value)
        if doc.get("format") != STATE_FORMAT:
            raise CdcError(f"unknown cdc state format {doc.get('format')!r}")
        copy = doc.get("copy") or {}
        return cls(
            tuple(doc["collections"]), doc["resume_token"], doc["phase"],
            copy.get("collection"), copy.get("last_id"), int(doc.get("events", 0)),
        )  # fmt: skip


def read_state(bootstrap: str, topic: str, db: str, config: Mapping[str, str]) -> State | None:
    """The newest committed state of `db` (read_committed, to the end of the topic)."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from sidecar.transport.kafka import list_offsets

    admin = AdminClient(kafka_config(bootstrap, **config))
    meta = admin.list_topics(topic, timeout=15).topics.get(topic)
    parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)] if meta else []
    if not parts:
        return None
    ends = list_offsets(admin, parts, "latest")
    consumer = Consumer(kafka_config(bootstrap, **{
        "group.id": "seg-cdc-state-reader", "enable.auto.commit": False,
        "isolation.level": "read_committed", **config,
    }))  # fmt: skip
    latest: bytes | None = None
    try:
        consumer.assign([TopicPartition(topic, p.partition, 0) for p in parts])
        left = {(topic, p.partition) for p in parts if ends[(topic, p.partition)] > 0}
        deadline = time.monotonic() + 60
        while left:
            if time.monotonic() > deadline:
                raise CdcError(f"could not read {topic} to its end in 60 s")
            msg = consumer.poll(0.5)
            if msg is None:
                for tp in consumer.position([TopicPartition(topic, p) for _, p in left]):
                    if tp.offset >= ends[(topic, tp.partition)]:
                        left.discard((topic, tp.partition))
                continue
            if msg.error():
                raise CdcError(f"reading {topic}: {msg.error()}")
            if msg.key() == db.encode():
                latest = msg.value()
            if msg.offset() + 1 >= ends[(topic, msg.partition())]:
                left.discard((topic, msg.partition()))
    finally:
        consumer.close()
    return None if latest is None else State.decode(latest)


# -- the job -----------------------------------------------------------------------------------


@dataclass
class Progress:
    started: float = field(default_factory=time.monotonic)
    copied: int = 0
    streamed: int = 0
    last_change: float | None = None  # wall clock of the last streamed change (clusterTime)
    caught_up: bool = False

    def line(self, phase: str) -> str:
        took = max(time.monotonic() - self.started, 1e-9)
        total = self.copied + self.streamed
        if phase == "copy":
            lag = "copying"
        elif self.caught_up or self.last_change is None:
            lag = "lag 0 s (caught up)"
        else:
            lag = f"lag {max(time.time() - self.last_change, 0):.1f} s"
        return (f"cdc: {phase}: {self.copied:,} copied, {self.streamed:,} changes, "
                f"{total / took:,.0f}/s, {lag}")  # fmt: skip


class CdcJob:
    def __init__(self, opts: CdcOptions, report: Callable[[str], None] | None = None) -> None:
        if not opts.collections:
            raise CdcError("no collections to watch")
        self.opts = opts
        self.report = report or _stderr
        self.progress = Progress()
        self._stop = False
        self._last_report = time.monotonic()

    def stop(self) -> None:
        self._stop = True

    def run(self) -> int:
        import pymongo
        from confluent_kafka import Producer

        from compute.events import ensure_topic

        o = self.opts
        # MongoDB first: a URI that does not parse or a server that does not answer is a
        # one-line error with nothing created in Kafka
        self.client = pymongo.MongoClient(o.mongo, serverSelectionTimeoutMS=30_000)
        try:
            self.client.admin.command("ping")
            for coll in o.collections:
                ensure_topic(o.kafka, o.topic(coll), o.partitions, client=o.kafka_config)
            compact = {"cleanup.policy": "compact"}
            ensure_topic(o.kafka, o.state_topic, 1, compact, client=o.kafka_config)
            partitions = {c: self._partitions(o.topic(c)) for c in o.collections}
            self.producer = Producer(kafka_config(o.kafka, **{
                "transactional.id": o.writer_id, "enable.idempotence": True, "linger.ms": 5,
                "compression.type": "zstd", "transaction.timeout.ms": 60_000, **o.kafka_config,
            }))  # fmt: skip
            self.producer.init_transactions(60)  # fences an earlier run, aborting its open txn
            self.partitions = partitions
            state = None
            if not o.fresh_copy:
                state = read_state(o.kafka, o.state_topic, o.db, o.kafka_config)
            db = self.client.get_database(o.db, codec_options=_CODEC)
            if state is not None and set(state.collections) != set(o.collections):
                raise CdcError(
                    f"the committed state of {o.db} in {o.state_topic} covers collections "
                    f"{','.join(state.collections)}, not {','.join(o.collections)}: give "
                    "--fresh-copy to copy them all again and stream from now"
                )
            if state is None:
                state = self._begin(db)
            else:
                self.report(f"cdc: resuming {o.db} ({state.phase}, {state.events:,} events "
                            f"written before)")  # fmt: skip
            if state.phase == "copy":
                self._copy(db, state)
            return self._stream(db, state)
        finally:
            self.client.close()
            with contextlib.suppress(Exception):
                self.producer.flush(10)

    def _partitions(self, topic: str) -> int:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(kafka_config(self.opts.kafka, **self.opts.kafka_config))
        return len(admin.list_topics(topic, timeout=15).topics[topic].partitions)

    def _watch(self, db: Any, token: Mapping[str, Any] | None) -> Any:
        pipeline = [{"$match": {"ns.coll": {"$in": list(self.opts.collections)}}}]
        try:
            return db.watch(pipeline, full_document="updateLookup", resume_after=token)
        except Exception as e:
            raise self._translate(e, token) from None

    def _begin(self, db: Any) -> State:
        """A fresh start: the resume point first, then the copy."""
        with self._watch(db, None) as stream:
            token = stream.resume_token
        if token is None:
            raise CdcError("MongoDB returned no resume token for a new change stream (needs "
                           "MongoDB 4.0.7 or later)")  # fmt: skip
        self.report(f"cdc: fresh start of {self.opts.db}: resume point taken, copying "
                    f"{','.join(self.opts.collections)}")  # fmt: skip
        return State(self.opts.collections, dict(token), "copy", self.opts.collections[0])

    # -- transactions --------------------------------------------------------------------------

    def _commit(self, events: list[tuple[str, dict[str, Any]]], state: State) -> None:
        from confluent_kafka import KafkaException

        p = self.producer
        try:
            p.begin_transaction()
            for coll, ev in events:
                key, value, partition = record(ev, self.partitions[coll])
                self._produce(self.opts.topic(coll), key, value, partition)
            state.events += len(events)
            self._produce(self.opts.state_topic, self.opts.db.encode(), state.encode(self.opts.db),
                          0)  # fmt: skip
            p.commit_transaction(60)
        except KafkaException as e:
            with contextlib.suppress(KafkaException):
                p.abort_transaction(30)
            state.events -= len(events)
            raise CdcError(f"Kafka transaction failed: {e}") from None

    def _produce(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, partition=partition)
                return
            except BufferError:
                self.producer.poll(0.05)

    # -- copy ----------------------------------------------------------------------------------

    def _copy(self, db: Any, state: State) -> None:
        o = self.opts
        colls = list(o.collections)
        start = colls.index(state.copy_collection) if state.copy_collection in colls else 0
        for i in range(start, len(colls)):
            coll = colls[i]
            last = state.copy_last_id if coll == state.copy_collection else None
            query = {} if last is None else {"_id": {"$gt": last}}
            batch: list[tuple[str, dict[str, Any]]] = []
            for doc in db[coll].find(query, sort=[("_id", 1)], batch_size=o.batch_size):
                if self._stop:
                    return
                batch.append((coll, copy_event(o.db, coll, doc)))
                if len(batch) >= o.batch_size:
                    state.copy_collection, state.copy_last_id = coll, doc["_id"]
                    self._commit(batch, state)
                    self.progress.copied += len(batch)
                    batch = []
                    self._maybe_report("copy")
            following = colls[i + 1] if i + 1 < len(colls) else None
            if batch:
                state.copy_last_id = batch[-1][1]["_id"]["_id"]
            if following is None:
                state.phase, state.copy_collection, state.copy_last_id = "stream", None, None
            else:
                state.copy_collection, state.copy_last_id = following, None
            self._commit(batch, state)
            self.progress.copied += len(batch)
        self.report(self.progress.line("copy") + "; copy done, streaming")

    # -- stream --------------------------------------------------------------------------------

    def _stream(self, db: Any, state: State) -> int:
        o = self.opts
        if self._stop:
            return 0
        pending: list[tuple[str, dict[str, Any]]] = []
        first_at = 0.0
        last_commit = time.monotonic()
        ended: InvalidatedError | None = None
        with self._watch(db, state.resume_token) as stream:
            while not self._stop:
                try:
                    ev = stream.try_next()
                except Exception as e:
                    raise self._translate(e, state.resume_token) from None
                if ev is not None:
                    if not pending:
                        first_at = time.monotonic()
                    kind = ev["operationType"]
                    coll = ev.get("ns", {}).get("coll")
                    if coll in o.collections:
                        pending.append((coll, ev))
                    self.progress.last_change = ev["clusterTime"].time
                    self.progress.caught_up = False
                    if kind in ("drop", "rename", "dropDatabase", "invalidate"):
                        ended = InvalidatedError(_ended(o.db, ev))
                else:
                    self.progress.caught_up = True
                token = stream.resume_token
                full = len(pending) >= o.batch_size
                due = pending and (ev is None or time.monotonic() - first_at >= o.linger_seconds)
                idle = (not pending and token is not None and dict(token) != state.resume_token
                        and time.monotonic() - last_commit >= o.idle_commit_seconds)  # fmt: skip
                if full or due or idle or ended:
                    state.resume_token = dict(token) if token is not None else state.resume_token
                    self._commit(pending, state)
                    self.progress.streamed += len(pending)
                    pending = []
                    last_commit = time.monotonic()
                if ended is not None:
                    raise ended
                self._maybe_report("stream")
        return 0

    def _maybe_report(self, phase: str) -> None:
        now = time.monotonic()
        if now - self._last_report >= self.opts.progress_seconds:
            self._last_report = now
            self.report(self.progress.line(phase))

    def _translate(self, error: Exception, token: Mapping[str, Any] | None) -> Exception:
        from pymongo.errors import OperationFailure

        if isinstance(error, OperationFailure) and error.code in HISTORY_LOST_CODES:
            return HistoryLostError(
                f"MongoDB no longer has the changes after the committed resume token "
                f"{dumps(token) if token else '(none)'} ({error.details.get('codeName', '')}: "
                "the oplog rolled over while this job was behind or stopped); changes in that "
                "gap cannot be streamed. Run again with --fresh-copy to copy the collections "
                "anew and stream from now"
            )
        return error


def _ended(db: str, ev: Mapping[str, Any]) -> str:
    kind = ev["operationType"]
    ns = ev.get("ns", {})
    where = f"{ns.get('db', db)}.{ns['coll']}" if ns.get("coll") else ns.get("db", db)
    what = {"drop": "was dropped", "rename": "was renamed", "dropDatabase": "was dropped",
            "invalidate": "is gone"}[kind]  # fmt: skip
    if kind == "rename" and "to" in ev:
        what = f"was renamed to {ev['to']['db']}.{ev['to']['coll']}"
    return (
        f"{where} {what} (the change stream is invalidated); every change up to it is in "
        "Kafka. Stopped: restart to go on with the remaining collections, or with "
        "--fresh-copy once the collection is back"
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(opts: CdcOptions, report: Callable[[str], None] | None = None) -> int:
    """Run until stopped (SIGTERM / SIGINT: the pending batch is committed first)."""
    job = CdcJob(opts, report)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def stop(_signum: int, _frame: object) -> None:
        job.stop()

    for s in previous:
        signal.signal(s, stop)
    try:
        return job.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def parse_value(value: bytes) -> dict[str, Any]:
    """A record value back as a change event (bson types restored)."""
    return loads(value)
