"""`seg-publish`: publish a segment-set directory to the log (and Aerospike).

Every option can also come from the environment as SEG_<OPTION> (sidecar/cliutil.py has the
rules). Exit status: 0 published (or nothing to do), 2 bad input or refused by a publish
guard, 3 fenced by another publisher, 1 when the log or Aerospike fails, 4 when
`--reconcile --dry-run` found differences; always a one-line reason on stderr. `--history
SEGMENT` prints the versions the log holds; `--rollback SEGMENT --to-version V` republishes the
state of version V as a new version. The Aerospike maintenance modes (`--reconcile`,
`--members`, `--create-index` alone) are in publisher/aerospike_cli.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from sidecar.cliutil import (
    FAILURE,
    CommandError,
    Parser,
    add_log_options,
    directory,
    exits_on_error,
    positive_int,
    transport_from_args,
)
from sidecar.ids import BadRequest, segment_id
from sidecar.transport.base import FencedError, TransportError

from . import aerospike_cli
from .aerospike_cli import FENCED
from .guard import DEFAULT_MAX_REMOVE_FRACTION, Guard, fraction
from .history import HistoryError, format_history, read_history
from .plan import SnapshotPolicy
from .publish import Publisher, PublishResult
from .segment_set import InputError, read_segment_set


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
    aerospike_cli.add_options(parser)
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
        metavar="ID",
        help="transactional.id: a second publisher with the same id fences the first",
    )
    parser.add_argument(
        "--snapshot-every",
        type=positive_int,
        default=50,
        metavar="N",
        help="write a snapshot every N versions",
    )
    parser.add_argument(
        "--publisher-state-dir",
        type=directory,
        metavar="DIR",
        help="keep the recovered state in DIR between runs: a state file verified against the "
        "log (its identity and offsets) spares replaying it; any other is ignored",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    guards = parser.add_argument_group("guards and history")
    guards.add_argument(
        "--max-remove-fraction",
        type=fraction,
        default=DEFAULT_MAX_REMOVE_FRACTION,
        metavar="F",
        help="refuse a publish removing more than this fraction of a segment (1: no limit)",
    )
    guards.add_argument("--force", action="store_true", help="publish what a guard refuses")
    guards.add_argument(
        "--rollback", metavar="SEGMENT", help="republish SEGMENT as of --to-version"
    )
    guards.add_argument(
        "--to-version", type=positive_int, metavar="V", help="the version --rollback restores"
    )
    guards.add_argument("--history", metavar="SEGMENT", help="print the versions the log holds")
    run = parser.add_argument_group("run metrics (for the alert on a publisher that stopped)")
    run.add_argument("--metrics-file", metavar="PATH", help="write them here (textfile collector)")
    run.add_argument("--pushgateway", metavar="URL", help="push them to this Pushgateway")
    parser.add_argument(
        "--repair-log",
        action="store_true",
        help=(
            "with --log-dir: keep only the intact prefix of a damaged log directory (the rest "
            "is saved beside it) and say what was dropped; publishes nothing"
        ),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with exits_on_error(parser.prog):
        if args.repair_log:
            return _repair(args)
        if aerospike_cli.maintenance(args):
            return aerospike_cli.run_maintenance(args, _progress(args))
        _check_mode(args)
        if args.history:
            return _history(args)
        if not (args.metrics_file or args.pushgateway):
            _publish(args)
            return 0
        from .metrics import RunMetrics

        metrics = RunMetrics(args.writer_id, args.metrics_file, args.pushgateway)
        started, code, result = time.monotonic(), FAILURE, None
        try:
            result = _publish(args)
            code = 0
        except CommandError as exc:
            code = exc.code
            raise
        finally:
            try:
                metrics.record(code, time.monotonic() - started, result)
            except Exception as exc:  # the publish is done (or failed) either way: say so
                print(f"{parser.prog}: warning: run metrics not exported: {exc}", file=sys.stderr)
    return 0


def _check_mode(args: argparse.Namespace) -> None:
    publishes = args.input or args.drop
    if args.history and (publishes or args.rollback):
        raise CommandError("--history only prints: give it alone")
    if args.rollback and (publishes or args.prune):
        raise CommandError("--rollback publishes one segment: no --input, --drop or --prune")
    if args.rollback and args.to_version is None:
        raise CommandError("--rollback needs --to-version V")
    if not args.rollback and args.to_version is not None:
        raise CommandError("--to-version goes with --rollback")
    if not (publishes or args.rollback or args.history):
        raise CommandError(
            "give --input DIR (and/or --drop SEGMENT), --rollback SEGMENT or --history SEGMENT"
        )


def _segment(option: str, name: str) -> str:
    try:
        return segment_id(name)
    except BadRequest as exc:
        raise CommandError(f"{option}: {exc}") from None


def _history(args: argparse.Namespace) -> int:
    segment = _segment("--history", args.history)
    transport = transport_from_args(args)
    try:
        print(format_history(read_history(transport, segment)))
    except TransportError as exc:
        raise CommandError(str(exc), FAILURE) from None
    return 0


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    return progress


def _publish(args: argparse.Namespace) -> PublishResult:
    """One publish (or rollback); a CommandError says why it failed."""
    transport = transport_from_args(args)
    desired, floors = {}, {}
    max_age: dict[str, int] | None = None  # a rollback keeps the log's max ages
    ttl: dict[str, int] = {}
    try:
        if args.rollback:
            segment = _segment("--rollback", args.rollback)
            desired = {segment: read_history(transport, segment).state_at(args.to_version)}
        elif args.input:
            segment_set = read_segment_set(args.input)
            desired, floors = segment_set.segments, segment_set.min_cardinality
            max_age, ttl = segment_set.max_age, segment_set.ttl
    except (InputError, HistoryError) as exc:
        raise CommandError(str(exc)) from None
    except TransportError as exc:
        raise CommandError(str(exc), FAILURE) from None
    sink = aerospike_cli.sink_from_args(args)
    publisher = Publisher(
        transport,
        writer_id=args.writer_id,
        partitions=args.partitions,
        sink=sink,
        policy=SnapshotPolicy(every_versions=args.snapshot_every),
        progress=_progress(args),
        guard=Guard(args.max_remove_fraction, force=args.force),
        state_dir=args.publisher_state_dir,
    )
    try:
        result = publisher.publish(
            desired,
            prune=args.prune,
            drop=args.drop,
            min_cardinality=floors,
            max_age=max_age,
            ttl=ttl,
        )
    except ValueError as exc:  # bad input, or refused by a guard (GuardError)
        raise CommandError(str(exc)) from None
    except FencedError as exc:
        raise CommandError(f"fenced: {exc}", FENCED) from None
    except TransportError as exc:
        raise CommandError(str(exc), FAILURE) from None
    except RuntimeError as exc:  # AerospikeSinkError: nothing was committed to the log
        msg = f"{exc} (the log was not written; run the same publish again)"
        raise CommandError(msg, FAILURE) from None
    if args.rollback:
        ((segment, members),) = desired.items()
        if segment in result.versions:
            print(
                f"rolled back {segment} to the state of version {args.to_version} "
                f"({len(members):,} members) as version {result.versions[segment]}"
            )
        else:
            print(f"{segment} already holds the state of version {args.to_version}: no change")
    print(f"published to {transport.describe()}: {result.summary()}")
    return result


def _repair(args: argparse.Namespace) -> int:
    if not args.log_dir or args.kafka or args.input or args.drop:
        raise CommandError("--repair-log takes --log-dir DIR only (no --kafka, --input or --drop)")
    from sidecar.transport.logdir import repair

    try:
        print(repair(args.log_dir))
    except TransportError as exc:
        raise CommandError(str(exc), FAILURE) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
