"""The `cdc` and `sink` subcommands of `seg-compute` (wired in by compute/cli.py)."""

from __future__ import annotations

import argparse

from sidecar.cliutil import arg_type, kafka_client_settings, key_value, positive_float, positive_int


@arg_type("a comma-separated list of distinct names")
def names(text: str) -> tuple[str, ...]:
    items = tuple(n.strip() for n in text.split(",") if n.strip())
    if not items or len(set(items)) != len(items):
        raise ValueError(text)
    return items


@arg_type("a database name")
def _db_name(text: str) -> str:
    if not text or any(c in text for c in './\\ "$\0'):
        raise ValueError(text)
    return text


def add_cdc(sub: argparse._SubParsersAction) -> None:
    from compute import cdc

    p = sub.add_parser(
        "cdc",
        help="MongoDB change streams -> Kafka (the MongoDB source connector's topics and shape)",
        description="Copy the existing documents of the collections, then stream their changes "
        "(insert, update with the current document, replace, delete) from a resume point taken "
        "before the copy, into topics PREFIX.DB.COLLECTION in the official MongoDB Kafka source "
        'connector\'s shape (key {"_id": <event _id>}, value: the change event, relaxed '
        "extended JSON). Each Kafka transaction carries a batch of changes and the resume "
        "token after them, so a restart (even after kill -9) neither loses nor repeats a "
        "change for read_committed readers. A dropped or renamed collection stops the job "
        "(exit 1); so does a resume token MongoDB no longer has (then --fresh-copy). "
        "See compute/SOURCES.md.",
    )
    opt = p.add_argument
    opt("--mongo", required=True, metavar="URI",
        help="MongoDB connection string (a replica set: change streams need one)")  # fmt: skip
    opt("--db", type=_db_name, required=True, metavar="D", help="the database")
    opt("--collections", type=names, required=True, metavar="C1,C2",
        help="the collections to capture, comma-separated")  # fmt: skip
    opt("--cdc-kafka", required=True, metavar="HOST:PORT",
        help="Kafka bootstrap servers of the CDC topics")  # fmt: skip
    opt("--cdc-kafka-config", action="append", type=key_value, metavar="KEY=VALUE",
        help="extra librdkafka setting (SASL, SSL, ...) of every client this job makes: the "
        "topic creation, the producer and the state reader; repeatable")  # fmt: skip
    opt("--cdc-topic-prefix", default=cdc.DEFAULT_PREFIX, metavar="P",
        help="topics are PREFIX.DB.COLLECTION; the state topic is PREFIX.offsets")  # fmt: skip
    opt("--cdc-partitions", type=positive_int, default=1, metavar="N",
        help="partitions of topics this job creates (a document's changes stay in one "
        "partition)")  # fmt: skip
    opt("--cdc-writer-id", default=cdc.DEFAULT_WRITER_ID, metavar="ID",
        help="the Kafka transactional.id (one cdc job per id: a second one fences the "
        "first)")  # fmt: skip
    opt("--fresh-copy", action="store_true",
        help="ignore the committed resume point: copy the collections again and stream from "
        "now (the way out of a lost resume token)")  # fmt: skip
    opt("--batch-size", type=positive_int, default=500, metavar="N",
        help="changes (or copied documents) per Kafka transaction at most")  # fmt: skip
    opt("--progress-seconds", type=positive_float, default=5.0, metavar="S",
        help="seconds between progress lines on stderr")  # fmt: skip
    p.set_defaults(run=run_cdc)


def run_cdc(args: argparse.Namespace) -> int:
    from compute import cdc

    opts = cdc.CdcOptions(
        mongo=args.mongo, db=args.db, collections=args.collections, kafka=args.cdc_kafka,
        topic_prefix=args.cdc_topic_prefix, partitions=args.cdc_partitions,
        writer_id=args.cdc_writer_id,
        kafka_config=kafka_client_settings(args.cdc_kafka_config, "--cdc-kafka-config"),
        fresh_copy=args.fresh_copy, batch_size=args.batch_size,
        progress_seconds=args.progress_seconds,
    )  # fmt: skip
    return cdc.run(opts)


def add_sink(sub: argparse._SubParsersAction) -> None:
    from compute import cdc, spark
    from compute.cli import add_s3_options, lake_arg

    p = sub.add_parser(
        "sink",
        help="Kafka events and CDC topics -> the lake (Parquet by date), exactly once",
        description="Write Kafka topics into the lake with Spark Structured Streaming, one "
        "Parquet table partitioned by dt=YYYY-MM-DD per topic: an events topic becomes the "
        "`events` table (gen-data's columns), a CDC topic PREFIX.DB.COLLECTION (seg-compute "
        "cdc, or Kafka Connect's MongoDB source connector) the changelog table COLLECTION, "
        "which seg-compute batch reads as the collection's current state. Exactly once "
        "through the checkpoint: restart with the same --sink-checkpoint after any stop or crash. "
        "See compute/SOURCES.md.",
    )
    opt = p.add_argument
    opt("--sink-kafka", required=True, metavar="HOST:PORT",
        help="Kafka bootstrap servers of the topics")  # fmt: skip
    opt("--sink-kafka-config", action="append", type=key_value, metavar="KEY=VALUE",
        help="a consumer property of Spark's Kafka source (Java client names: "
        "security.protocol, sasl.mechanism, sasl.jaas.config, ssl.truststore.location, ...); "
        "repeatable")  # fmt: skip
    opt("--sink-topics", type=names, required=True, metavar="T1,T2",
        help="the topics, comma-separated, each TOPIC or TOPIC=TABLE")  # fmt: skip
    opt("--lake", type=lake_arg, required=True, metavar="DIR|URI",
        help="the lake: a directory or an s3a://bucket/prefix URI")  # fmt: skip
    opt("--sink-checkpoint", type=lake_arg, required=True, metavar="DIR|URI",
        help="Spark's checkpoints (one subdirectory per table); keep it with the lake")  # fmt: skip
    opt("--cdc-topic-prefix", default=cdc.DEFAULT_PREFIX, metavar="P",
        help="topics named P.DB.COLLECTION are CDC topics (as cdc names them)")  # fmt: skip
    opt("--sink-trigger-seconds", type=positive_float, default=10.0, metavar="S",
        help="micro-batch interval")  # fmt: skip
    opt("--sink-once", action="store_true",
        help="write what the topics hold now and exit (availableNow)")  # fmt: skip
    opt("--sink-starting-offsets", choices=("earliest", "latest"), default="earliest",
        help="where a new checkpoint starts reading")  # fmt: skip
    opt("--sink-max-records-per-batch", type=positive_int, metavar="N",
        help="cap on records per micro-batch and topic")  # fmt: skip
    spark.add_options(p)
    add_s3_options(p)
    p.set_defaults(run=run_sink)


def run_sink(args: argparse.Namespace) -> int:
    import signal
    import sys

    from compute import sink, sparkjars
    from compute.cli import lake_conf
    from compute.spark import build_session
    from compute.stream import source_options
    from sidecar.cliutil import CommandError

    try:
        routes = sink.routes(args.sink_topics, args.cdc_topic_prefix)
        kafka_options = source_options(args.sink_kafka_config, "--sink-kafka-config",
                                       sink.SINK_OWNED)  # fmt: skip
    except ValueError as e:  # SinkError too
        raise CommandError(str(e)) from None
    conf = {"spark.driver.memory": args.driver_memory, **sparkjars.streaming_conf(),
            **lake_conf(args)}  # fmt: skip
    shown = ", ".join(f"{r.topic} -> {r.table} ({r.kind})" for r in routes)
    print(f"sink: {shown} in {args.lake}; starting Spark ({args.master})", file=sys.stderr,
          flush=True)  # fmt: skip
    spark = build_session(app_name="seg-compute-sink", master=args.master,
                          shuffle_partitions=args.shuffle_partitions, conf=conf)  # fmt: skip
    opts = sink.SinkOptions(
        kafka=args.sink_kafka, routes=routes, lake=args.lake, checkpoint=args.sink_checkpoint,
        trigger_seconds=args.sink_trigger_seconds, once=args.sink_once,
        starting_offsets=args.sink_starting_offsets,
        max_records_per_batch=args.sink_max_records_per_batch, kafka_options=kafka_options,
    )  # fmt: skip
    stopping: list[int] = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, _frame: stopping.append(signum))
    try:
        queries = sink.start(spark, opts)
        while any(q.isActive for q in queries) and not stopping:
            for q in queries:
                q.awaitTermination(1)
                if q.exception() is not None:
                    raise RuntimeError(f"query {q.name}: {q.exception()}")
        for q in queries:
            q.stop()  # between micro-batches: a stopped batch is redone on restart
        for q in queries:
            progress = q.lastProgress or {}
            print(f"sink: {q.name}: last batch {progress.get('batchId', '-')}, "
                  f"{progress.get('numInputRows', 0)} rows", file=sys.stderr)  # fmt: skip
    finally:
        spark.stop()
    return 0
