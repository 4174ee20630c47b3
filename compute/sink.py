"""`seg-compute sink`: Kafka topics into the lake as Parquet tables partitioned by date, with
Spark Structured Streaming, exactly once through its checkpoint.

One streaming query per topic, each with Spark's file sink into its table directory
`LAKE/<table>/dt=YYYY-MM-DD/part-*.parquet` and its own checkpoint `CHECKPOINT/<table>`:

- an events topic (compute/events.py's JSON) becomes the table `events` with gen-data's
  events columns (user_id, ts, type, product_id, category; ids >= 2**63 kept as their
  two's-complement BIGINT, as everywhere in compute); invalid events are dropped, as the
  stream job drops them;
- a CDC topic `<cdc-prefix>.<db>.<collection>` (compute/cdc.py, or Kafka Connect with the
  MongoDB source connector) becomes the changelog table `<collection>` (compute/changelog.py),
  which `seg-compute batch` reads as the collection's current state.

Exactly once: Spark's file sink commits each micro-batch's files to `<table>/_spark_metadata`
after writing them, and a micro-batch's Kafka offsets are in the checkpoint before it runs; a
restart redoes an unfinished batch with the same offsets and readers that go through the
metadata log (Spark reading the table directory, as `seg-compute batch` does) see every
record once. Files of a batch that died half-way are left in the directory but not in the
log, so a reader that lists files itself (pyarrow on the directory) may see them. Kafka is
read with `read_committed`, so aborted CDC transactions never reach the lake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compute import changelog, lakefs
from compute.lake import PARTITION_COLUMN

if TYPE_CHECKING:
    from pathlib import Path

    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

EVENTS_TABLE = "events"


class SinkError(ValueError):
    """A topic list the sink cannot map to tables."""


@dataclass(frozen=True)
class Route:
    topic: str
    table: str
    kind: str  # events | cdc


def routes(topics: Sequence[str], cdc_prefix: str) -> list[Route]:
    """`TOPIC` or `TOPIC=TABLE` items -> routes. A topic `<cdc_prefix>.<db>.<collection>` is a
    CDC topic whose table is the collection; any other carries events (table `events`)."""
    out: list[Route] = []
    for item in topics:
        topic, _, table = item.partition("=")
        parts = topic.split(".")
        cdc = topic.startswith(f"{cdc_prefix}.") and len(parts) >= len(cdc_prefix.split(".")) + 2
        table = table or (parts[-1] if cdc else EVENTS_TABLE)
        if not topic or not lakefs.TABLE_NAME.match(table):
            raise SinkError(f"--sink-topics {item!r}: the table name {table!r} is not "
                            "[A-Za-z][A-Za-z0-9_]*")  # fmt: skip
        out.append(Route(topic, table, "cdc" if cdc else "events"))
    tables = [r.table for r in out]
    if dupes := sorted({t for t in tables if tables.count(t) > 1}):
        raise SinkError(f"--sink-topics: more than one topic for table {dupes[0]} (name the tables "
                        "with TOPIC=TABLE)")  # fmt: skip
    return out


@dataclass(frozen=True)
class SinkOptions:
    kafka: str
    routes: list[Route]
    lake: Path | str
    checkpoint: Path | str
    trigger_seconds: float = 10.0
    once: bool = False
    starting_offsets: str = "earliest"
    max_records_per_batch: int | None = None
    kafka_options: Mapping[str, str] = field(default_factory=dict)


#: the source properties the sink sets for its exactly-once rule (`stream.source_options`)
SINK_OWNED = {"isolation.level": "the sink (read_committed: aborted CDC transactions never land)"}


def event_rows(records: DataFrame) -> DataFrame:
    """Kafka event records -> the events table's rows (gen-data's columns, plus `dt`)."""
    from pyspark.sql import functions as F

    from compute.stream import parse_events

    ts = F.timestamp_millis(F.col("ts"))
    return parse_events(records).where("valid").select(
        "user_id", ts.alias("ts"), "type", "product_id", "category",
        F.to_date(ts).alias(PARTITION_COLUMN),
    )  # fmt: skip


def start(spark: SparkSession, opts: SinkOptions) -> list[StreamingQuery]:
    """Start one query per route; returns at once."""
    from compute.stream import kafka_stream

    queries = []
    for route in opts.routes:
        records = kafka_stream(
            spark, opts.kafka, route.topic, starting_offsets=opts.starting_offsets,
            max_per_trigger=opts.max_records_per_batch,
            kafka_options={"isolation.level": "read_committed", **opts.kafka_options},
        )  # fmt: skip
        rows = event_rows(records) if route.kind == "events" else changelog.changelog_rows(records)
        writer = (
            rows.writeStream.format("parquet")
            .queryName(f"seg-sink-{route.table}")
            .partitionBy(PARTITION_COLUMN)
            .option("path", lakefs.join(opts.lake, route.table))
            .option("checkpointLocation", lakefs.join(opts.checkpoint, route.table))
        )
        if opts.once:
            writer = writer.trigger(availableNow=True)
        else:
            writer = writer.trigger(processingTime=f"{opts.trigger_seconds} seconds")
        queries.append(writer.start())
    return queries


def run_once(spark: SparkSession, opts: SinkOptions) -> None:
    """Write what the topics hold now and return (availableNow); raises a query's error."""
    from dataclasses import replace

    for query in start(spark, replace(opts, once=True)):
        query.awaitTermination()
        if query.exception() is not None:
            raise RuntimeError(f"sink query {query.name} failed: {query.exception()}")
