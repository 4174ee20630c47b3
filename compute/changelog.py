"""A CDC table in the lake: the changelog `seg-compute sink` appends, and the current state
`seg-compute batch` reads from it.

The sink writes every record of a CDC topic (compute/cdc.py's shape, or the MongoDB Kafka
source connector's) as one row:

- `_key`: the change's `documentKey` as JSON text (`{"_id":42}`); null for drop / rename;
- `_op`: its `operationType`: insert (the copy's too), update, replace, delete, drop, ...;
- `_document`: its `fullDocument` as relaxed extended JSON text; null for deletes (and for an
  update whose document was gone when it was looked up);
- `_ts`: when the change happened: `clusterTime`, else (the copy) the Kafka record's time;
- `_partition`, `_offset`: where the record is in its topic (one document's changes are in
  one partition, in order);
- `dt`, the partition column: the date (UTC) of the document's `ts` field when that is a date,
  else of `_ts`.

The current state of the collection is, per `_key`, the row with the highest offset (one
document's changes are in one partition, in order), unless that row is a delete or has no
document. Its columns are the documents' top-level fields, with the schema Spark infers from
them, extended JSON wrappers unwrapped (`{"$date": ...}` -> TIMESTAMP, `{"$numberDecimal":
...}` -> DECIMAL(38,10), `{"$numberLong": ...}` -> BIGINT, `{"$oid": ...}` -> STRING,
`{"$numberDouble": ...}` -> DOUBLE), plus `dt`. Not applied: `drop` and `rename` (the cdc job
stops on them; rebuild the table after one), and documents deleted while a lost resume token
was replaced by a fresh copy (`seg-compute cdc --fresh-copy`) stay until deleted again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

KEY, OP, DOCUMENT, TS, PARTITION, OFFSET = (
    "_key", "_op", "_document", "_ts", "_partition", "_offset")  # fmt: skip
COLUMNS = (KEY, OP, DOCUMENT, TS, PARTITION, OFFSET)
PRESENT = ("insert", "update", "replace")
#: extended JSON wrapper -> the Spark SQL expression over its text (`{}`)
_WRAPPERS = {
    "$date": "CAST({} AS TIMESTAMP)",
    "$numberDecimal": "CAST({} AS DECIMAL(38,10))",
    "$numberLong": "CAST({} AS BIGINT)",
    "$oid": "{}",
    "$numberDouble": "CAST({} AS DOUBLE)",
}


def changelog_rows(records: DataFrame) -> DataFrame:
    """Kafka records (value, timestamp, partition, offset) -> changelog rows (with `dt`)."""
    from pyspark.sql import functions as F

    value = F.col("value").cast("string")

    def field(path: str) -> object:
        return F.get_json_object(value, path)

    cluster_secs = field("$.clusterTime['$timestamp'].t").cast("bigint")
    ts = F.coalesce(F.timestamp_seconds(cluster_secs), F.col("timestamp"))
    doc_date = F.to_date(F.try_to_timestamp(field("$.fullDocument.ts['$date']")))
    return records.select(
        field("$.documentKey").alias(KEY),
        field("$.operationType").alias(OP),
        field("$.fullDocument").alias(DOCUMENT),
        ts.alias(TS),
        F.col("partition").alias(PARTITION),
        F.col("offset").alias(OFFSET),
        F.coalesce(doc_date, F.to_date(ts)).alias("dt"),
    )


def is_changelog(df: DataFrame) -> bool:
    return set(COLUMNS) <= set(df.columns)


def current_state(spark: SparkSession, changelog: DataFrame) -> DataFrame:
    """The collection as it is after the changelog's last change (see the module doc)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    newest = Window.partitionBy(KEY).orderBy(F.col(PARTITION).desc(), F.col(OFFSET).desc())
    latest = (
        changelog.where(F.col(KEY).isNotNull())
        .withColumn("_rank", F.row_number().over(newest))
        .where((F.col("_rank") == 1) & F.col(OP).isin(*PRESENT) & F.col(DOCUMENT).isNotNull())
    )
    docs = latest.select(DOCUMENT).where(F.col(DOCUMENT).isNotNull())
    schema = spark.read.json(docs.rdd.map(lambda row: row[0])).schema
    if not schema.fields:
        schema = StructType([])
    parsed = latest.select(F.from_json(DOCUMENT, schema).alias("d"), "dt")
    columns = [_unwrapped(f) for f in schema.fields if f.name != "dt"]
    return parsed.select(*columns, "dt")


def _unwrapped(field: object) -> object:
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    col = F.col("d").getField(field.name)  # type: ignore[attr-defined]
    kind = field.dataType  # type: ignore[attr-defined]
    if isinstance(kind, StructType) and len(kind.fields) == 1:
        wrapper = kind.fields[0].name
        if wrapper in _WRAPPERS:
            inner = f"`d`.`{field.name}`.`{wrapper}`"  # type: ignore[attr-defined]
            return F.expr(_WRAPPERS[wrapper].format(inner)).alias(field.name)  # type: ignore[attr-defined]
    return col.alias(field.name)  # type: ignore[attr-defined]
