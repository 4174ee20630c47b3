"""`seg-publish`: publish a segment-set directory to the log (and Aerospike).

Every option can also come from the environment as SEG_<OPTION> (sidecar/cliutil.py has the
rules). Exit status: 0 published (or nothing to do), 2 bad input, 3 fenced by another
publisher, 1 when the log or Aerospike fails; always a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sidecar.cliutil import (
    FAILURE,
    CommandError,
    Parser,
    add_log_options,
    exits_on_error,
    positive_int,
    transport_from_args,
)
from sidecar.transport.base import FencedError, TransportError

from .plan import SnapshotPolicy
from .publish import Publisher
from .segment_set import InputError, read_segment_set

FENCED = 3  # exit status when another publisher with the same --writer-id took over


def build_parser() -> Parser:
    parser = Parser(
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
        "--partitions", type=positive_int, metavar="N", help="partitions when creating the topics"
    )
    parser.add_argument(
        "--writer-id",
        default="seg-publisher",
        help="transactional.id: a second publisher with the same id fences the first",
    )
    parser.add_argument(
        "--snapshot-every",
        type=positive_int,
        default=50,
        metavar="N",
        help="write a snapshot every N versions",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with exits_on_error(parser.prog):
        return _publish(args)


def _publish(args: argparse.Namespace) -> int:
    if not args.input and not args.drop:
        raise CommandError("give --input DIR (and/or --drop SEGMENT)")
    transport = transport_from_args(args)
    try:
        desired = read_segment_set(args.input).segments if args.input else {}
    except InputError as exc:
        raise CommandError(str(exc)) from None
    sink = None
    if args.aerospike:
        from .aerospike_sink import AerospikeSink, AerospikeSinkError

        try:
            sink = AerospikeSink.connect(args.aerospike, namespace=args.aerospike_namespace)
            if args.create_index:
                sink.create_index()
        except (AerospikeSinkError, ValueError) as exc:
            raise CommandError(str(exc), FAILURE) from None

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
        raise CommandError(str(exc)) from None
    except FencedError as exc:
        raise CommandError(f"fenced: {exc}", FENCED) from None
    except TransportError as exc:
        raise CommandError(str(exc), FAILURE) from None
    except RuntimeError as exc:  # AerospikeSinkError: nothing was committed to the log
        msg = f"{exc} (the log was not written; run the same publish again)"
        raise CommandError(msg, FAILURE) from None
    print(f"published to {transport.describe()}: {result.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
