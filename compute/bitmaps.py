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
from collections.abc import Iterator
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


def segment_bitmap(df: DataFrame, segment: str) -> BitMap64:
    """Run the segment's query and return its members; bad ids raise DefinitionError."""
    from pyspark.sql.functions import arrow_udf

    (column,) = df.columns
    udf = arrow_udf(partition_bitmaps, "binary").asNondeterministic()
    rows = df.select(udf(df[column]).alias("bitmap")).where("bitmap IS NOT NULL").collect()
    payloads: list[bytes] = [bytes(row[0]) for row in rows]
    for payload in payloads:
        if payload[:1] == _ERROR:
            raise DefinitionError(payload[1:].decode(errors="replace"), segment)
    parts = [BitMap64.deserialize(payload[1:]) for payload in payloads]
    return BitMap64.union(*parts) if parts else BitMap64()
