"""`seg-compute`: the compute jobs' command line (gen-data, gen-events, batch, stream, cdc,
sink).

Every option can also be given as an environment variable SEG_<OPTION> (`--orders-per-user`
is SEG_ORDERS_PER_USER); the command line wins (sidecar/cliutil.py has the rules). Exit
status: 0 on success, 2 for usage and definition errors (and when the `compute` extra is not
installed), 1 for anything else, always with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compute import lakefs, publish_target, sources_cli, stream_cli
from sidecar.cliutil import (
    FAILURE,
    USAGE,
    CommandError,
    Parser,
    arg_type,
    directory,
    exits_on_error,
    iso_date,
    missing_extra,
    non_negative_float,
    non_negative_int,
    positive_int,
    report,
    yes_no,
)

if TYPE_CHECKING:
    from sidecar.transport.base import Transport

PROG = "seg-compute"
EXTRA = "compute"  # the optional dependencies every subcommand needs


@arg_type("a local path, not a URI")
def _local_path(text: str) -> Path:
    if lakefs.is_uri(text):
        raise ValueError(text)
    return Path(text)


def _out_directory(text: str) -> Path:
    """--out of batch: a directory written in, a file in the way a usage error at once."""
    return Path(directory(text))


def _local_directory(text: str) -> Path:
    """--out of gen-data: a local directory (not a URI), a file in the way a usage error."""
    return Path(directory(str(_local_path(text))))


lake_arg = arg_type("a path or URI")(lakefs.lake_arg)


def _add_gen_data(sub: argparse._SubParsersAction) -> None:
    from compute import lake

    p = sub.add_parser(
        "gen-data",
        help="write a synthetic e-commerce data lake (Parquet)",
        description="Write a deterministic synthetic data lake: users, orders and events "
        "(orders and events partitioned by dt=YYYY-MM-DD), plus DIR/_lake.json. "
        "An existing lake at DIR is replaced atomically.",
    )
    opt = p.add_argument
    opt(
        "--out",
        type=_local_directory,
        required=True,
        metavar="DIR",
        help="the lake directory to write (local; copy it to S3 to use an s3a:// lake)",
    )
    opt("--users", type=positive_int, required=True, metavar="N", help="number of users")
    opt(
        "--seed",
        type=non_negative_int,
        default=lake.DEFAULT_SEED,
        metavar="S",
        help="random seed (same seed and options, same bytes)",
    )
    opt(
        "--days",
        type=positive_int,
        default=lake.DEFAULT_DAYS,
        metavar="D",
        help="days of orders and events, ending the day before --as-of",
    )
    opt(
        "--orders-per-user",
        type=non_negative_float,
        default=lake.DEFAULT_ORDERS_PER_USER,
        metavar="F",
        help="mean orders per user over the whole period",
    )
    opt(
        "--events-per-user",
        type=non_negative_float,
        default=lake.DEFAULT_EVENTS_PER_USER,
        metavar="F",
        help="mean page-view and cart events per user",
    )
    opt(
        "--as-of",
        type=iso_date,
        default=lake.DEFAULT_AS_OF,
        metavar="YYYY-MM-DD",
        help="the lake's 'now': data ends at midnight UTC starting this day",
    )
    p.set_defaults(run=_run_gen_data)


def add_s3_options(p: argparse.ArgumentParser) -> None:
    """The s3a settings of a lake (batch, sink); `lake_conf` turns them into Spark's."""
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="s3a lake: an S3-compatible endpoint such as "
        "http://127.0.0.1:9000 (http:// turns TLS off); credentials come from "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    )
    p.add_argument(
        "--s3-path-style",
        type=yes_no,
        metavar="yes|no",
        help="s3a lake: path-style "
        "requests (host/bucket/key); default: yes with --s3-endpoint, else no",
    )
    p.add_argument(
        "--s3-region",
        metavar="REGION",
        help="s3a lake: the signing region (default: "
        "AWS_REGION, AWS_DEFAULT_REGION, else us-east-1 with --s3-endpoint)",
    )


def _add_batch(sub: argparse._SubParsersAction) -> None:
    from compute import definitions, spark

    p = sub.add_parser(
        "batch",
        help="compute segments over the lake and write a segment-set directory",
        description="Evaluate every [[segment]] of a definitions file with Spark (local mode) "
        "over the lake's tables and write the segment-set directory (manifest.json plus one "
        "BitMap64 file per segment), replacing an existing set at DIR atomically. In local "
        "mode the first run also builds the driver JVM's class-data archive under "
        ".cache/spark-cds (once, about a minute; later start-ups ~5 s faster; "
        "SEG_SPARK_CDS=0: none), and the driver JVM runs with a leaner JIT "
        "(SEG_SPARK_LEAN_JIT=0: the JVM's own; compute/BATCH.md). "
        f"Example definitions: {definitions.EXAMPLE}",
    )
    opt = p.add_argument
    opt(
        "--lake",
        type=lake_arg,
        required=True,
        metavar="DIR|URI",
        help="the data lake: a directory or an s3a://bucket/prefix URI (one subdirectory of "
        "Parquet per table)",
    )
    opt(
        "--definitions",
        type=Path,
        required=True,
        metavar="FILE",
        help="the segment definitions (TOML)",
    )
    opt(
        "--out",
        type=_out_directory,
        metavar="DIR",
        help="the segment-set directory to write "
        "(default with a --publish-* option: a temporary one)",
    )
    publish_target.add_publish_options(p, required=False, aerospike=True)
    opt(
        "--as-of",
        type=iso_date,
        metavar="YYYY-MM-DD",
        help="the as_of parameter (default: the lake's _lake.json as_of, else today UTC)",
    )
    opt(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="override a definitions parameter, repeatable; wins over the file",
    )
    opt(
        "--per-segment",
        action="store_true",
        help="run each segment as its own Spark job over the lake's files, one after another "
        "(the slower way before one pass, and before merging the simple segments)",
    )
    spark.add_options(p)
    add_s3_options(p)
    p.set_defaults(run=_run_batch)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Spark jobs of the segment platform.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_gen_data(sub)
    stream_cli.add_gen_events(sub)
    _add_batch(sub)
    stream_cli.add_stream(sub)
    sources_cli.add_cdc(sub)
    sources_cli.add_sink(sub)
    return parser


def _run_gen_data(args: argparse.Namespace) -> int:
    from compute.lake import LakeParams, generate

    try:
        params = LakeParams(
            users=args.users, seed=args.seed, days=args.days,
            orders_per_user=args.orders_per_user, events_per_user=args.events_per_user,
            as_of=args.as_of,
        )  # fmt: skip
    except ValueError as e:
        raise CommandError(str(e)) from None
    t0 = time.perf_counter()
    meta = generate(args.out, params)
    rows = meta["rows"]
    print(
        f"wrote {args.out}: {rows['users']:,} users, {rows['orders']:,} orders, "
        f"{rows['events']:,} events, as of {meta['as_of']} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from compute.definitions import parse_assignment

    overrides: dict[str, Any] = {}
    for item in args.param:
        try:
            name, value = parse_assignment(item)
        except ValueError as e:
            raise CommandError(f"--param: {e}") from None
        overrides[name] = value
    if args.as_of is not None:
        overrides["as_of"] = args.as_of
    return overrides


def lake_conf(args: argparse.Namespace) -> dict[str, str]:
    """Spark settings for a URI lake: the s3a jars and fs.s3a settings for s3a://."""
    scheme = lakefs.scheme(args.lake)
    if scheme == "s3":
        raise CommandError(f"--lake {args.lake}: Hadoop reads S3 as s3a://, not s3://")
    if scheme != "s3a":
        return {}  # another Hadoop file system (file://, hdfs://): Spark's defaults
    s3 = lakefs.S3Settings(args.s3_endpoint, args.s3_path_style, args.s3_region)
    if s3.endpoint:
        lakefs.check_endpoint(s3.endpoint)
    return lakefs.s3a_conf(s3)  # may fetch the jars with Maven (once)


def _run_batch(args: argparse.Namespace) -> int:
    from compute import batch
    from compute.definitions import load
    from compute.fsutil import check_replaceable
    from compute.segment_set import MANIFEST
    from compute.spark import build_session, ensure_cds_archive

    t0 = time.perf_counter()
    remote = lakefs.is_uri(args.lake)
    if not remote and not args.lake.is_dir():
        raise CommandError(f"--lake {args.lake}: not a directory")
    overrides = _overrides(args)
    transport = publish_target.publish_transport(args, required=False)
    if args.out is None and transport is None:
        raise CommandError("give --out DIR, or --publish-kafka / --publish-log-dir to publish")
    if args.out is None:
        import tempfile

        args.out = Path(tempfile.mkdtemp(prefix="seg-batch-")) / "segments"
    # A URI lake's _lake.json is read through Spark: until then as_of is provisional (today),
    # which is enough to check the definitions before paying for Spark.
    segments = batch.load_segments(args.lake, args.definitions, overrides)
    check_replaceable(args.out.absolute(), MANIFEST, "segment set")  # before paying for Spark
    conf = {"spark.driver.memory": args.driver_memory, **lake_conf(args)}
    print(f"{len(segments)} segment(s) from {args.definitions}; starting Spark ({args.master})",
          file=sys.stderr, flush=True)  # fmt: skip
    from pyspark.sql import SparkSession

    ours = SparkSession.getActiveSession() is None  # an embedding caller keeps its session
    if ours and args.master.startswith("local"):  # built on first use: ~5 s off each start-up
        ensure_cds_archive(lambda line: print(line, file=sys.stderr, flush=True))
    spark = build_session(master=args.master, shuffle_partitions=args.shuffle_partitions,
                          conf=conf)  # fmt: skip
    startup = time.perf_counter() - t0
    width = max(len(s.name) for s in segments)

    def show(result: batch.SegmentResult) -> None:
        print(f"{result.name:<{width}}  {result.cardinality:>12,}  {result.seconds:7.2f} s",
              flush=True)  # fmt: skip

    try:
        if remote and "as_of" not in overrides:  # now read _lake.json
            as_of, source = batch.lake_as_of(args.lake, spark=spark)
            print(f"as_of {as_of} ({source})", file=sys.stderr, flush=True)
            segments = load(args.definitions, {"as_of": as_of}, overrides)
        one_pass = not args.per_segment
        result = batch.run_batch(spark, args.lake, segments, args.out, show, one_pass=one_pass)
    finally:
        if ours:
            spark.stop()
    print(
        f"{len(result.segments)} segments, {result.memberships:,} memberships, "
        f"{time.perf_counter() - t0:.1f} s total ({startup:.1f} s Spark start-up, "
        f"{result.prepare_seconds:.1f} s views and analysis, "
        f"{result.evaluate_seconds:.1f} s segments{' (one pass)' if one_pass else ''}, "
        f"{result.write_seconds:.1f} s write) -> {args.out}"
    )
    if transport is not None:
        _publish(args, transport)
    return 0


def _publish(args: argparse.Namespace, transport: Transport) -> None:
    """Publish the segment set just written, through the publisher's API (the same input
    validation and diff as seg-publish)."""
    from publisher import Publisher, read_segment_set
    from publisher.guard import Guard, GuardError
    from sidecar.cliutil import aerospike_target_from_args

    sink = None
    target = aerospike_target_from_args(args, prefix="publish-")
    if target is not None:
        from publisher.aerospike_sink import AerospikeSink

        sink = AerospikeSink.connect(target)
    segment_set = read_segment_set(args.out)
    try:
        result = Publisher(transport, sink=sink, guard=Guard()).publish(
            segment_set.segments,
            min_cardinality=segment_set.min_cardinality,
            max_age=segment_set.max_age,
            ttl=segment_set.ttl,
        )
    except GuardError as exc:  # the set stays in --out: seg-publish --input OUT --force
        raise CommandError(f"{exc}; the segment set is in {args.out}", USAGE) from None
    print(f"published to {transport.describe()}: {result.summary()}")


def main(argv: Sequence[str] | None = None) -> int:
    with exits_on_error(PROG, extra=EXTRA):  # the subcommands' modules need the extra
        parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    from compute.definitions import DefinitionError

    try:
        return int(args.run(args))
    except CommandError as e:
        return report(prog, str(e), e.code)
    except DefinitionError as e:
        return report(prog, str(e), USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the contract is a one-line reason, not a trace
        extra = missing_extra(e, EXTRA) if isinstance(e, ModuleNotFoundError) else None
        if extra is not None:
            return report(prog, extra, USAGE)
        # Our own errors (LakeError, OutputError, ...) carry a reason; others get their type.
        ours = type(e).__module__.startswith("compute.")
        reason = str(e).strip() if ours else f"{type(e).__name__}: {str(e).strip()}"
        return report(prog, reason or type(e).__name__, FAILURE)


if __name__ == "__main__":
    sys.exit(main())
