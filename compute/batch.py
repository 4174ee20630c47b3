"""`seg-compute batch`: evaluate segment definitions over the lake and write a segment set."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyroaring import BitMap64

from compute import changelog, lakefs, merge
from compute.bitmaps import Source, segment_bitmap, source_bitmaps
from compute.definitions import DefinitionError, ParamValue, Segment, load
from compute.lake import (
    GENERATOR,
    LAKE_FORMAT,
    LAKE_MARKER,
    SCHEMAS,
    parse_lake_meta,
    read_lake_meta,
    spark_ddl,
)
from compute.pruning import columns_read
from compute.segment_set import write_segment_set
from compute.spark import quiet_task_failures

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class LakeError(RuntimeError):
    """The lake directory is missing or unreadable."""


# A lake is a local directory (Path, or str without a scheme) or a Hadoop URI such as
# s3a://bucket/prefix (str): compute.lakefs. A URI lake is only read through a Spark session.


@dataclass(frozen=True)
class SegmentResult:
    name: str
    cardinality: int
    seconds: float  # its own job's; in one pass, the pass's (shared by every segment)


@dataclass(frozen=True)
class BatchResult:
    out: Path
    computed_at: dt.datetime
    segments: list[SegmentResult]
    seconds: float  # all of run_batch
    prepare_seconds: float = 0.0  # registering views and analyzing every query
    write_seconds: float = 0.0
    evaluate_seconds: float = 0.0  # running the queries
    one_pass: bool = True

    @property
    def memberships(self) -> int:
        return sum(s.cardinality for s in self.segments)


def _lake_meta(lake: Path | str, spark: SparkSession | None = None) -> dict | None:
    """_lake.json, or None when there is none (or, for a URI lake, when no session is given)."""
    try:
        if not lakefs.is_uri(lake):
            return read_lake_meta(lake)
        if spark is None:
            return None
        data = lakefs.HadoopDir(spark, str(lake)).read(LAKE_MARKER)
        return None if data is None else parse_lake_meta(data, lakefs.join(lake, LAKE_MARKER))
    except (ValueError, lakefs.LakeAccessError) as e:
        raise LakeError(str(e)) from None


def lake_as_of(
    lake: Path | str, today: dt.date | None = None, *, spark: SparkSession | None = None
) -> tuple[dt.date, str]:
    """The lake's as-of date and where it came from: _lake.json's as_of, or today (UTC) for a
    lake that was not generated. A URI lake's _lake.json is read through `spark`; without a
    session its as_of is provisionally today (enough to check definitions)."""
    meta = _lake_meta(lake, spark)
    where = lakefs.join(lake, LAKE_MARKER)
    if meta and "as_of" in meta:
        try:
            return dt.date.fromisoformat(meta["as_of"]), f"from {where}"
        except (TypeError, ValueError):
            raise LakeError(f"lake {lake}: as_of {meta['as_of']!r} is not a date") from None
    today = today or dt.datetime.now(dt.UTC).date()
    if lakefs.is_uri(lake) and spark is None:
        return today, f"provisional: {where} is read once Spark runs"
    return today, f"today (UTC): no as_of in {where}"


def base_params(
    lake: Path | str, today: dt.date | None = None, *, spark: SparkSession | None = None
) -> dict[str, ParamValue]:
    """Parameters every definition can use: `as_of` (see lake_as_of)."""
    return {"as_of": lake_as_of(lake, today, spark=spark)[0]}


def load_segments(
    lake: Path | str,
    definitions: Path | str,
    overrides: Mapping[str, ParamValue] | None = None,
    *,
    spark: SparkSession | None = None,
) -> list[Segment]:
    """Everything that can be checked without Spark (`spark`: see base_params)."""
    return load(definitions, base_params(lake, spark=spark), overrides)


def _table_dirs(spark: SparkSession, lake: Path | str) -> list[tuple[str, str]]:
    """(name, location) of every table directory of the lake, sorted by name."""
    if lakefs.is_uri(lake):
        try:
            names = lakefs.HadoopDir(spark, str(lake)).subdirectories()
        except lakefs.LakeAccessError as e:
            hint = " (Hadoop's S3 file system is s3a://)" if lakefs.scheme(lake) == "s3" else ""
            raise LakeError(f"lake {e}{hint}") from None
        return [(n, lakefs.join(lake, n)) for n in names if lakefs.TABLE_NAME.match(n)]
    root = Path(lake)
    if not root.is_dir():
        raise LakeError(f"lake {root} is not a directory")
    return [(child.name, str(child)) for child in sorted(root.iterdir())
            if child.is_dir() and lakefs.TABLE_NAME.match(child.name)]  # fmt: skip


def register_views(spark: SparkSession, lake: Path | str) -> list[str]:
    """A temp view per table directory of the lake (partitions discovered from dt=... dirs);
    a CDC changelog's view is the collection's current state (compute/changelog.py)."""
    from pyspark.errors import PySparkException

    tables = _table_dirs(spark, lake)
    meta = _lake_meta(lake, spark) or {}
    generated = meta.get("format") == LAKE_FORMAT and meta.get("generator") == GENERATOR
    names = []
    for name, location in tables:
        reader = spark.read
        if generated and name in SCHEMAS:
            reader = reader.schema(spark_ddl(name))  # known: skip the inference job
        try:
            table = reader.parquet(location)
            if changelog.is_changelog(table):  # a CDC table written by seg-compute sink
                table = changelog.current_state(spark, table)
            table.createOrReplaceTempView(name)
        except PySparkException as e:
            raise LakeError(f"lake table {location}: {first_line(e)}") from None
        names.append(name)
    if not names:
        raise LakeError(f"lake {lake} has no tables (subdirectories of Parquet files)")
    return names


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error message (Spark's carry plans and stack traces)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _is_integer_type(data_type: object) -> bool:
    from pyspark.sql.types import ByteType, DecimalType, IntegerType, LongType, ShortType

    if isinstance(data_type, ByteType | ShortType | IntegerType | LongType):
        return True
    # Spark has no unsigned 64-bit type; decimal(20,0) is how it reads a uint64 column.
    return isinstance(data_type, DecimalType) and data_type.scale == 0 and data_type.precision <= 20


def analyze(spark: SparkSession, segment: Segment) -> DataFrame:
    """Parse and analyze the segment's query (no data is read) and check its result schema.

    The SQL is wrapped as a subquery so only a query is accepted: DDL and other commands,
    which Spark would run eagerly, fail to parse instead.
    """
    from pyspark.errors import PySparkException

    sql = segment.sql.strip().rstrip(";").rstrip()
    try:
        df = spark.sql(f"SELECT * FROM ({sql}\n) AS segment_query")
    except PySparkException as e:
        raise DefinitionError(f"invalid SQL: {first_line(e)}", segment.name) from None
    fields = df.schema.fields
    if len(fields) != 1 or fields[0].name != "user_id":
        got = ", ".join(f.name for f in fields) or "none"
        raise DefinitionError(
            f"the query must return exactly one column named user_id, got: {got}", segment.name
        )
    if not _is_integer_type(fields[0].dataType):
        raise DefinitionError(
            f"user_id must be an integer type, got {fields[0].dataType.simpleString()}",
            segment.name,
        )
    return df


def evaluate(
    segments: Sequence[Segment],
    frames: Sequence[DataFrame],
    on_segment: Callable[[SegmentResult], None] | None = None,
    *,
    one_pass: bool = True,
    merged: bool = True,
) -> dict[str, BitMap64]:
    """Every segment's members in order. `one_pass`: one Spark job for all of them, with the
    simple segments over one view merged into one query when `merged` (compute/merge.py);
    else one job per segment, one after another."""
    if not one_pass:
        bitmaps: dict[str, BitMap64] = {}
        for segment, df in zip(segments, frames, strict=True):
            t0 = time.perf_counter()
            bitmap = bitmaps[segment.name] = segment_bitmap(df, segment.name)
            if on_segment:
                on_segment(SegmentResult(segment.name, len(bitmap), time.perf_counter() - t0))
        return bitmaps
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    t0 = time.perf_counter()
    names = [s.name for s in segments]
    written = [Source(df, (name,)) for df, name in zip(frames, names, strict=True)]
    plan = merge.plan(segments, frames) if merged else merge.Plan(written, {}, {})
    try:
        # the merged pass's failure is handled below: it logs nothing
        with quiet_task_failures(frames[0].sparkSession) if plan.merged else nullcontext():
            bitmaps = merge.bitmaps(plan, names)
    except (PySparkException, Py4JError):
        if not plan.merged:
            raise
        # A merged query evaluates each segment's WHERE on the rows of the others (beyond its
        # own partition pruning), where an ANSI error (a bad cast, a division by zero) can
        # stop it: the queries as written decide.
        bitmaps = source_bitmaps(written, names)
    seconds = time.perf_counter() - t0
    if on_segment:
        for name, bitmap in bitmaps.items():
            on_segment(SegmentResult(name, len(bitmap), seconds))
    return bitmaps


@contextmanager
def cached_views(
    spark: SparkSession,
    segments: Sequence[Segment],
    views: Sequence[str],
    frames: Sequence[DataFrame],
    *,
    prune_columns: bool = True,
) -> Iterator[list[DataFrame]]:
    """The segments' frames over cached views while the block runs (lazily: MEMORY_AND_DISK,
    built by the first job that reads them), so the queries of one pass share one scan of each
    table's files. `prune_columns`: each view read by a query is narrowed to the columns the
    queries read (compute/pruning.py) and the queries analyzed again over it; a view no query
    reads is not cached. Else every view is cached whole (as before). The full views are
    registered again afterwards."""
    from pyspark.errors import PySparkException

    originals = {name: spark.table(name) for name in views}
    cached = list(views)
    if prune_columns:
        read = columns_read(frames, views)
        cached = [name for name in views if read.get(name)]
        for name in cached:
            table = originals[name]
            table.select(*[c for c in table.columns if c in read[name]]).createOrReplaceTempView(
                name
            )
        try:
            frames = [analyze(spark, segment) for segment in segments]
        except (DefinitionError, PySparkException):
            _register(originals)  # a read this module did not foresee: cache whole tables
            cached = list(views)
    for name in cached:
        spark.catalog.cacheTable(name)
    try:
        yield list(frames)
    finally:
        for name in cached:
            spark.catalog.uncacheTable(name)
        _register(originals)


def _register(frames: Mapping[str, DataFrame]) -> None:
    for name, frame in frames.items():
        frame.createOrReplaceTempView(name)


@contextmanager
def prepared(
    spark: SparkSession,
    lake: Path | str,
    segments: Sequence[Segment],
    *,
    one_pass: bool = True,
    prune_columns: bool = True,
    cache: bool = False,
) -> Iterator[list[DataFrame]]:
    """The segments' analyzed frames over the lake's views (nothing runs unless all analyze);
    for one pass with `cache`, over the cached views while the block runs (`cached_views`)."""
    views = register_views(spark, lake)
    frames = [analyze(spark, segment) for segment in segments]
    if not one_pass or not cache:
        yield frames
        return
    with cached_views(spark, segments, views, frames, prune_columns=prune_columns) as frames:
        yield frames


def compute(
    spark: SparkSession,
    lake: Path | str,
    segments: Sequence[Segment],
    on_segment: Callable[[SegmentResult], None] | None = None,
    *,
    one_pass: bool = True,
    prune_columns: bool = True,
    cache: bool = False,
    merged: bool = True,
) -> dict[str, BitMap64]:
    """Every segment's members, in definition order (`prepared`, then `evaluate`)."""
    with prepared(
        spark, lake, segments, one_pass=one_pass, prune_columns=prune_columns, cache=cache
    ) as frames:
        return evaluate(segments, frames, on_segment, one_pass=one_pass, merged=merged)


def run_batch(
    spark: SparkSession,
    lake: Path | str,
    segments: Sequence[Segment],
    out: Path | str,
    on_segment: Callable[[SegmentResult], None] | None = None,
    *,
    one_pass: bool = True,
) -> BatchResult:
    """Compute every segment (see `evaluate`) and write the segment set to `out` (atomically)."""
    t0 = time.perf_counter()
    computed_at = dt.datetime.now(dt.UTC)
    results: list[SegmentResult] = []

    def record(result: SegmentResult) -> None:
        results.append(result)
        if on_segment:
            on_segment(result)

    with prepared(spark, lake, segments, one_pass=one_pass) as frames:
        prepare_seconds = time.perf_counter() - t0
        bitmaps = evaluate(segments, frames, record, one_pass=one_pass)
    t_write = time.perf_counter()
    write_segment_set(out, bitmaps, computed_at, {s.name: s.options() for s in segments})
    now = time.perf_counter()
    evaluated = t_write - t0 - prepare_seconds
    return BatchResult(
        Path(out),
        computed_at,
        results,
        now - t0,
        prepare_seconds,
        now - t_write,
        evaluated,
        one_pass,
    )
