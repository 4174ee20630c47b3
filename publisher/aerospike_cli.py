"""seg-publish's Aerospike side: the option group, the sink it builds, and the maintenance modes
that need no publish input (`--reconcile [--dry-run]`, `--members SEGMENT`, `--create-index`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.aerospike_layout import DEFAULT_BATCH_SIZE
from sidecar.cliutil import (
    FAILURE,
    CommandError,
    Parser,
    add_aerospike_options,
    aerospike_target_from_args,
    positive_int,
    transport_from_args,
)
from sidecar.ids import BadRequest, segment_id
from sidecar.transport.base import FencedError, TransportError

# the sink (and the aerospike client, 0.1 s to import) only when Aerospike is used
if TYPE_CHECKING:
    from .aerospike_sink import AerospikeSink

#: `--reconcile --dry-run` found differences
DIFFERS = 4
FENCED = 3  # exit status when another publisher with the same --writer-id took over


def add_options(parser: Parser) -> None:
    add_aerospike_options(parser, title="Aerospike (the user records: a mirror of the log)")
    group = parser.add_argument_group("Aerospike maintenance")
    group.add_argument(
        "--aerospike-batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="records per batch_operate; keep it within the server's batch-max-requests",
    )
    group.add_argument(
        "--create-index", action="store_true", help="create the mapkeys index on the bin"
    )
    group.add_argument(
        "--reconcile",
        action="store_true",
        help="compare the Aerospike set with the log's state and rewrite only what differs "
        "(needs --aerospike and the log; writes nothing to the log)",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="with --reconcile: only report; exit 4 when anything differs",
    )
    group.add_argument(
        "--members",
        metavar="SEGMENT",
        help="print the users of SEGMENT from Aerospike through the mapkeys index, one per "
        "line, ascending (needs --aerospike and the index; no log)",
    )


def maintenance(args: argparse.Namespace) -> bool:
    """Is this run a maintenance mode (no publish)? Bad combinations are a CommandError."""
    if args.dry_run and not args.reconcile:
        raise CommandError("--dry-run goes with --reconcile")
    modes = [m for m in ("reconcile", "members") if getattr(args, m)]
    if len(modes) > 1:
        raise CommandError("give one of --reconcile or --members")
    if modes:
        if not args.aerospike:
            raise CommandError(f"--{modes[0]} needs --aerospike HOST:PORT")
        if args.input or args.drop or args.prune or args.rollback or args.history:
            raise CommandError(
                f"--{modes[0]} takes no --input, --drop, --prune, --rollback or --history"
            )
    if args.members is not None:
        try:
            segment_id(args.members)
        except BadRequest as exc:
            raise CommandError(f"--members: {exc}") from None
    publishes = args.input or args.drop or args.rollback or args.history
    index_only = args.create_index and args.aerospike and not publishes
    return bool(modes) or bool(index_only)


def sink_from_args(args: argparse.Namespace) -> AerospikeSink | None:
    target = aerospike_target_from_args(args)
    if target is None:
        return None
    from .aerospike_sink import AerospikeSink, AerospikeSinkError

    try:
        sink = AerospikeSink.connect(target, batch_size=args.aerospike_batch_size)
        if args.create_index:
            sink.create_index()
    except AerospikeSinkError as exc:
        raise CommandError(str(exc), FAILURE) from None
    return sink


def run_maintenance(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    sink = sink_from_args(args)
    assert sink is not None  # maintenance() checked --aerospike
    try:
        if args.members is not None:
            return _members(sink, args.members)
        if args.reconcile:
            return _reconcile(args, sink, progress)
        print(f"index ready on {sink.target.describe()}")
        return 0
    finally:
        sink.close()


def _aerospike_error() -> type[Exception]:
    import aerospike

    return aerospike.exception.AerospikeError


def _members(sink: AerospikeSink, segment: str) -> int:
    from pyroaring import BitMap64

    try:
        users = BitMap64(sink.members(segment))
    except _aerospike_error() as exc:
        msg = f"cannot list {segment} from Aerospike: {exc} (is there an index? --create-index)"
        raise CommandError(msg, FAILURE) from None
    write = sys.stdout.write
    for user in users:
        write(f"{user}\n")
    if sink.keyless:
        print(
            f"seg-publish: {sink.keyless:,} records without a stored key were skipped "
            "(--reconcile stores their keys)",
            file=sys.stderr,
        )
    return 0


def _reconcile(
    args: argparse.Namespace, sink: AerospikeSink, progress: Callable[[str], None]
) -> int:
    from .aerospike_sink import AerospikeSinkError
    from .reconcile import reconcile

    transport = transport_from_args(args)
    try:
        report = reconcile(
            transport, sink, dry_run=args.dry_run, progress=progress, writer_id=args.writer_id
        )
    except FencedError as exc:
        raise CommandError(f"fenced: {exc}", FENCED) from None
    except (TransportError, AerospikeSinkError, _aerospike_error()) as exc:
        raise CommandError(f"reconcile failed: {exc}", FAILURE) from None
    print(f"reconcile {transport.describe()} -> {sink.target.describe()}: {report.summary()}")
    return DIFFERS if args.dry_run and report.differs else 0
