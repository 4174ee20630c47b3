"""Build a segment's BitMap64 inside the Spark executors, one bitmap per partition.

Each partition's user ids reach a Python worker as Arrow arrays (an iterator Arrow UDF, so no
per-row pickling and no pandas); the worker adds them to one BitMap64 and emits its serialized
bytes in the partition's last row (every other row is null and filtered out). The driver
collects one small value per partition and unions them.

Why not `df.rdd.mapPartitions`: it converts every row to a Python Row object, about 8x slower
(2M ids: 9.6 s against 1.2 s on two cores). `mapInArrow` would be the natural API but in
pyspark 4.3 it insists on pandas, which is not a dependency.

Bad ids are not raised in the executor (that would surface as a Java stack trace): the
partition emits an error payload instead and the driver raises DefinitionError.
"""

from __future__ import annotations

import array
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from pyroaring import BitMap64

from compute.definitions import DefinitionError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

MAX_USER = 2**64 - 1
_OK = b"\x00"
_ERROR = b"\x01"


def _add(bitmap: BitMap64, values: pa.Array) -> str | None:
    """Add an Arrow array of user ids to `bitmap`; return a reason when they are not ids."""
    if len(values) == 0:
        return None
    if values.null_count:
        return f"user_id is null in {values.null_count} row(s)"
    if not (pa.types.is_integer(values.type) or pa.types.is_decimal(values.type)):
        return f"user_id has type {values.type}, not an integer"
    if pa.types.is_decimal(values.type) and values.type.scale != 0:
        return f"user_id has type {values.type}, not an integer"
    bounds = pc.min_max(values)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low < 0:
        return f"user_id must be >= 0, got {low}"
    if high > MAX_USER:
        return f"user_id must be < 2**64, got {high}"
    ids = pc.cast(values, pa.uint64()).to_numpy(zero_copy_only=False)
    bitmap.update(array.array("Q", ids.tobytes()))
    return None


def partition_bitmaps(batches: Iterator[pa.Array]) -> Iterator[pa.Array]:
    """Arrow iterator UDF body: one output value per partition, in its last row."""
    bitmap = BitMap64()
    error: str | None = None
    pending = 0
    started = False
    for values in batches:
        if error is None:
            error = _add(bitmap, values)
        if started:
            yield pa.nulls(pending, pa.binary())
        pending, started = len(values), True
    if started:
        payload = _ERROR + error.encode() if error is not None else _OK + bitmap.serialize()
        yield pa.array([payload] + [None] * (pending - 1), pa.binary())


def _bitmap_column(df: DataFrame):  # noqa: ANN202 (a pyspark Column)
    from pyspark.sql.functions import arrow_udf

    (column,) = df.columns
    udf = arrow_udf(partition_bitmaps, "binary").asNondeterministic()
    return udf(df[column]).alias("bitmap")


def _merge(payloads: list[bytes], segment: str) -> BitMap64:
    """The segment's members from its partitions' payloads; a bad id raises DefinitionError."""
    for payload in payloads:
        if payload[:1] == _ERROR:
            raise DefinitionError(payload[1:].decode(errors="replace"), segment)
    parts = [BitMap64.deserialize(payload[1:]) for payload in payloads]
    return BitMap64.union(*parts) if parts else BitMap64()


def segment_bitmap(df: DataFrame, segment: str) -> BitMap64:
    """Run the segment's query and return its members; bad ids raise DefinitionError."""
    rows = df.select(_bitmap_column(df)).where("bitmap IS NOT NULL").collect()
    return _merge([bytes(row[0]) for row in rows], segment)


def segment_bitmaps(frames: Sequence[DataFrame], segments: Sequence[str]) -> list[BitMap64]:
    """Every segment's members from one Spark job: the queries' per-partition bitmaps, tagged
    with the segment's index, in one UNION ALL (a union keeps each child's partitions apart, so
    a partition holds one segment's rows) and one collect. The DAG scheduler then runs the
    segments' stages side by side instead of job after job. Bad ids raise DefinitionError for
    the first such segment in order."""
    from functools import reduce

    from pyspark.sql.functions import lit

    if not frames:
        return []
    tagged = [
        df.select(lit(i).alias("segment"), _bitmap_column(df)).where("bitmap IS NOT NULL")
        for i, df in enumerate(frames)
    ]
    rows = reduce(lambda a, b: a.unionAll(b), tagged).collect()
    payloads: list[list[bytes]] = [[] for _ in frames]
    for index, payload in rows:
        payloads[index].append(bytes(payload))
    return [_merge(p, name) for p, name in zip(payloads, segments, strict=True)]
