"""The `gen-events` and `stream` subcommands of `seg-compute` (wired in by compute/cli.py)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from compute import publish_target
from publisher.guard import STREAM_MAX_REMOVE_FRACTION, fraction
from sidecar.cliutil import (
    CommandError,
    Parser,
    env_name,
    kafka_client_settings,
    key_value,
    non_negative_int,
    positive_float,
    positive_int,
)


def _add_events_source(p: Parser) -> None:
    """The events topic: where gen-events writes and stream reads (the same variables)."""
    group = p.add_argument_group("events")
    group.add_argument(
        "--events-kafka",
        required=True,
        metavar="HOST:PORT",
        help="Kafka bootstrap servers of the events topic",
    )
    group.add_argument("--events-topic", required=True, metavar="T", help="the events topic")
    group.add_argument(
        "--events-kafka-config",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="extra librdkafka setting (SASL, SSL, ...) of the events topic's clients: "
        "gen-events' producer, the topic's creation and check, and (derived) the stream's "
        "Spark source; repeatable",
    )


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
    opt = p.add_argument
    _add_events_source(p)
    opt("--rate", type=positive_float, default=100.0, metavar="R", help="events per second")
    opt("--duration", type=positive_float, metavar="S", help="stop after this many seconds")
    opt("--count", type=positive_int, metavar="N", help="stop after this many events")
    opt(
        "--users-from",
        type=Path,
        metavar="LAKE",
        help="take the user ids from this lake (seg-compute gen-data)",
    )
    opt(
        "--users",
        type=positive_int,
        metavar="N",
        help="use the first N user ids gen-data "
        "--users N makes (default 10000 unless --users-from)",
    )
    p.exclusive("--users-from", "--users")
    opt(
        "--seed",
        type=non_negative_int,
        default=events.DEFAULT_SEED,
        metavar="S",
        help="random seed (same seed, same sequence of users and types)",
    )
    opt(
        "--events-partitions",
        type=positive_int,
        default=events.DEFAULT_PARTITIONS,
        metavar="N",
        help="partitions when creating the events topic",
    )
    p.set_defaults(run=run_gen_events)


def run_gen_events(args: argparse.Namespace) -> int:
    from compute import events

    if args.users_from is not None and args.users is not None:
        raise CommandError("give --users-from LAKE or --users N, not both")
    try:
        if args.users_from is not None:
            users = events.users_from_lake(args.users_from)
        else:
            users = events.synthetic_users(args.users or 10_000)
    except (ValueError, OSError) as e:
        raise CommandError(str(e)) from None
    client = kafka_client_settings(args.events_kafka_config, "--events-kafka-config")
    partitions = events.ensure_topic(
        args.events_kafka, args.events_topic, args.events_partitions, client=client
    )
    limit = f"{args.count:,} events" if args.count else (
        f"{args.duration:g} s" if args.duration else "until interrupted")  # fmt: skip
    events.stderr_progress(
        f"{len(users):,} users -> {args.events_kafka} topic {args.events_topic} "
        f"({partitions} partitions), "
        f"{args.rate:g}/s, {limit}"
    )
    stream = events.generate(users, seed=args.seed, count=args.count, duration=args.duration)
    sent = events.produce(args.events_kafka, args.events_topic, stream, rate=args.rate,
                          progress=events.stderr_progress, client=client)  # fmt: skip
    print(f"{sent} events to {args.events_topic}")
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
    opt = p.add_argument
    _add_events_source(p)
    opt(
        "--definitions",
        type=Path,
        required=True,
        metavar="FILE",
        help="definitions file with [[stream]] tables (TOML)",
    )
    publish_target.add_publish_options(p, required=True)
    opt(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="DIR",
        help="Spark's checkpoint and the rules' state live here",
    )
    opt(
        "--trigger-seconds",
        type=positive_float,
        default=5.0,
        metavar="N",
        help="micro-batch interval",
    )
    opt(
        "--once",
        action="store_true",
        help="process what is in the topic now, publish, and exit (availableNow)",
    )
    opt(
        "--starting-offsets",
        choices=("earliest", "latest"),
        default="earliest",
        help="where a new checkpoint starts reading",
    )
    opt(
        "--events-source-config",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="a consumer property of Spark's Kafka source reading the events (the Java "
        "client's names: security.protocol, sasl.mechanism, sasl.jaas.config, ...); "
        "repeatable. Unless it sets security.protocol, the source's credentials and TLS "
        "are derived from --events-kafka-config's (SASL PLAIN or SCRAM, a PEM CA)",
    )
    opt(
        "--max-events-per-batch",
        type=positive_int,
        metavar="N",
        help="cap on events per micro-batch",
    )
    opt(
        "--publish-writer-id",
        default="seg-compute-stream",
        metavar="ID",
        help="the publisher's transactional.id (one stream job per id)",
    )
    opt(
        "--publish-max-remove-fraction",
        type=fraction,
        default=STREAM_MAX_REMOVE_FRACTION,
        metavar="F",
        help="refuse a micro-batch's publish removing more than this fraction of a segment "
        "(default 1: no limit, since windows empty segments legitimately; publisher/guard.py)",
    )
    spark.add_options(p)
    p.set_defaults(run=run_stream)


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
    from compute.spark import build_session
    from publisher import Publisher
    from publisher.guard import Guard

    transport = publish_target.publish_transport(args)
    definitions = rules.load(args.definitions)
    client = kafka_client_settings(args.events_kafka_config, "--events-kafka-config")
    try:
        source = stream.source_options(args.events_source_config, "--events-source-config")
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        source = stream.with_derived_security(source, client)
    except ValueError as e:
        flag = "--events-kafka-config"
        raise CommandError(
            f"{flag} ({env_name(flag)}): {e}: give Spark's Kafka source its settings with "
            "--events-source-config"
        ) from None
    args.checkpoint.mkdir(parents=True, exist_ok=True)
    jars = sparkjars.streaming_conf()
    partitions = ensure_topic(args.events_kafka, args.events_topic, client=client)
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
        Publisher(
            transport,
            writer_id=args.publish_writer_id,
            session=True,
            guard=Guard(args.publish_max_remove_fraction),
        ),
        args.checkpoint,
        on_batch=say,
    )
    opts = stream.StreamOptions(
        kafka=args.events_kafka,
        events_topic=args.events_topic,
        checkpoint=args.checkpoint,
        trigger_seconds=args.trigger_seconds,
        once=args.once,
        starting_offsets=args.starting_offsets,
        max_events_per_batch=args.max_events_per_batch,
        kafka_options=source,
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
