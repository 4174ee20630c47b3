"""Build the segments' BitMap64s from Spark frames whose first column is user_id: one Spark job
for all of them, in one of two places.

- On the driver (local mode, the default there): each frame's rows in some segment as (source,
  user_id, mask, ...), one bit per segment, in one UNION ALL collected as Arrow batches
  (`DataFrame.toArrow`); the driver adds each segment's ids to its bitmap. In local mode the
  executors share the driver's machine, so the rows cross a socket either way, and no Python
  worker is started: their start-up (a fork, then pyarrow and pyroaring imported) is on the
  batch's critical path, about 2 s of a fresh JVM's 26 s (perf/ANALYSIS.md, fourteenth
  session). The driver holds the collected rows: about 20 bytes per user and table read, 49 MB
  for the 1M-user benchmark.
- In the executors (a cluster): each partition's user ids reach a Python worker as Arrow arrays
  (an iterator Arrow UDF, so no per-row pickling and no pandas), with one boolean column per
  segment when the frame is a merged query's (compute/merge.py; else one segment, every row);
  the worker adds the ids of each segment to its BitMap64 and emits them serialized in the
  partition's last row (every other row is null and filtered out), one length-prefixed entry
  per segment. The driver collects one small value per partition and unions them per segment.

Why not `df.rdd.mapPartitions`: it converts every row to a Python Row object, about 8x slower
(2M ids: 9.6 s against 1.2 s on two cores). `mapInArrow` would be the natural API but in
pyspark 4.3 it insists on pandas, which is not a dependency.

Bad ids are not raised in the executor (that would surface as a Java stack trace): the
partition emits an error payload instead and the driver raises DefinitionError; the driver
path checks the same ids with the same rule (`_add`).
"""

from __future__ import annotations

import array
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


def _entry(bitmap: BitMap64, error: str | None) -> bytes:
    body = _ERROR + error.encode() if error is not None else _OK + bitmap.serialize()
    return struct.pack("<Q", len(body)) + body


def partition_bitmaps(batches: Iterator[tuple[pa.Array, ...]]) -> Iterator[pa.Array]:
    """Arrow iterator UDF body over (user_id, flag, ...): a bitmap per flag column of the ids
    whose flag is true, all of them in one payload in the partition's last row."""
    bitmaps: list[BitMap64] = []
    errors: list[str | None] = []
    pending = 0
    started = False
    for ids, *flags in batches:
        if not started:
            bitmaps, errors = [BitMap64() for _ in flags], [None] * len(flags)
        for i, flag in enumerate(flags):
            if errors[i] is None:
                errors[i] = _add(bitmaps[i], pc.filter(ids, flag))
        if started:
            yield pa.nulls(pending, pa.binary())
        pending, started = len(ids), True
    if started:
        payload = b"".join(_entry(b, e) for b, e in zip(bitmaps, errors, strict=True))
        yield pa.array([payload] + [None] * (pending - 1), pa.binary())


def _entries(payload: bytes) -> Iterator[bytes]:
    at = 0
    while at < len(payload):
        (size,) = struct.unpack_from("<Q", payload, at)
        yield payload[at + 8 : at + 8 + size]
        at += 8 + size


def _bitmap_column(df: DataFrame, flags: Sequence[str] = ()):  # noqa: ANN202 (a pyspark Column)
    """The partitions' payloads of `df`'s first column (user_id): one bitmap per flag column
    named in `flags`, or one of all its rows when there are none."""
    from pyspark.sql.functions import arrow_udf, lit

    udf = arrow_udf(partition_bitmaps, "binary").asNondeterministic()
    columns = [df[f] for f in flags] if flags else [lit(True)]
    return udf(df[df.columns[0]], *columns).alias("bitmap")


def _merge(payloads: list[bytes], segment: str) -> BitMap64 | DefinitionError:
    """The segment's members from its partitions' entries, or the DefinitionError of a bad id."""
    for payload in payloads:
        if payload[:1] == _ERROR:
            return DefinitionError(payload[1:].decode(errors="replace"), segment)
    parts = [BitMap64.deserialize(payload[1:]) for payload in payloads]
    return BitMap64.union(*parts) if parts else BitMap64()


Found = dict[str, "BitMap64 | DefinitionError"]


def decided(found: Found, order: Sequence[str]) -> dict[str, BitMap64]:
    """The members of the segments in `order`; a bad id raises DefinitionError for the first
    such segment in `order`."""
    for name in order:
        error = found[name]
        if isinstance(error, DefinitionError):
            raise error
    return {name: found[name] for name in order}  # type: ignore[misc]


def segment_bitmap(df: DataFrame, segment: str, *, on_driver: bool | None = None) -> BitMap64:
    """Run the segment's query and return its members; bad ids raise DefinitionError."""
    return source_bitmaps([Source(df, (segment,))], on_driver=on_driver)[segment]


@dataclass(frozen=True)
class Source:
    """A frame whose first column is user_id. `flags`: one boolean column per segment (the
    segment's members are the rows where it is true: compute/merge.py); none: one segment, all
    its rows."""

    frame: DataFrame
    segments: tuple[str, ...]
    flags: tuple[str, ...] = ()


def segment_bitmaps(frames: Sequence[DataFrame], segments: Sequence[str]) -> list[BitMap64]:
    """Every segment's members from one Spark job, one frame per segment (`source_bitmaps`)."""
    found = source_bitmaps([Source(df, (s,)) for df, s in zip(frames, segments, strict=True)])
    return [found[s] for s in segments]


def source_bitmaps(
    sources: Sequence[Source],
    order: Sequence[str] | None = None,
    *,
    on_driver: bool | None = None,
) -> dict[str, BitMap64]:
    """Every source's segments' members from one Spark job (`source_results`). Bad ids raise
    DefinitionError for the first such segment in `order` (default: the sources')."""
    found = source_results(sources, on_driver=on_driver)
    return decided(found, order or list(found))


def source_results(sources: Sequence[Source], *, on_driver: bool | None = None) -> Found:
    """Every source's segments' members, or the DefinitionError of a bad id, from one Spark
    job: the sources' rows in one UNION ALL and one collect (a union keeps each child's
    partitions apart, and the DAG scheduler runs the sources' stages side by side instead of
    job after job). `on_driver`: the bitmaps built on the driver (`_driver_results`) or in the
    executors (`_executor_results`); None: on the driver in local mode (module docstring)."""
    if not sources:
        return {}
    if on_driver is None:
        on_driver = is_local(sources[0].frame)
    return _driver_results(sources) if on_driver else _executor_results(sources)


def is_local(frame: DataFrame) -> bool:
    """The frame's session runs in local mode (its executors in the driver's JVM)."""
    context = getattr(frame.sparkSession, "sparkContext", None)
    return context is not None and context.master.startswith("local")


def _executor_results(sources: Sequence[Source]) -> Found:
    """The bitmaps built in the executors: the sources' per-partition payloads
    (`partition_bitmaps`), tagged with the source's index."""
    from functools import reduce

    from pyspark.sql.functions import lit

    tagged = [
        s.frame.select(lit(i).alias("source"), _bitmap_column(s.frame, s.flags)).where(
            "bitmap IS NOT NULL"
        )
        for i, s in enumerate(sources)
    ]
    rows = reduce(lambda a, b: a.unionAll(b), tagged).collect()
    entries: list[list[list[bytes]]] = [[[] for _ in s.segments] for s in sources]
    for index, payload in rows:
        for k, entry in enumerate(_entries(bytes(payload))):
            entries[index][k].append(entry)
    return {
        name: _merge(p, name)
        for source, lists in zip(sources, entries, strict=True)
        for name, p in zip(source.segments, lists, strict=True)
    }


#: segments per BIGINT mask column of the driver's collect (bit 63, the sign, is left unused)
MASK_BITS = 63


def _masked(source: Source, index: int, width: int) -> DataFrame:
    """The source's rows in at least one of its segments as (source, user_id, mask0, ...,
    mask<width - 1>): segment k's bit is bit k % MASK_BITS of mask k // MASK_BITS."""
    from functools import reduce

    from pyspark.sql.functions import lit, when

    frame = source.frame
    flags = [frame[f] for f in source.flags] if source.flags else [lit(True)]
    masks = []
    for m in range(width):
        bits = [
            when(flag, lit(1 << k)).otherwise(lit(0)).cast("bigint")
            for k, flag in enumerate(flags[m * MASK_BITS : (m + 1) * MASK_BITS])
        ]
        masks.append(reduce(lambda a, b: a.bitwiseOR(b), bits, lit(0).cast("bigint")))
    kept = reduce(lambda a, b: a | b, [mask != 0 for mask in masks])
    columns = [mask.alias(f"mask{m}") for m, mask in enumerate(masks)]
    return frame.select(lit(index).alias("source"), frame[frame.columns[0]], *columns).where(kept)


def _driver_results(sources: Sequence[Source]) -> Found:
    """The bitmaps built on the driver from the sources' member rows (`_masked`) collected as
    Arrow. The union widens the user_id columns to one type (a decimal(20,0) beside a BIGINT:
    decimal), which `_add` takes."""
    from functools import reduce

    import numpy as np

    width = max(-(-max(len(s.segments), 1) // MASK_BITS) for s in sources)
    parts = [_masked(s, i, width) for i, s in enumerate(sources)]
    table = reduce(lambda a, b: a.unionAll(b), parts).toArrow()
    tags = table.column(0).to_numpy()
    if len(tags) > 1 and bool((tags[1:] < tags[:-1]).any()):  # a union's rows come in order
        order = np.argsort(tags, kind="stable")
        table, tags = table.take(order), tags[order]
    bounds = np.searchsorted(tags, np.arange(len(sources) + 1))
    found: Found = {}
    for i, source in enumerate(sources):
        rows = table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
        ids = rows.column(1).combine_chunks()
        masks = [rows.column(2 + m).combine_chunks() for m in range(width)]
        for k, name in enumerate(source.segments):
            mask = masks[k // MASK_BITS]
            member = pc.not_equal(pc.bit_wise_and(mask, pa.scalar(1 << (k % MASK_BITS))), 0)
            bitmap = BitMap64()
            error = _add(bitmap, pc.filter(ids, member))
            found[name] = bitmap if error is None else DefinitionError(error, name)
    return found
