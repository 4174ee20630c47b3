"""The `cdc` and `sink` subcommands of `seg-compute` (wired in by compute/cli.py)."""

from __future__ import annotations

import argparse

from sidecar.cliutil import arg_type, positive_float, positive_int


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
        "See compute/README.md.",
    )
    opt = p.add_argument
    opt("--mongo", required=True, metavar="URI",
        help="MongoDB connection string (a replica set: change streams need one)")  # fmt: skip
    opt("--db", type=_db_name, required=True, metavar="D", help="the database")
    opt("--collections", type=names, required=True, metavar="C1,C2",
        help="the collections to capture, comma-separated")  # fmt: skip
    opt("--cdc-kafka", required=True, metavar="HOST:PORT",
        help="Kafka bootstrap servers of the CDC topics")  # fmt: skip
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
        fresh_copy=args.fresh_copy, batch_size=args.batch_size,
        progress_seconds=args.progress_seconds,
    )  # fmt: skip
    return cdc.run(opts)
