"""`seg-publish`: publish a segment-set directory to the log (and Aerospike)."""

from __future__ import annotations

import argparse
import logging
import sys

from sidecar.cliutil import add_log_options, apply_env_defaults, fail, transport_from_args
from sidecar.transport.base import FencedError, TransportError

from .plan import SnapshotPolicy
from .publish import Publisher
from .segment_set import InputError, read_segment_set


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seg-publish",
        description=(
            "Publish a segment-set directory: recover the current state by replaying the log, "
            "diff, write Aerospike (when given), then write the changes to the log in one "
            "transaction. Identical input publishes nothing."
        ),
    )
    parser.add_argument("--input", metavar="DIR", help="segment-set directory (manifest.json)")
    add_log_options(parser)
    parser.add_argument("--aerospike", metavar="HOST:PORT", help="also write user records here")
    parser.add_argument("--aerospike-namespace", default="test", help="Aerospike namespace")
    parser.add_argument(
        "--create-index", action="store_true", help="create the mapkeys index on bin segs"
    )
    parser.add_argument(
        "--prune", action="store_true", help="drop log segments absent from the manifest"
    )
    parser.add_argument(
        "--drop", action="append", default=[], metavar="SEGMENT", help="drop a segment; repeatable"
    )
    parser.add_argument(
        "--partitions", type=int, default=None, help="partitions when creating the topics"
    )
    parser.add_argument(
        "--writer-id",
        default="seg-publisher",
        help="transactional.id: a second publisher with the same id fences the first",
    )
    parser.add_argument(
        "--snapshot-every", type=int, default=50, help="write a snapshot every N versions"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    apply_env_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.input and not args.drop:
        fail("give --input DIR (and/or --drop SEGMENT)")
    transport = transport_from_args(args)
    try:
        desired = read_segment_set(args.input).segments if args.input else {}
    except InputError as exc:
        fail(str(exc))
    sink = None
    if args.aerospike:
        from .aerospike_sink import AerospikeSink, AerospikeSinkError

        try:
            sink = AerospikeSink.connect(args.aerospike, namespace=args.aerospike_namespace)
            if args.create_index:
                sink.create_index()
        except (AerospikeSinkError, ValueError) as exc:
            fail(str(exc), code=1)

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    publisher = Publisher(
        transport,
        writer_id=args.writer_id,
        partitions=args.partitions,
        sink=sink,
        policy=SnapshotPolicy(every_versions=args.snapshot_every),
        progress=progress,
    )
    try:
        result = publisher.publish(desired, prune=args.prune, drop=args.drop)
    except ValueError as exc:
        fail(str(exc))
    except FencedError as exc:
        fail(f"fenced: {exc}", code=3)
    except TransportError as exc:
        fail(str(exc), code=1)
    except RuntimeError as exc:  # AerospikeSinkError: nothing was committed to the log
        fail(f"{exc} (the log was not written; run the same publish again)", code=1)
    print(f"published to {transport.describe()}: {result.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
