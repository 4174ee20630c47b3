"""`seg-compute`: the compute jobs' command line (gen-data, gen-events, batch, stream; cdc to
come).

Every option can also be given as an environment variable SEG_<OPTION> (`--orders-per-user`
is SEG_ORDERS_PER_USER); the command line wins. Exit status: 0 on success, 2 for usage and
definition errors, 1 for anything else, always with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from sidecar.transport.base import Transport

PROG = "seg-compute"


class UsageError(Exception):
    """Bad command-line or environment input (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def env_name(flag: str) -> str:
    return "SEG_" + flag.lstrip("-").upper().replace("-", "_")


def _typed(convert: Callable[[str], Any], expected: str, flag: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(
                f"expected {expected}, got {text!r} (from {flag} or {env_name(flag)})"
            ) from None

    parse.__name__ = expected
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_YES, _NO = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


def _yes_no(text: str) -> bool:
    word = text.strip().lower()
    if word not in _YES + _NO:
        raise ValueError(text)
    return word in _YES


def _local_path(text: str) -> Path:
    from compute.lakefs import is_uri

    if is_uri(text):
        raise ValueError(text)
    return Path(text)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    help: str,
    *,
    convert: Callable[[str], Any] = str,
    expected: str = "a value",
    default: Any = None,
    required: bool = False,
    metavar: str | None = None,
) -> None:
    """An option that falls back to the environment variable SEG_<OPTION>."""
    env = env_name(flag)
    from_env = os.environ.get(env)
    shown = f" (default: {default})" if default is not None else ""
    if from_env:
        default, required = from_env, False  # argparse converts string defaults with `type`
    parser.add_argument(
        flag,
        type=_typed(convert, expected, flag),
        default=default,
        required=required,
        metavar=metavar,
        help=f"{help}{shown} [env: {env}]",
    )


def _add_gen_data(sub: argparse._SubParsersAction) -> None:
    from compute import lake

    p = sub.add_parser(
        "gen-data",
        help="write a synthetic e-commerce data lake (Parquet)",
        description="Write a deterministic synthetic data lake: users, orders and events "
        "(orders and events partitioned by dt=YYYY-MM-DD), plus DIR/_lake.json. "
        "An existing lake at DIR is replaced atomically.",
    )
    _option(p, "--out", "the lake directory to write (local; copy it to S3 to use an s3a:// "
            "lake)", convert=_local_path, expected="a local path, not a URI", required=True,
            metavar="DIR")  # fmt: skip
    _option(p, "--users", "number of users", convert=_positive_int,
            expected="a positive integer", required=True, metavar="N")  # fmt: skip
    _option(p, "--seed", "random seed (same seed and options, same bytes)",
            convert=_non_negative_int, expected="a non-negative integer",
            default=lake.DEFAULT_SEED, metavar="S")  # fmt: skip
    _option(p, "--days", "days of orders and events, ending the day before --as-of",
            convert=_positive_int, expected="a positive integer", default=lake.DEFAULT_DAYS,
            metavar="D")  # fmt: skip
    _option(p, "--orders-per-user", "mean orders per user over the whole period",
            convert=_non_negative_float, expected="a non-negative number",
            default=lake.DEFAULT_ORDERS_PER_USER, metavar="F")  # fmt: skip
    _option(p, "--events-per-user", "mean page-view and cart events per user",
            convert=_non_negative_float, expected="a non-negative number",
            default=lake.DEFAULT_EVENTS_PER_USER, metavar="F")  # fmt: skip
    _option(p, "--as-of", "the lake's 'now': data ends at midnight UTC starting this day",
            convert=dt.date.fromisoformat, expected="a date YYYY-MM-DD",
            default=lake.DEFAULT_AS_OF, metavar="YYYY-MM-DD")  # fmt: skip
    p.set_defaults(run=_run_gen_data)


def _add_batch(sub: argparse._SubParsersAction) -> None:
    from compute import definitions, lakefs, spark

    p = sub.add_parser(
        "batch",
        help="compute segments over the lake and write a segment-set directory",
        description="Evaluate every [[segment]] of a definitions file with Spark (local mode) "
        "over the lake's tables and write the segment-set directory (manifest.json plus one "
        "BitMap64 file per segment), replacing an existing set at DIR atomically. "
        f"Example definitions: {definitions.EXAMPLE}",
    )
    _option(p, "--lake", "the data lake: a directory or an s3a://bucket/prefix URI (one "
            "subdirectory of Parquet per table)", convert=lakefs.lake_arg,
            expected="a path or URI", required=True, metavar="DIR|URI")  # fmt: skip
    _option(p, "--definitions", "the segment definitions (TOML)", convert=Path,
            expected="a path", required=True, metavar="FILE")  # fmt: skip
    _option(p, "--out", "the segment-set directory to write (default with a --publish-* "
            "option: a temporary one)", convert=Path, expected="a path", metavar="DIR")  # fmt: skip
    from compute.publish_target import add_publish_options

    add_publish_options(p, aerospike=True)
    _option(p, "--as-of", "the as_of parameter (default: the lake's _lake.json as_of, else "
            "today UTC)", convert=dt.date.fromisoformat, expected="a date YYYY-MM-DD",
            metavar="YYYY-MM-DD")  # fmt: skip
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="override a definitions parameter, repeatable; wins over the file "
        "[env: SEG_PARAM, comma-separated NAME=VALUE list, applied before the command line]",
    )  # fmt: skip
    _option(p, "--master", "Spark master", default=spark.DEFAULT_MASTER, metavar="URL")
    _option(p, "--shuffle-partitions", "spark.sql.shuffle.partitions", convert=_positive_int,
            expected="a positive integer", default=spark.DEFAULT_SHUFFLE_PARTITIONS,
            metavar="N")  # fmt: skip
    _option(p, "--driver-memory", "spark.driver.memory", default="2g", metavar="SIZE")
    _option(p, "--s3-endpoint", "s3a lake: an S3-compatible endpoint such as "
            "http://127.0.0.1:9000 (http:// turns TLS off); credentials come from "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", metavar="URL")  # fmt: skip
    _option(p, "--s3-path-style", "s3a lake: path-style requests (host/bucket/key); default: "
            "yes with --s3-endpoint, else no", convert=_yes_no, expected="yes or no",
            metavar="yes|no")  # fmt: skip
    _option(p, "--s3-region", "s3a lake: the signing region (default: AWS_REGION, "
            "AWS_DEFAULT_REGION, else us-east-1 with --s3-endpoint)",
            metavar="REGION")  # fmt: skip
    p.set_defaults(run=_run_batch)


def _add_stub(sub: argparse._SubParsersAction, name: str, what: str) -> None:
    p = sub.add_parser(name, help=f"{what} (not implemented yet)", description=what)
    p.set_defaults(run=lambda args: _not_implemented(name))


def _not_implemented(name: str) -> int:
    raise UsageError(f"{name} is not implemented yet")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Spark jobs of the segment platform.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)  # fmt: skip
    from compute import stream_cli

    _add_gen_data(sub)
    stream_cli.add_gen_events(sub)
    _add_batch(sub)
    stream_cli.add_stream(sub)
    _add_stub(sub, "cdc", "segments from MongoDB change streams")
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
        raise UsageError(str(e)) from None
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

    items = [s for s in os.environ.get("SEG_PARAM", "").split(",") if s.strip()]
    overrides: dict[str, Any] = {}
    for item in [*items, *args.param]:
        try:
            name, value = parse_assignment(item)
        except ValueError as e:
            raise UsageError(f"--param: {e}") from None
        overrides[name] = value
    if args.as_of is not None:
        overrides["as_of"] = args.as_of
    return overrides


def _lake_conf(args: argparse.Namespace) -> dict[str, str]:
    """Spark settings for a URI lake: the s3a jars and fs.s3a settings for s3a://."""
    from compute import lakefs

    scheme = lakefs.scheme(args.lake)
    if scheme == "s3":
        raise UsageError(f"--lake {args.lake}: Hadoop reads S3 as s3a://, not s3://")
    if scheme != "s3a":
        return {}  # another Hadoop file system (file://, hdfs://): Spark's defaults
    s3 = lakefs.S3Settings(args.s3_endpoint, args.s3_path_style, args.s3_region)
    if s3.endpoint:
        lakefs.check_endpoint(s3.endpoint)
    return lakefs.s3a_conf(s3)  # may fetch the jars with Maven (once)


def _run_batch(args: argparse.Namespace) -> int:
    from compute import batch, lakefs
    from compute.definitions import load
    from compute.fsutil import check_replaceable
    from compute.segment_set import MANIFEST
    from compute.spark import build_session

    t0 = time.perf_counter()
    remote = lakefs.is_uri(args.lake)
    if not remote and not args.lake.is_dir():
        raise UsageError(f"--lake {args.lake}: not a directory")
    overrides = _overrides(args)
    from compute.publish_target import publish_transport

    transport = publish_transport(args, required=False)
    if args.out is None and transport is None:
        raise UsageError("give --out DIR, or --publish-kafka / --publish-log-dir to publish")
    if args.out is None:
        import tempfile

        args.out = Path(tempfile.mkdtemp(prefix="seg-batch-")) / "segments"
    # A URI lake's _lake.json is read through Spark: until then as_of is provisional (today),
    # which is enough to check the definitions before paying for Spark.
    segments = batch.load_segments(args.lake, args.definitions, overrides)
    check_replaceable(args.out.absolute(), MANIFEST, "segment set")  # before paying for Spark
    conf = {"spark.driver.memory": args.driver_memory, **_lake_conf(args)}
    print(f"{len(segments)} segment(s) from {args.definitions}; starting Spark ({args.master})",
          file=sys.stderr, flush=True)  # fmt: skip
    from pyspark.sql import SparkSession

    ours = SparkSession.getActiveSession() is None  # an embedding caller keeps its session
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
        result = batch.run_batch(spark, args.lake, segments, args.out, show)
    finally:
        if ours:
            spark.stop()
    print(
        f"{len(result.segments)} segments, {result.memberships:,} memberships, "
        f"{time.perf_counter() - t0:.1f} s total ({startup:.1f} s Spark start-up, "
        f"{result.prepare_seconds:.1f} s views and analysis, "
        f"{sum(r.seconds for r in result.segments):.1f} s segments, "
        f"{result.write_seconds:.1f} s write) -> {args.out}"
    )
    if transport is not None:
        _publish(args, transport)
    return 0


def _publish(args: argparse.Namespace, transport: Transport) -> None:
    """Publish the segment set just written, through the publisher's API (the same input
    validation and diff as seg-publish)."""
    from publisher import Publisher, read_segment_set

    sink = None
    if args.publish_aerospike:
        from publisher.aerospike_sink import AerospikeSink

        sink = AerospikeSink.connect(args.publish_aerospike)
    desired = read_segment_set(args.out).segments
    result = Publisher(transport, sink=sink).publish(desired)
    print(f"published to {transport.describe()}: {result.summary()}")


def _one_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    from compute.definitions import DefinitionError

    try:
        return int(args.run(args))
    except (UsageError, DefinitionError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the contract is a one-line reason, not a trace
        # Our own errors (LakeError, OutputError, ...) carry a reason; others get their type.
        ours = type(e).__module__.startswith("compute.")
        reason = _one_line(e) if ours else f"{type(e).__name__}: {_one_line(e)}"
        print(f"{prog}: error: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
