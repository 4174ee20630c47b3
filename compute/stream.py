"""`seg-compute stream`: streaming segments with Spark Structured Streaming.

The query reads JSON events (compute/events.py) from Kafka with Spark's Kafka source and runs
`StreamJob.process` on every micro-batch (`foreachBatch`):

1. parse and validate the batch's events (bad ones are counted and dropped);
2. advance the clock: the largest valid event ts seen so far (event time; never goes back);
3. merge the events into the per-user state of the previous batch (compute/rules.py: per
   track, each user's newest K timestamps, pruned to the track's horizon behind the clock; held
   in the driver, compute/streamstate.py) and save it as Parquet in
   CHECKPOINT/state/batch-<id> (written aside, then one rename);
4. compute every streaming segment's full membership as of the clock from that state;
5. publish the segments whose membership changed through the Publisher API, which diffs
   against the log: publishing a membership the log already holds writes nothing.

Exactly once, end to end: Spark writes a batch's Kafka offset range to CHECKPOINT/spark/offsets
before running it and marks it done in CHECKPOINT/spark/commits after `process` returns; after a
crash it re-runs the last unfinished batch with the same offsets. `process(batch N)` reads only
the state of the newest batch before N (state written by an earlier, unfinished run of N or
later is deleted first) and is a deterministic function of it and the batch's events (event
time, not the wall clock), so a re-run computes the same memberships, and the publisher, which
diffs against the log, writes nothing for changes that were already published. A change is
never lost (a batch's offsets are committed only after its publish succeeded) and never
repeated (the log's versions only move when the membership moves).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pyroaring import BitMap64

from compute import streamstate
from compute.events import EVENT_TYPES
from compute.fsutil import fsync_path
from compute.kafkaconf import java_security_settings
from compute.rules import StreamDefinitions, TrackSpec

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

    from publisher import Publisher, PublishResult

log = logging.getLogger(__name__)

#: An event more than this far ahead of its Kafka record's timestamp is dropped: one bad clock
#: (or seconds sent as milliseconds) must not move the event-time clock into the future.
MAX_FUTURE_MS = 5 * 60_000
STATE_FORMAT = 1
# user_id is read as text and checked to be a plain decimal integer: a DECIMAL schema would
# round 1.5 to 2, and a BIGINT one cannot hold ids >= 2**63.
EVENT_SCHEMA = (
    "user_id STRING, type STRING, product_id BIGINT, category STRING, amount DOUBLE, ts BIGINT"
)
_USER_DEC = "TRY_CAST(e.user_id AS DECIMAL(20,0))"
_VALID = (
    "e.user_id RLIKE '^[0-9]{1,20}$' AND "
    f"{_USER_DEC} <= 18446744073709551615BD AND "
    f"e.type IN ({', '.join(repr(t) for t in EVENT_TYPES)}) AND "
    f"e.ts IS NOT NULL AND e.ts > 0 AND e.ts <= unix_millis(kafka_ts) + {MAX_FUTURE_MS}"
)
# Spark has no unsigned 64-bit type: ids >= 2**63 are kept as their two's complement BIGINT
# and read back as uint64 when the bitmaps are built. Computed for valid rows only (ANSI mode
# would fail the batch on an overflowing cast).
_SIGNED_USER = (
    f"CASE WHEN valid THEN CAST(CASE WHEN {_USER_DEC} >= 9223372036854775808BD "
    f"THEN {_USER_DEC} - 18446744073709551616BD ELSE {_USER_DEC} END AS BIGINT) END"
)


# -- state on disk -----------------------------------------------------------------------------


class StateStore:
    """Per-batch state under CHECKPOINT/state: `batch-<id>/` holds `state.parquet` (track,
    user_id, ts rows) and `meta.json` (clock, tracks). A directory is complete once renamed
    into place; leftovers of an interrupted write are named `.tmp-*` and ignored."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, batch_id: int) -> Path:
        return self.root / f"batch-{batch_id}"

    def batches(self) -> list[int]:
        out = []
        for entry in self.root.iterdir():
            name = entry.name
            if name.startswith("batch-") and (entry / "meta.json").is_file():
                try:
                    out.append(int(name.removeprefix("batch-")))
                except ValueError:
                    continue
        return sorted(out)

    def latest_before(self, batch_id: int) -> int | None:
        """The newest complete state older than `batch_id`, if any."""
        older = [b for b in self.batches() if b < batch_id]
        return older[-1] if older else None

    def discard_from(self, batch_id: int) -> None:
        """Delete states of `batch_id` and later: left by an earlier run of this batch that did
        not finish (or by a Spark checkpoint that was reset)."""
        for b in self.batches():
            if b >= batch_id:
                shutil.rmtree(self.path(b))
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)

    def load(self, batch_id: int, specs: list[TrackSpec]) -> tuple[streamstate.State, int]:
        """(state, clock) saved by batch `batch_id`."""
        import pyarrow.parquet as pq

        path = self.path(batch_id)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != STATE_FORMAT:
            raise RuntimeError(f"{path}: unknown state format {meta.get('format')!r}")
        table = pq.read_table(path / "state.parquet", schema=streamstate.SCHEMA)
        return streamstate.from_table(table, specs), int(meta["clock"])

    def save(
        self, batch_id: int, state: streamstate.State, clock: int, specs: list[TrackSpec]
    ) -> None:
        import pyarrow.parquet as pq

        tmp = self.root / f".tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            pq.write_table(streamstate.to_table(state), tmp / "state.parquet")
            meta = {
                "format": STATE_FORMAT,
                "batch_id": batch_id,
                "clock": clock,
                "tracks": {t.track.id: {"depth": t.depth, "horizon_ms": t.horizon_ms}
                           for t in specs},
            }  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            for name in ("state.parquet", "meta.json"):
                fsync_path(tmp / name)
            os.replace(tmp, self.path(batch_id))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(self.root)

    def gc(self, keep_from: int) -> None:
        """Delete states older than `keep_from`. Batch N may be re-run until Spark commits it,
        and a re-run needs the state of batch N - 1: keep that one."""
        for b in self.batches():
            if b < keep_from:
                shutil.rmtree(self.path(b), ignore_errors=True)


# -- the Spark side ----------------------------------------------------------------------------


def parse_events(raw: DataFrame) -> DataFrame:
    """Kafka records (value, timestamp) -> (user_id BIGINT, type, category, product_id, ts,
    valid)."""
    from pyspark.sql import functions as F

    parsed = raw.select(
        F.from_json(F.col("value").cast("string"), EVENT_SCHEMA).alias("e"),
        F.col("timestamp").alias("kafka_ts"),
    )
    checked = parsed.select("e", F.coalesce(F.expr(_VALID), F.lit(False)).alias("valid"))
    return checked.select(
        F.expr(_SIGNED_USER).alias("user_id"),
        F.col("e.type").alias("type"),
        F.col("e.category").alias("category"),
        F.col("e.product_id").alias("product_id"),
        F.col("e.ts").alias("ts"),
        F.col("valid"),
    )


def track_rows(events: DataFrame, specs: list[TrackSpec]) -> DataFrame:
    """(track, user_id, ts) for every valid event and every track it feeds (a view of an
    electronics product feeds both `view` and `view/electronics`)."""
    from pyspark.sql import functions as F

    cases = []
    for spec in specs:
        cond = F.col("type") == spec.track.event
        if spec.track.category is not None:
            cond = cond & (F.col("category") == spec.track.category)
        cases.append(F.when(cond, F.lit(spec.track.id)))
    tracks = F.filter(F.array(*cases), lambda x: x.isNotNull())
    return events.where("valid").select(
        F.explode(tracks).alias("track"), F.col("user_id"), F.col("ts")
    )


def read_batch(raw: DataFrame, specs: list[TrackSpec], name: str) -> tuple[pa.Table, BatchStats]:
    """One Spark job: the batch's track rows as Arrow, and its counts (observed in passing)."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    observation = Observation(name)
    events = parse_events(raw).observe(
        observation,
        F.count(F.lit(1)).alias("n"),
        F.count(F.when(~F.col("valid"), 1)).alias("bad"),
        F.max(F.when(F.col("valid"), F.col("ts"))).alias("max_ts"),
    )
    table = track_rows(events, specs).toArrow()
    metrics = observation.get
    max_ts = metrics.get("max_ts")
    stats = BatchStats(
        int(metrics["n"]), int(metrics["bad"]), None if max_ts is None else int(max_ts)
    )
    return table, stats


@dataclass(frozen=True)
class BatchStats:
    events: int
    invalid: int
    max_ts: int | None


# -- one micro-batch ---------------------------------------------------------------------------


@dataclass
class BatchReport:
    batch_id: int
    events: int = 0
    invalid: int = 0
    clock: int = 0
    cardinalities: dict[str, int] = field(default_factory=dict)
    #: segment -> new version, for the segments this batch changed in the log
    versions: dict[str, int] = field(default_factory=dict)
    published: bool = False
    #: wall clock (time.time()) when the publish transaction committed
    published_at: float | None = None
    seconds: float = 0.0
    #: seconds spent reading the batch, updating and saving the state ("compute"), publishing
    timings: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock / 1000))
        sizes = ", ".join(f"{k} {v:,}" for k, v in self.cardinalities.items())
        changed = ", ".join(f"{k} v{v}" for k, v in self.versions.items()) or "nothing"
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
        return (
            f"batch {self.batch_id}: {self.events:,} events ({self.invalid:,} invalid), "
            f"clock {clock}; {sizes}; published {changed}; {self.seconds:.2f} s ({parts})"
        )


class StreamJob:
    """The foreachBatch handler: state, memberships and publishing for one checkpoint."""

    def __init__(
        self,
        definitions: StreamDefinitions,
        publisher: Publisher,
        checkpoint: Path | str,
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
        publish_attempts: int = 5,
    ) -> None:
        self.rules = definitions.rules
        #: the rules' max_age_seconds: each publish heartbeats these segments
        self.max_age = {r.name: r.max_age_seconds for r in self.rules if r.max_age_seconds}
        #: the rules' ttl_seconds: each publish re-affirms these segments' members
        self.ttl = {r.name: r.ttl_seconds for r in self.rules if r.ttl_seconds}
        #: a batch whose memberships did not change still publishes once a third of the
        #: shortest max age or TTL has passed since the last publish (before the segment goes
        #: stale, before its members lapse)
        self._renew_s = min([*self.max_age.values(), *self.ttl.values()], default=None)
        self._published_at = 0.0
        self.specs = definitions.tracks()
        self.publisher = publisher
        self.checkpoint = Path(checkpoint)
        self.store = StateStore(self.checkpoint / "state")
        self.on_batch = on_batch
        self.publish_attempts = publish_attempts
        #: what this process last published (or found already published): a cheap way to
        #: skip the publisher's log replay when nothing changed. Empty after a restart, when
        #: the publisher's diff against the log decides.
        self._last: dict[str, BitMap64] | None = None
        self._cached: tuple[int, streamstate.State, int] | None = None
        self.error: BaseException | None = None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def process(self, raw: DataFrame, batch_id: int) -> None:
        """The foreachBatch function. An exception fails the query (and is kept in `error`
        for a readable message): the batch is not committed and runs again on restart."""
        try:
            self._process(raw, batch_id)
        except BaseException as e:
            self.error = e
            raise

    def _process(self, raw: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        report = BatchReport(batch_id)
        self.store.discard_from(batch_id)
        state, clock = self._previous(batch_id)
        rows, stats = read_batch(raw, self.specs, f"seg-stream-{uuid.uuid4().hex[:8]}")
        report.events, report.invalid = stats.events, stats.invalid
        if stats.max_ts is not None:
            clock = max(clock, stats.max_ts)
        report.clock = clock
        state = streamstate.merge(state, streamstate.split_rows(rows), self.specs, clock)
        self.store.save(batch_id, state, clock, self.specs)
        self._cached = (batch_id, state, clock)
        desired = streamstate.memberships(state, self.rules, clock)
        report.cardinalities = {k: len(v) for k, v in desired.items()}
        report.timings["compute"] = time.monotonic() - started
        if desired != self._last or self._renewal_due():
            publish_started = time.monotonic()
            result = self._publish(desired)
            report.timings["publish"] = time.monotonic() - publish_started
            report.published = True
            report.published_at = time.time()
            report.versions = dict(result.versions)
            self._last = desired
            self._published_at = time.monotonic()
        self.store.gc(batch_id - 1)
        report.seconds = time.monotonic() - started
        if self.on_batch is not None:
            self.on_batch(report)

    def _renewal_due(self) -> bool:
        if self._renew_s is None:
            return False
        return time.monotonic() - self._published_at >= self._renew_s / 3

    def _previous(self, batch_id: int) -> tuple[streamstate.State, int]:
        """The state and clock this batch starts from: the newest saved before it (kept in
        memory from the previous batch of this process when that is the one)."""
        latest = self.store.latest_before(batch_id)
        if latest is None:
            return {}, 0
        if self._cached is not None and self._cached[0] == latest:
            return self._cached[1], self._cached[2]
        return self.store.load(latest, self.specs)

    def _publish(self, desired: dict[str, BitMap64]) -> PublishResult:
        """Publish, retrying transient log errors (a log directory held by another writer, a
        broker restart). Fencing is final: another stream job took over this writer id."""
        from sidecar.transport.base import FencedError, TransportError

        delay = 0.5
        for attempt in range(1, self.publish_attempts + 1):
            try:
                return self.publisher.publish(
                    desired, prune=False, max_age=self.max_age, ttl=self.ttl
                )
            except FencedError:
                raise
            except TransportError as e:
                if attempt == self.publish_attempts:
                    raise
                log.warning("publish failed (attempt %d): %s; retrying", attempt, e)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")


# -- the query ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOptions:
    kafka: str
    events_topic: str
    checkpoint: Path
    trigger_seconds: float = 5.0
    once: bool = False
    starting_offsets: str = "earliest"
    max_events_per_batch: int | None = None
    fail_on_data_loss: bool = True
    kafka_options: Mapping[str, str] = field(default_factory=dict)


#: consumer properties Spark's Kafka source sets itself or refuses ("Kafka Specific
#: Configurations" in its integration guide), or that a flag of the job gives
SOURCE_SET_ELSEWHERE = {
    "bootstrap.servers": "the job's Kafka flag",
    "auto.offset.reset": "the job's starting-offsets flag",
    "key.deserializer": "Spark's Kafka source",
    "value.deserializer": "Spark's Kafka source",
    "enable.auto.commit": "Spark's Kafka source",
    "interceptor.classes": "Spark's Kafka source",
}


def source_options(
    pairs: Iterable[tuple[str, str]], flag: str, owned: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`--...-kafka-config KEY=VALUE` pairs -> `kafka_stream`'s `kafka_options` (Java client
    consumer properties, such as security.protocol, sasl.jaas.config); ValueError, one line,
    for a key set elsewhere (`SOURCE_SET_ELSEWHERE`, and `owned`: key -> why)."""
    refused = {**SOURCE_SET_ELSEWHERE, **(owned or {})}
    out: dict[str, str] = {}
    for key, value in pairs:
        key = key.removeprefix("kafka.")
        if key in refused:
            raise ValueError(f"{flag} {key}=...: {key} is set by {refused[key]}")
        out[key] = value
    return out


def with_derived_security(
    source: Mapping[str, str], librdkafka: Mapping[str, str]
) -> dict[str, str]:
    """Spark's Kafka source's settings: `source` (the Java client's names) over the
    credentials and TLS derived from the librdkafka client's settings of the same topic
    (`kafkaconf.java_security_settings`), so a cluster's secrets are given once; nothing is
    derived when `source` sets security.protocol itself. ValueError as the derivation's."""
    if "security.protocol" in source:
        return dict(source)
    return java_security_settings(librdkafka) | dict(source)


def kafka_stream(
    spark: SparkSession,
    kafka: str,
    topic: str,
    *,
    starting_offsets: str = "earliest",
    fail_on_data_loss: bool = True,
    max_per_trigger: int | None = None,
    kafka_options: Mapping[str, str] | None = None,
) -> DataFrame:
    """A streaming DataFrame of `topic`'s records (Spark's Kafka source)."""
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", kafka)
        .option("subscribe", topic)
        .option("startingOffsets", starting_offsets)
        .option("failOnDataLoss", str(fail_on_data_loss).lower())
    )
    if max_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(max_per_trigger))
    for key, value in (kafka_options or {}).items():
        reader = reader.option(f"kafka.{key}", value)
    return reader.load()


def start(spark: SparkSession, job: StreamJob, opts: StreamOptions) -> StreamingQuery:
    """Start the query (Spark's checkpoint in CHECKPOINT/spark); returns at once."""
    records = kafka_stream(
        spark, opts.kafka, opts.events_topic, starting_offsets=opts.starting_offsets,
        fail_on_data_loss=opts.fail_on_data_loss, max_per_trigger=opts.max_events_per_batch,
        kafka_options=opts.kafka_options,
    )  # fmt: skip
    writer = (
        records.select("value", "timestamp")
        .writeStream.queryName(f"seg-stream-{opts.events_topic}")
        .foreachBatch(job.process)
        .option("checkpointLocation", str(opts.checkpoint / "spark"))
    )
    if opts.once:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{opts.trigger_seconds} seconds")
    return writer.start()


def print_report(report: BatchReport) -> None:
    print(f"stream: {report.line()}", file=sys.stderr, flush=True)
