"""The `gen-events` and `stream` subcommands of `seg-compute` (wired in by compute/cli.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from compute.cli import UsageError, _non_negative_int, _option, _positive_int, env_name


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


def _flag(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A store-true flag that SEG_<OPTION>=1/true/yes also turns on."""
    env = env_name(flag)
    default = os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")
    parser.add_argument(flag, action="store_true", default=default, help=f"{help} [env: {env}]")


def add_gen_events(sub: argparse._SubParsersAction) -> None:
    from compute import events

    p = sub.add_parser(
        "gen-events",
        help="produce realistic click / cart / order events to Kafka at a fixed rate",
        description="Produce JSON events {user_id, type (view, add_to_cart, remove_from_cart, "
        "order), product_id, category, amount, ts (ms)} to a Kafka topic at a fixed rate, "
        "keyed by user id; creates the topic when missing. Runs for --duration seconds or "
        "--count events (else until interrupted). Progress goes to stderr.",
    )
    _option(p, "--kafka", "Kafka bootstrap servers", required=True, metavar="HOST:PORT")
    _option(p, "--topic", "the events topic", required=True, metavar="T")
    _option(p, "--rate", "events per second", convert=_positive_float,
            expected="a positive number", default=100.0, metavar="R")  # fmt: skip
    _option(p, "--duration", "stop after this many seconds", convert=_positive_float,
            expected="a positive number", metavar="S")  # fmt: skip
    _option(p, "--count", "stop after this many events", convert=_positive_int,
            expected="a positive integer", metavar="N")  # fmt: skip
    _option(p, "--users-from", "take the user ids from this lake (seg-compute gen-data)",
            convert=Path, expected="a path", metavar="LAKE")  # fmt: skip
    _option(p, "--users", "use the first N user ids gen-data --users N makes (default 10000 "
            "unless --users-from)", convert=_positive_int, expected="a positive integer",
            metavar="N")  # fmt: skip
    _option(p, "--seed", "random seed (same seed, same sequence of users and types)",
            convert=_non_negative_int, expected="a non-negative integer",
            default=events.DEFAULT_SEED, metavar="S")  # fmt: skip
    _option(p, "--partitions", "partitions when creating the topic", convert=_positive_int,
            expected="a positive integer", default=events.DEFAULT_PARTITIONS,
            metavar="N")  # fmt: skip
    p.set_defaults(run=run_gen_events)


def run_gen_events(args: argparse.Namespace) -> int:
    from compute import events

    if args.users_from is not None and args.users is not None:
        raise UsageError("give --users-from LAKE or --users N, not both")
    try:
        if args.users_from is not None:
            users = events.users_from_lake(args.users_from)
        else:
            users = events.synthetic_users(args.users or 10_000)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    partitions = events.ensure_topic(args.kafka, args.topic, args.partitions)
    limit = f"{args.count:,} events" if args.count else (
        f"{args.duration:g} s" if args.duration else "until interrupted")  # fmt: skip
    events.stderr_progress(
        f"{len(users):,} users -> {args.kafka} topic {args.topic} ({partitions} partitions), "
        f"{args.rate:g}/s, {limit}"
    )
    stream = events.generate(users, seed=args.seed, count=args.count, duration=args.duration)
    sent = events.produce(args.kafka, args.topic, stream, rate=args.rate,
                          progress=events.stderr_progress)  # fmt: skip
    print(f"{sent} events to {args.topic}")
    return 0


def add_stream(sub: argparse._SubParsersAction) -> None:
    from compute import spark

    p = sub.add_parser(
        "stream",
        help="streaming segments: Kafka events -> windowed rules -> publish",
        description="Read JSON events from Kafka with Spark Structured Streaming, evaluate the "
        "[[stream]] rules of a definitions file over event time in every micro-batch, and "
        "publish each changed segment's full membership (the publisher diffs against the log, "
        "so a replayed batch publishes nothing new). Give exactly one of --publish-kafka and "
        "--publish-log-dir. Restart with the same --checkpoint to resume exactly where it "
        "stopped. See compute/README.md.",
    )
    _option(p, "--kafka", "Kafka bootstrap servers of the events", required=True,
            metavar="HOST:PORT")  # fmt: skip
    _option(p, "--events-topic", "the events topic", required=True, metavar="T")
    _option(p, "--definitions", "definitions file with [[stream]] tables (TOML)",
            convert=Path, expected="a path", required=True, metavar="FILE")  # fmt: skip
    add_publish_options(p)
    _option(p, "--checkpoint", "Spark's checkpoint and the rules' state live here",
            convert=Path, expected="a path", required=True, metavar="DIR")  # fmt: skip
    _option(p, "--trigger-seconds", "micro-batch interval", convert=_positive_float,
            expected="a positive number", default=5.0, metavar="N")  # fmt: skip
    _flag(p, "--once", "process what is in the topic now, publish, and exit (availableNow)")
    _option(p, "--starting-offsets", "where a new checkpoint starts reading: earliest or "
            "latest", default="earliest", metavar="WHERE")  # fmt: skip
    _option(p, "--max-events-per-batch", "cap on events per micro-batch",
            convert=_positive_int, expected="a positive integer", metavar="N")  # fmt: skip
    _option(p, "--writer-id", "the publisher's transactional.id (one stream job per id)",
            default="seg-compute-stream", metavar="ID")  # fmt: skip
    _option(p, "--master", "Spark master", default=spark.DEFAULT_MASTER, metavar="URL")
    _option(p, "--shuffle-partitions", "spark.sql.shuffle.partitions", convert=_positive_int,
            expected="a positive integer", default=spark.DEFAULT_SHUFFLE_PARTITIONS,
            metavar="N")  # fmt: skip
    _option(p, "--driver-memory", "spark.driver.memory", default="2g", metavar="SIZE")
    p.set_defaults(run=run_stream)


def add_publish_options(p: argparse.ArgumentParser) -> None:
    from compute.publish_target import add_publish_options as add

    add(p)


class _Stop:
    """SIGTERM / SIGINT ask the query to stop between batches' progress checks."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = 0

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.requested, self.signal = True, signum


def run_stream(args: argparse.Namespace) -> int:
    from compute import rules, sparkjars, stream
    from compute.events import ensure_topic
    from compute.publish_target import publish_transport
    from compute.spark import build_session
    from publisher import Publisher

    transport = publish_transport(args)
    if args.starting_offsets not in ("earliest", "latest"):
        where = args.starting_offsets
        raise UsageError(f"--starting-offsets must be earliest or latest, not {where!r}")
    definitions = rules.load(args.definitions)
    args.checkpoint.mkdir(parents=True, exist_ok=True)
    jars = sparkjars.streaming_conf()
    partitions = ensure_topic(args.kafka, args.events_topic)
    say = stream.print_report
    print(f"stream: {len(definitions.rules)} rule(s) ({', '.join(definitions.names)}) from "
          f"{args.events_topic} ({partitions} partitions) -> {transport.describe()}; "
          f"starting Spark ({args.master})", file=sys.stderr, flush=True)  # fmt: skip
    spark = build_session(
        app_name="seg-compute-stream",
        master=args.master,
        shuffle_partitions=args.shuffle_partitions,
        conf={**jars, "spark.driver.memory": args.driver_memory},
    )
    job = stream.StreamJob(
        definitions,
        Publisher(transport, writer_id=args.writer_id, session=True),
        args.checkpoint,
        on_batch=say,
    )
    opts = stream.StreamOptions(
        kafka=args.kafka,
        events_topic=args.events_topic,
        checkpoint=args.checkpoint,
        trigger_seconds=args.trigger_seconds,
        once=args.once,
        starting_offsets=args.starting_offsets,
        max_events_per_batch=args.max_events_per_batch,
    )
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    _quiet_query_failures(spark)
    try:
        query = stream.start(spark, job, opts)
        try:
            while query.isActive and not stop.requested:
                query.awaitTermination(0.5)
        except Exception:
            if job.error is not None:  # say what failed in our code, not Spark's wrapper
                raise job.error from None
            raise
        if stop.requested:
            print("stream: stopping (a batch cut short is redone on restart)", file=sys.stderr)
            query.stop()
            return 128 + stop.signal
        error = query.exception()
        if error is not None:
            raise job.error or RuntimeError(str(error))
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        job.publisher.close()
        spark.stop()
    print(f"stream: done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


def _quiet_query_failures(spark: object) -> None:
    """Spark logs a failed query's whole Java and Python stack at ERROR before this command
    prints its one-line reason; silence those two loggers (best effort)."""
    try:
        jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
        level = jvm.org.apache.logging.log4j.Level.OFF
        configurator = jvm.org.apache.logging.log4j.core.config.Configurator
        for name in ("MicroBatchExecution", "StreamExecution"):
            configurator.setLevel(f"org.apache.spark.sql.execution.streaming.runtime.{name}", level)
    except Exception:  # noqa: BLE001 - logging only
        return
